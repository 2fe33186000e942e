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
    """A random OPT checkpoint in f16 safetensors, built directly in f16 (an f32 OPT-6.7B would
    not fit in RAM) and saved in shards."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    out = work / f"opt-{size}-random"
    if (out / "model.safetensors").exists() or (out / "model.safetensors.index.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    layers, heads, hidden, ffn = SIZES[size]
    cfg = OPTConfig(hidden_size=hidden, num_hidden_layers=layers, ffn_dim=ffn,
                    num_attention_heads=heads, word_embed_proj_dim=hidden,
                    max_position_embeddings=2048, vocab_size=50272, do_layer_norm_before=True,
                    torch_dtype="float16")
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float16)
    model = OPTForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(out, max_shard_size="2GB")
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
