"""Peer comparison for flex_opt: HF transformers (fp32, bf16) and CTranslate2 (int8, fp32).

Every engine runs the same workload: random prompts of --prompt-len tokens, --gen-len new
tokens (greedy, no early stop), batch sizes from --batches, 2 threads. Metrics follow
FlexGen: total throughput = generated tokens / (prefill + decode) time, decode throughput =
batch * (gen_len - 1) / decode time. Run through run_peers.sh (which sets up the venv).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SIZES = {  # name: (layers, heads, hidden, ffn)
    "125m": (12, 12, 768, 3072),
    "1.3b": (24, 32, 2048, 8192),
    "6.7b": (32, 32, 4096, 16384),
}


TOKENIZER_FILES = ["tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json"]


def build_checkpoint(work: Path, size: str, tokenizer: Path) -> Path:
    """A random OPT checkpoint (f16 safetensors) plus the real tokenizer files, which the
    CTranslate2 converter needs for its vocabulary."""
    import shutil

    import torch
    from transformers import OPTConfig, OPTForCausalLM

    out = work / f"opt-{size}-random"
    out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer / name, out / name)
    if (out / "model.safetensors").exists() or (out / "model.safetensors.index.json").exists():
        return out
    layers, heads, hidden, ffn = SIZES[size]
    cfg = OPTConfig(hidden_size=hidden, num_hidden_layers=layers, ffn_dim=ffn,
                    num_attention_heads=heads, word_embed_proj_dim=hidden,
                    max_position_embeddings=2048, vocab_size=50272, do_layer_norm_before=True)
    torch.manual_seed(0)
    model = OPTForCausalLM(cfg).to(torch.float16)
    model.save_pretrained(out, max_shard_size="20GB")
    return out


def prompts(batch: int, prompt_len: int):
    import random
    rng = random.Random(0)
    return [[2] + [rng.randrange(4, 50000) for _ in range(prompt_len - 1)] for _ in range(batch)]


def run_hf(ckpt: Path, dtype: str, batch: int, prompt_len: int, gen_len: int):
    import torch
    from transformers import OPTForCausalLM

    torch.set_num_threads(2)
    tdtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model = OPTForCausalLM.from_pretrained(ckpt, dtype=tdtype).eval()
    ids = torch.tensor(prompts(batch, prompt_len))
    mask = torch.ones_like(ids)
    kw = dict(do_sample=False, pad_token_id=1, eos_token_id=None, min_new_tokens=gen_len)
    with torch.inference_mode():
        model.generate(ids[:, :8], attention_mask=mask[:, :8], max_new_tokens=2, **kw)  # warm-up
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=1, min_new_tokens=1,
                       do_sample=False, pad_token_id=1, eos_token_id=None)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=gen_len, **kw)
        total = time.perf_counter() - t0
    assert out.shape[1] == prompt_len + gen_len, out.shape
    return prefill, total


def run_ct2(ckpt: Path, work: Path, quant: str, batch: int, prompt_len: int, gen_len: int):
    import ctranslate2

    out = work / f"{ckpt.name}-ct2-{quant}"
    if not (out / "model.bin").exists():
        ctranslate2.converters.TransformersConverter(str(ckpt)).convert(
            str(out), quantization=quant, force=True)
    gen = ctranslate2.Generator(str(out), device="cpu", intra_threads=2, inter_threads=1,
                                compute_type=quant)
    # CTranslate2 takes token strings: map ids through the converted vocabulary (a list).
    with open(out / "vocabulary.json") as f:
        vocab = json.load(f)
    toks = [[vocab[i] for i in p] for p in prompts(batch, prompt_len)]
    kw = dict(beam_size=1, sampling_topk=1, include_prompt_in_result=False, min_length=gen_len)
    gen.generate_batch([t[:8] for t in toks], max_length=2, beam_size=1, sampling_topk=1,
                       include_prompt_in_result=False, min_length=1)  # warm-up
    t0 = time.perf_counter()
    gen.generate_batch(toks, max_length=1, beam_size=1, sampling_topk=1,
                       include_prompt_in_result=False, min_length=1)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = gen.generate_batch(toks, max_length=gen_len, **kw)
    total = time.perf_counter() - t0
    assert all(len(r.sequences_ids[0]) == gen_len for r in res), [len(r.sequences_ids[0]) for r in res]
    return prefill, total


# flexgen-rs "dtypes" that are flags: 4-bit weights, 4-bit weights with 8-bit activations
# (plus a 4-bit KV cache), and 8-bit weights in groups of 256 with 8-bit activations.
FLEX_FLAGS = {"q4": ["--compress-weight"],
              "q4-int8": ["--compress-weight", "--int8-activations"],
              "q4-int8-cc": ["--compress-weight", "--int8-activations", "--compress-cache"],
              "q8g256-int8": ["--compress-weight", "--comp-weight-bits", "8",
                              "--comp-weight-group-size", "256", "--int8-activations"]}


def run_flex(flex_opt: str, ckpt: Path, dtype: str, batch: int, prompt_len: int, gen_len: int):
    cmd = [flex_opt, "--model", str(ckpt), "--prompt-len", str(prompt_len), "--gen-len",
           str(gen_len), "--gpu-batch-size", str(batch), "--json"]
    cmd += FLEX_FLAGS.get(dtype, ["--dtype", dtype])
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    m = json.loads(res.stdout.strip().splitlines()[-1])
    return m["prefill_latency_s"], m["total_latency_s"]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--flex-opt", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--tokenizer", default=str(Path(__file__).resolve().parents[3] / "shared/data/opt-tokenizer"))
    ap.add_argument("--model-size", default="1.3b", choices=sorted(SIZES))
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--engines", default="flexgen-rs q4-int8,flexgen-rs q4,flexgen-rs bf16,flexgen-rs f16,"
                    "flexgen-rs f32,hf bf16,hf fp32,ct2 int8,ct2 float32",
                    help="comma separated 'engine dtype'; flexgen-rs takes f32, f16, bf16, q4 "
                    "(--compress-weight), q4-int8 (plus --int8-activations), q4-int8-cc (plus "
                    "--compress-cache) and q8g256-int8 (8-bit weights in groups of 256, plus "
                    "--int8-activations)")
    ap.add_argument("--skip", default="hf fp32@32",
                    help="engine@batch pairs to skip (comma separated), too slow to be useful")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the whole engine x batch list this many times, round-robin, and "
                    "keep each pair's run with the best total (evens out a noisy host's phases "
                    "between engines)")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = build_checkpoint(work, args.model_size, Path(args.tokenizer))
    batches = [int(b) for b in args.batches.split(",")]
    skip = set(s.strip() for s in args.skip.split(",") if s.strip())
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    pairs = [(e.strip(), b) for e in args.engines.split(",") for b in batches
             if f"{e.strip()}@{b}" not in skip]
    best = {}
    for rnd in range(args.rounds):
        for engine, b in pairs:
            kind, dtype = engine.split()
            print(f"running {engine} B={b} (round {rnd + 1}/{args.rounds}) ...", file=sys.stderr,
                  flush=True)
            if kind == "hf":
                pre, tot = run_hf(ckpt, dtype, b, args.prompt_len, args.gen_len)
            elif kind == "ct2":
                pre, tot = run_ct2(ckpt, work, dtype, b, args.prompt_len, args.gen_len)
            else:
                pre, tot = run_flex(args.flex_opt, ckpt, dtype, b, args.prompt_len, args.gen_len)
            total_tps = b * args.gen_len / tot
            decode_tps = b * (args.gen_len - 1) / max(tot - pre, 1e-9)
            print(f"  total {total_tps:.2f} tok/s, decode {decode_tps:.2f} tok/s, prefill {pre:.2f} s",
                  file=sys.stderr, flush=True)
            if (engine, b) not in best or total_tps > best[(engine, b)][2]:
                best[(engine, b)] = (engine, b, total_tps, decode_tps, pre)
    rows = [best[p] for p in pairs]
    best_peer = max((r[2] for r in rows if not r[0].startswith("flexgen-rs")), default=None)
    rounds = f", best of {args.rounds} rounds" if args.rounds > 1 else ""
    print(f"\nOPT-{args.model_size} random weights, prompt {args.prompt_len}, gen {args.gen_len}, "
          f"2 threads{rounds}")
    print("| engine | batch | total tok/s | decode tok/s | prefill s | total / best peer |")
    print("|---|---|---|---|---|---|")
    for engine, b, tot, dec, pre in rows:
        ratio = f"{tot / best_peer:.2f}x" if best_peer else "-"
        print(f"| {engine} | {b} | {tot:.2f} | {dec:.2f} | {pre:.2f} | {ratio} |")


if __name__ == "__main__":
    main()
