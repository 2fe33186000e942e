#!/usr/bin/env python3
"""Throughput of a running `serve` example: N streaming requests sent one after another, then
the same N sent at once. Standard library only; loopback only.

Every request is a greedy streaming completion of its own prompt with a fixed max_tokens; a
request counts as answered when its stream ends with `data: [DONE]` after a finish_reason.
Token counts come from the server's usage chunk. Batch sizes come from /metrics.

    python3 tools/e2e/bench_concurrency.py --url http://127.0.0.1:8000 --n 32 --max-tokens 16
"""

import argparse
import http.client
import json
import re
import sys
import threading
import time
import urllib.parse
import urllib.request


def stream_completion(url, model, prompt, max_tokens):
    """One streaming request; returns (text, completion_tokens, finish_reason, done, ttft)."""
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=3600)
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    text, tokens, reason, done, ttft = [], 0, None, False, None
    for raw in resp:
        line = raw.decode().rstrip("\n")
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            done = True
            break
        chunk = json.loads(data)
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        for c in chunk["choices"]:
            if c["text"] and ttft is None:
                ttft = time.perf_counter() - start
            text.append(c["text"])
            reason = c["finish_reason"] or reason
    conn.close()
    return "".join(text), tokens, reason, done, ttft


def batch_sizes(url):
    """{batch size: batches run} from /metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=60) as r:
        text = r.read().decode()
    return {int(m.group(1)): int(m.group(2))
            for m in re.finditer(r'^flexgen_batches_by_size_total\{size="(\d+)"\} (\d+)$', text, re.M)}


def median(xs):
    return round(sorted(xs)[len(xs) // 2], 2) if xs else None


def diff(after, before):
    return {k: v - before.get(k, 0) for k, v in sorted(after.items()) if v - before.get(k, 0)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=16)
    args = p.parse_args()
    with urllib.request.urlopen(args.url + "/v1/models", timeout=60) as r:
        model = json.load(r)["data"][0]["id"]
    prompts = [f"Request {i}: the quick brown fox jumps over the lazy dog" for i in range(args.n)]

    # Warm-up (first-touch of the weights).
    stream_completion(args.url, model, "warm up", 2)

    before = batch_sizes(args.url)
    t0 = time.perf_counter()
    seq = [stream_completion(args.url, model, pr, args.max_tokens) for pr in prompts]
    t_seq = time.perf_counter() - t0
    seq_batches = diff(batch_sizes(args.url), before)

    before = batch_sizes(args.url)
    results = [None] * args.n
    errors = []
    gate = threading.Barrier(args.n)

    def worker(i):
        try:
            gate.wait()
            results[i] = stream_completion(args.url, model, prompts[i], args.max_tokens)
        except Exception as e:  # reported below
            errors.append(f"request {i}: {e}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    t_conc = time.perf_counter() - t0
    conc_batches = diff(batch_sizes(args.url), before)

    answered = sum(1 for r in results if r and r[3] and r[2])
    same = sum(1 for a, b in zip(seq, results) if b and a[0] == b[0])
    tok_seq = sum(r[1] for r in seq)
    tok_conc = sum(r[1] for r in results if r)
    summary = {
        "model": model, "requests": args.n, "max_tokens": args.max_tokens,
        "sequential": {"seconds": round(t_seq, 2), "tokens": tok_seq,
                       "tokens_per_s": round(tok_seq / t_seq, 2), "batches": seq_batches},
        "concurrent": {"seconds": round(t_conc, 2), "tokens": tok_conc,
                       "tokens_per_s": round(tok_conc / t_conc, 2), "batches": conc_batches,
                       "answered": answered,
                       "median_ttft_s": median([r[4] for r in results if r and r[4] is not None])},
        "speedup": round((tok_conc / t_conc) / (tok_seq / t_seq), 2),
        "concurrent_text_equal_to_sequential": same,
        "errors": errors,
    }
    print(json.dumps(summary, indent=2))
    ok = not errors and answered == args.n
    print(f"bench: {1 if ok else 0} passed, {0 if ok else 1} failed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
