"""The CPU row matmul against F.linear on a decode step's weights, streamed from memory.

    python -m scripts.bench_rows_linear --dtype bfloat16 --rows 1 4 8

The 30 layers' projection shapes of the default model (SmolLM2-135M: q, k, v, o, gate, up, down), random
weights, every matrix multiplied once per pass by `rows` rows, so each pass reads all the weights from
memory as a decode step does (they do not fit in cache); beside it, a float32 sum over the same bytes
(what streaming reaches here). Median of 9 passes; GB/s is weight bytes over pass time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn import functional as F

SHAPES = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]  # (in, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--passes", type=int, default=9)
    args = parser.parse_args()
    from neuron_peagle.kernels.cpu_linear import rows_linear_op

    op = rows_linear_op()
    if op is None:
        raise SystemExit("the row matmul is not available here (see the line above)")
    dtype = getattr(torch, args.dtype)
    weights = [torch.randn(n, k).to(dtype) for _ in range(args.layers) for k, n in SHAPES]
    column_major = [w.t().contiguous().t() for w in weights]
    total = sum(w.numel() * w.element_size() for w in weights)

    def seconds(fn, rows: int, matrices) -> float:
        xs = {k: torch.randn(rows, k).to(dtype) for k in {w.shape[1] for w in matrices}}
        times = []
        for _ in range(args.passes + 1):
            start = time.perf_counter()
            for w in matrices:
                fn(xs[w.shape[1]], w)
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:])

    flat = torch.ones(total // 4, dtype=torch.float32)
    stream = statistics.median(_timed(flat.sum) for _ in range(args.passes))
    print(f"{args.dtype}, {torch.get_num_threads()} threads, {total / 1e6:.0f} MB of weights; a float32 sum over "
          f"the same bytes: {stream * 1000:.1f} ms ({total / stream / 1e9:.1f} GB/s)")
    print("| rows | row matmul ms (GB/s) | F.linear, row-major | F.linear, column-major |\n|---|---|---|---|")
    for rows in args.rows:
        ours = seconds(lambda x, w: op(x, w, None), rows, weights)
        plain = seconds(F.linear, rows, weights)
        columns = seconds(F.linear, rows, column_major)
        print(f"| {rows} | {ours * 1000:.1f} ({total / ours / 1e9:.1f}) | {plain * 1000:.1f} ({total / plain / 1e9:.1f}) "
              f"| {columns * 1000:.1f} ({total / columns / 1e9:.1f}) |", flush=True)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
