#!/usr/bin/env python3
"""Independent check of tests/fixtures: a plain-numpy OPT forward (no transformers)
that reads each checkpoint the way the Rust engine has to (config.json, single
or sharded safetensors, with or without the "model." prefix, tied lm_head) and
compares it with reference.safetensors / reference.json.

It also serves as a compact spec of the maths the fixtures encode:
  positions  = cumsum(mask) * mask - 1, looked up at row (position + 2)
  x          = project_in(embed_tokens[ids]) + embed_positions[positions + 2]
  pre-LN  layer: x += out_proj(attn(LN1(x)));  x += fc2(relu(fc1(LN2(x))))
  post-LN layer: x = LN1(x + out_proj(attn(x))); x = LN2(x + fc2(relu(fc1(x))))
  pre-LN: x = final_layer_norm(x)   (post-LN models have no final_layer_norm)
  logits     = project_out(x) @ embed_tokens.T
  attention: q scaled by head_dim**-0.5 after its bias; causal + key padding mask.

Run: python tools/check_fixtures.py [--fixtures tests/fixtures]
"""

import argparse
import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import load_file

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_weights(d):
    idx = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(idx):
        with open(idx) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    w = {}
    for fn in files:
        for k, v in load_file(os.path.join(d, fn)).items():
            k = k[len("model."):] if k.startswith("model.") else k
            w[k] = v.float().numpy().astype(np.float64)
    return w


def layer_norm(x, g, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


def linear(w, name, x):
    y = x @ w[name + ".weight"].T
    if name + ".bias" in w:
        y = y + w[name + ".bias"]
    return y


def forward(cfg, w, ids, mask):
    """ids, mask: [B, T] -> logits [B, T, V] (float64)."""
    B, T = ids.shape
    H, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    hd = H // nh
    pre = cfg["do_layer_norm_before"]
    pos = np.cumsum(mask, 1) * mask - 1
    x = w["decoder.embed_tokens.weight"][ids]
    if "decoder.project_in.weight" in w:
        x = linear(w, "decoder.project_in", x)
    x = x + w["decoder.embed_positions.weight"][pos + 2]
    causal = np.tril(np.ones((T, T), dtype=bool))
    allowed = causal[None, :, :] & (mask[:, None, :] > 0)  # [B, Tq, Tk]
    for i in range(cfg["num_hidden_layers"]):
        p = f"decoder.layers.{i}."
        res = x
        h = layer_norm(x, w[p + "self_attn_layer_norm.weight"], w[p + "self_attn_layer_norm.bias"]) if pre else x
        q = linear(w, p + "self_attn.q_proj", h) * hd ** -0.5
        k = linear(w, p + "self_attn.k_proj", h)
        v = linear(w, p + "self_attn.v_proj", h)
        q, k, v = (t.reshape(B, T, nh, hd).transpose(0, 2, 1, 3) for t in (q, k, v))
        s = q @ k.transpose(0, 1, 3, 2)
        s = np.where(allowed[:, None], s, -np.inf)
        m = s.max(-1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)  # pad query rows see no key at all: they get zeros
        e = np.exp(s - m)
        den = e.sum(-1, keepdims=True)
        a = np.divide(e, den, out=np.zeros_like(e), where=den > 0)
        o = (a @ v).transpose(0, 2, 1, 3).reshape(B, T, H)
        x = res + linear(w, p + "self_attn.out_proj", o)
        if not pre:
            x = layer_norm(x, w[p + "self_attn_layer_norm.weight"], w[p + "self_attn_layer_norm.bias"])
        res = x
        h = layer_norm(x, w[p + "final_layer_norm.weight"], w[p + "final_layer_norm.bias"]) if pre else x
        h = linear(w, p + "fc2", np.maximum(linear(w, p + "fc1", h), 0.0))
        x = res + h
        if not pre:
            x = layer_norm(x, w[p + "final_layer_norm.weight"], w[p + "final_layer_norm.bias"])
    if "decoder.final_layer_norm.weight" in w:
        x = layer_norm(x, w["decoder.final_layer_norm.weight"], w["decoder.final_layer_norm.bias"])
    if "decoder.project_out.weight" in w:
        x = linear(w, "decoder.project_out", x)
    return x @ w["decoder.embed_tokens.weight"].T


def greedy(cfg, w, ids, mask, n, suppress, eos=2, pad=1):
    ids, mask = ids.copy(), mask.copy()
    done = np.zeros(ids.shape[0], dtype=bool)
    out = []
    for _ in range(n):
        lg = forward(cfg, w, ids, mask)[:, -1, :]
        lg[:, suppress[0]:suppress[1] + 1] = -np.inf
        nxt = np.where(done, pad, lg.argmax(-1))
        out.append(nxt)
        done |= nxt == eos
        ids = np.concatenate([ids, nxt[:, None]], 1)
        mask = np.concatenate([mask, np.ones_like(mask[:, :1])], 1)
    return np.stack(out, 1).tolist()


def check(d):
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(d, "reference.json")) as f:
        ref = json.load(f)
    w = load_weights(d)
    r = load_file(os.path.join(d, "reference.safetensors"))
    ids, mask = np.array(ref["input_ids"]), np.array(ref["attention_mask"])
    logits = forward(cfg, w, ids, mask)
    pos = r["positions"].numpy()
    ours = logits[pos[:, 0], pos[:, 1]]
    theirs = r["logits"].numpy().astype(np.float64)
    err = np.abs(ours - theirs).max()
    g = greedy(cfg, w, ids, mask, ref["max_new_tokens"], ref["suppress_tokens"])
    sid = np.array([ref["single"]["input_ids"]])
    gs = greedy(cfg, w, sid, np.ones_like(sid), ref["max_new_tokens"], ref["suppress_tokens"])[0]
    ok = err < 1e-3 and g == ref["greedy_new_tokens"] and gs == ref["single"]["greedy_new_tokens"]
    print(f"{os.path.basename(d):18s} max|logit diff| {err:.2e}  greedy batch {'ok' if g == ref['greedy_new_tokens'] else 'MISMATCH'}"
          f"  greedy single {'ok' if gs == ref['single']['greedy_new_tokens'] else 'MISMATCH'}")
    return ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", default=os.path.join(REPO_ROOT, "tests", "fixtures"))
    args = ap.parse_args()
    dirs = sorted(os.path.join(args.fixtures, n) for n in os.listdir(args.fixtures)
                  if os.path.exists(os.path.join(args.fixtures, n, "reference.json")))
    results = [check(d) for d in dirs]
    if not dirs or not all(results):
        sys.exit("FAILED")
    print(f"all {len(dirs)} fixtures agree with the numpy re-implementation")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
