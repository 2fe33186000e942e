"""HF Accelerate disk offload, the baseline FlexGen compares against: a random OPT checkpoint
loaded with `device_map="auto"`, `max_memory` and `offload_folder` (layers that do not fit in
`--max-memory` are offloaded to disk and read back at every forward pass), then greedy
generation of --gen-len tokens for a batch of random prompts, as flex_opt runs it.

Run it under the same memory cap as flex_opt, e.g.

    tools/memcap.sh 10G -- tools/peers/.venv/bin/python tools/peers/accelerate_offload.py \\
        --work target/peers --model-size 6.7b --max-memory 6GiB --batch 4 --prompt-len 32 --gen-len 4

Prints one JSON line: prefill and decode seconds, total throughput (FlexGen's: generated
tokens / (prefill + decode)), peak RSS.
"""
import argparse
import json
import resource
import shutil
import time
from pathlib import Path

SIZES = {  # name: (layers, heads, hidden, ffn)
    "125m": (12, 12, 768, 3072),
    "1.3b": (24, 32, 2048, 8192),
    "6.7b": (32, 32, 4096, 16384),
    "13b": (40, 40, 5120, 20480),
}


def build_checkpoint(work: Path, size: str) -> Path:
    """A random OPT checkpoint in f16 safetensors, written one shard per decoder layer (plus one
    for the embeddings), so that no more than one layer is in RAM: OPT-13B in f16 (26 GB) does
    not fit in this machine's 24 GiB, nor under a 10 GiB cap. Weights are N(0, init_std) as
    in HF's `OPTPreTrainedModel._init_weights`, biases 0, layer norms 1 and 0."""
    import torch
    from safetensors.torch import save_file
    from transformers import OPTConfig

    out = work / f"opt-{size}-random"
    if (out / "model.safetensors").exists() or (out / "model.safetensors.index.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    layers, heads, hidden, ffn = SIZES[size]
    cfg = OPTConfig(hidden_size=hidden, num_hidden_layers=layers, ffn_dim=ffn,
                    num_attention_heads=heads, word_embed_proj_dim=hidden,
                    max_position_embeddings=2048, vocab_size=50272, do_layer_norm_before=True,
                    torch_dtype="float16")
    gen = torch.Generator().manual_seed(0)

    def normal(*shape):
        return (torch.randn(*shape, generator=gen) * cfg.init_std).to(torch.float16)

    def zeros(n):
        return torch.zeros(n, dtype=torch.float16)

    def ones(n):
        return torch.ones(n, dtype=torch.float16)

    pre = "model.decoder."

    def shard(i):
        """Shard 0: embeddings and the final layer norm; shard i > 0: decoder layer i - 1."""
        if i == 0:
            return {
                pre + "embed_tokens.weight": normal(cfg.vocab_size, hidden),
                pre + "embed_positions.weight": normal(cfg.max_position_embeddings + 2, hidden),
                pre + "final_layer_norm.weight": ones(hidden),
                pre + "final_layer_norm.bias": zeros(hidden),
            }
        lp = f"{pre}layers.{i - 1}."
        t = {}
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t[f"{lp}self_attn.{proj}.weight"] = normal(hidden, hidden)
            t[f"{lp}self_attn.{proj}.bias"] = zeros(hidden)
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            t[f"{lp}{norm}.weight"] = ones(hidden)
            t[f"{lp}{norm}.bias"] = zeros(hidden)
        t[lp + "fc1.weight"] = normal(ffn, hidden)
        t[lp + "fc1.bias"] = zeros(ffn)
        t[lp + "fc2.weight"] = normal(hidden, ffn)
        t[lp + "fc2.bias"] = zeros(hidden)
        return t

    weight_map = {}
    total = 0
    n_shards = layers + 1
    for i in range(n_shards):
        t = shard(i)
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file(t, str(out / name), metadata={"format": "pt"})
        for k, v in t.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
        del t  # before the next layer is drawn: one layer in RAM at a time
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    cfg.save_pretrained(out)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True, help="where checkpoints and the offload folder go")
    ap.add_argument("--model-size", default="6.7b", choices=sorted(SIZES))
    ap.add_argument("--max-memory", default="6GiB", help="Accelerate's CPU budget for weights")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-len", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--build-only", action="store_true")
    args = ap.parse_args()

    import torch
    from transformers import OPTForCausalLM

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    ckpt = build_checkpoint(work, args.model_size)
    if args.build_only:
        print(json.dumps({"checkpoint": str(ckpt)}))
        return
    offload = work / f"accelerate-offload-{args.model_size}"
    shutil.rmtree(offload, ignore_errors=True)
    t0 = time.perf_counter()
    model = OPTForCausalLM.from_pretrained(
        ckpt, dtype=getattr(torch, args.dtype), device_map="auto",
        max_memory={"cpu": args.max_memory}, offload_folder=str(offload),
        offload_state_dict=True)
    model.eval()
    load_s = time.perf_counter() - t0
    on_disk = sum(1 for d in model.hf_device_map.values() if d == "disk")

    import random
    rng = random.Random(0)
    ids = torch.tensor([[2] + [rng.randrange(4, 50000) for _ in range(args.prompt_len - 1)]
                        for _ in range(args.batch)])
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, do_sample=False,
                       min_new_tokens=1)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.gen_len,
                       do_sample=False, min_new_tokens=args.gen_len)
        total = time.perf_counter() - t0
    decode = max(total - prefill, 1e-9)
    print(json.dumps({
        "engine": "hf-accelerate-disk-offload", "model_size": args.model_size,
        "dtype": args.dtype, "max_memory": args.max_memory, "batch": args.batch,
        "prompt_len": args.prompt_len, "gen_len": args.gen_len, "load_s": load_s,
        "modules_on_disk": on_disk, "prefill_s": prefill, "decode_s": decode,
        "total_throughput_tok_s": args.batch * args.gen_len / total,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }))
    shutil.rmtree(offload, ignore_errors=True)


if __name__ == "__main__":
    main()
