"""Which strides should a CPU backend give the linear weights? Row-major against column-major, measured.

    python -m scripts.benchmark_layout --backends inductor,eager --dtypes float32,bfloat16

The models hold nn.Linear's [out, in]; the CPU backends choose the strides (neuron_peagle/backends/
layout.py: row-major where the row matmul runs, which reads only row-major weights; without it column-major
float32 where a call multiplies one row). This measures, in one run on the same prompts:

1. each of the default model's linear shapes (LM head, q/k/v, o, gate/up, down) as a decode-shaped
   `F.linear` (1 and 8 rows: a plain step, a K=7 verify), row-major against column-major, per dtype
   (median of `--matmul-repeats`);
2. whole engines, plain decoding and P-EAGLE (the default speculation config), per backend and dtype,
   once with every linear weight row-major and once column-major (restrided before any graph is
   compiled); the two take turns prompt group by prompt group (`scripts.benchmark.run_interleaved`), and
   the ratio is the median over groups of the row-major decode time over the column-major one. Which
   of the two the backend picks is reported, and whether their greedy outputs are identical.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from neuron_peagle.backends.layout import column_major_on_cpu, strided
from neuron_peagle.kernels.cpu_linear import rows_linear_op
from neuron_peagle.files import atomic_write_text
from scripts.benchmark import heldout_prompts, run_interleaved


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--backends", default="inductor", help="comma-separated CPU backends (eager, inductor)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--modes", default="plain,parallel", help="plain and/or parallel (the default config)")
    parser.add_argument("--domains", default="code,chat")
    parser.add_argument("--prompts-per-domain", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--matmul-repeats", type=int, default=30)
    parser.add_argument("--prefill-buckets", default="128,512")
    parser.add_argument("--max-length", type=int, default=768)
    parser.add_argument("--out", type=Path, default=Path("bench_out/layout.json"))
    return parser.parse_args()


def median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


@torch.inference_mode()
def matmul_table(model_dir: Path, dtypes: list[str], repeats: int) -> list[dict]:
    from neuron_peagle.models.target import TargetModel

    target = TargetModel.from_pretrained(model_dir, 64)
    layer = target.layers[0]
    shapes = {"lm_head": target.lm_head.weight, "qkv_proj": layer.self_attn.qkv_proj.weight,
              "o_proj": layer.self_attn.o_proj.weight, "gate_up_proj": layer.mlp.gate_up_proj.weight,
              "down_proj": layer.mlp.down_proj.weight}
    rows = []
    for dtype in dtypes:
        for name, weight in shapes.items():
            row_major = weight.detach().to(getattr(torch, dtype)).contiguous()
            col_major = strided(row_major, column_major=True)
            for tokens in (1, 8):
                x = torch.randn(tokens, row_major.shape[1]).to(row_major.dtype)
                row_ms = median_ms(lambda: F.linear(x, row_major), repeats)
                col_ms = median_ms(lambda: F.linear(x, col_major), repeats)
                rows.append({"dtype": dtype, "weight": name, "shape": list(row_major.shape), "rows": tokens,
                             "row_major_ms": row_ms, "column_major_ms": col_ms})
                print(f"{dtype} {name} {list(row_major.shape)} x{tokens}: row-major {row_ms:.3f} ms, "
                      f"column-major {col_ms:.3f} ms", flush=True)
    return rows


def restride(engine, to_column_major: bool) -> int:
    """Every linear weight of the engine's models in the given strides, in place; how many were moved
    (a weight two modules share, the tied head and the embedding, once)."""
    moved = 0
    seen: set[int] = set()
    for module in (engine.runner.target, getattr(engine.runner, "proposer", None)):
        for layer in (module.modules() if module is not None else ()):
            if isinstance(layer, nn.Linear) and id(layer.weight) not in seen:
                seen.add(id(layer.weight))
                data = layer.weight.data
                restrided = strided(data, to_column_major)
                if restrided is not data:
                    layer.weight.data = restrided
                    moved += 1
    return moved


def main() -> None:
    args = parse_args()
    from neuron_peagle.default_model import require_default_model
    from neuron_peagle.runtime.engine import Engine
    from neuron_peagle.speculation import SpeculationConfig

    model_dir = args.model or require_default_model()
    dtypes = args.dtypes.split(",")
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "torch": torch.__version__,
               "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
               "matmuls": matmul_table(model_dir, dtypes, args.matmul_repeats), "engines": []}
    buckets = tuple(int(b) for b in args.prefill_buckets.split(","))
    for backend in args.backends.split(","):
        for dtype in dtypes:
            for mode in args.modes.split(","):
                speculation = SpeculationConfig(mode="plain") if mode == "plain" else SpeculationConfig()
                engines = {}
                for layout in ("column-major", "row-major"):
                    engine = Engine.from_pretrained(args.model, None, speculation, batch_size=1, backend=backend,
                                                    max_length=args.max_length, prefill_buckets=buckets, dtype=dtype)
                    rows = engine.runner.batch_size * engine.runner.tokens_per_step
                    row_matmul = rows_linear_op() is not None
                    picked = ("column-major" if column_major_on_cpu(getattr(torch, dtype), rows, row_matmul)
                              else "row-major")
                    moved = restride(engine, to_column_major=layout == "column-major")
                    print(f"{backend} {dtype} {mode}: {moved} weights restrided to {layout}", flush=True)
                    start = time.perf_counter()
                    engine.warm(greedy=True)
                    print(f"{backend} {dtype} {mode} {layout}: graphs ready in {time.perf_counter() - start:.1f} s",
                          flush=True)
                    engines[layout] = engine
                for domain in args.domains.split(","):
                    prompt_ids = [ids for ids in (engines["row-major"].encode(t)
                                                  for t in heldout_prompts(domain, args.prompts_per_domain))
                                  if len(ids) <= buckets[-1]]
                    summary = run_interleaved(engines, prompt_ids, args.max_new_tokens, args.repeats)
                    column, row_major = summary["column-major"], summary["row-major"]
                    row = {"backend": backend, "dtype": dtype, "mode": mode, "domain": domain,
                           "column_major_tokens_per_s": column["tokens_per_s"],
                           "row_major_tokens_per_s": row_major["tokens_per_s"],
                           "column_major_speedup": statistics.median(
                               r / c for r, c in zip(row_major["group_time"], column["group_time"])),
                           "backend_picks": picked, "identical_outputs": column["outputs"] == row_major["outputs"]}
                    results["engines"].append(row)
                    print(f"{backend} {dtype} {mode} {domain}: column-major {row['column_major_tokens_per_s']:.1f} "
                          f"tok/s, row-major {row['row_major_tokens_per_s']:.1f} tok/s, column-major "
                          f"x{row['column_major_speedup']:.2f}, the backend picks {picked}, "
                          f"identical={row['identical_outputs']}", flush=True)
                del engines
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
    print("\n| dtype | weight [out, in] | rows | row-major ms | column-major ms |")
    print("|---|---|---|---|---|")
    for r in results["matmuls"]:
        print(f"| {r['dtype']} | {r['weight']} {r['shape']} | {r['rows']} | {r['row_major_ms']:.3f} | "
              f"{r['column_major_ms']:.3f} |")
    print("\n| backend | dtype | mode | domain | column-major tok/s | row-major tok/s | column-major speedup | "
          "the backend picks | identical greedy outputs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results["engines"]:
        print(f"| {r['backend']} | {r['dtype']} | {r['mode']} | {r['domain']} | {r['column_major_tokens_per_s']:.1f} | "
              f"{r['row_major_tokens_per_s']:.1f} | {r['column_major_speedup']:.2f}x | {r['backend_picks']} | "
              f"{r['identical_outputs']} |")


if __name__ == "__main__":
    main()
