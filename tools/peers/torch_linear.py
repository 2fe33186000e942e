"""torch's `F.linear` GFLOP/s at the shapes of our criterion `linear` bench (OPT-1.3B layers),
for the speed issue's large-shape target (256 x 2048 x 8192: m rows, k inputs, n outputs).

    tools/peers/.venv/bin/python tools/peers/torch_linear.py --threads 2

Prints one line per (shape, rows, dtype): the median of --reps timed calls after a warm-up,
2·m·n·k / seconds, the same measure as `cargo bench --bench kernels -- '^linear'`.
"""
import argparse
import statistics
import time

SHAPES = {  # name: (n, k) = (out, in), as in benches/kernels.rs
    "1.3b-qkvo": (2048, 2048),
    "1.3b-fc1": (8192, 2048),
    "1.3b-fc2": (2048, 8192),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 256])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}")
    for name, (n, k) in SHAPES.items():
        for m in args.rows:
            for dt in args.dtypes:
                dtype = getattr(torch, dt)
                w = (torch.rand(n, k) - 0.5).to(dtype)
                x = (torch.rand(m, k) - 0.5).to(dtype)
                with torch.inference_mode():
                    for _ in range(3):
                        F.linear(x, w)
                    times = []
                    for _ in range(args.reps):
                        t = time.perf_counter()
                        F.linear(x, w)
                        times.append(time.perf_counter() - t)
                s = statistics.median(times)
                print(f"{name} ({n} x {k}) m={m} {dt}: {2 * m * n * k / s / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
