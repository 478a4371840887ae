"""A decode step against the machine's memory floor, and the host's share of it (a first cut of issue 36's table).

    python -m scripts.step_floor --dtype bfloat16 --backend inductor --batch-size 1

In one process: the streaming bandwidth of this machine's torch threads (a sum over a buffer the size of the
target's weights, median of repeats); the bytes one plain decode step must read (the target's weights and
the KV cache a compiled step reads: all of max_length) and so its floor in ms; then plain decoding and
P-EAGLE (the command line's defaults) on the same held-out prompts, with per step the wall time of the graph
call (the runner's `step`, StepRecord.wall_s) against the host loop's whole time per step (commit, stop
checks, callbacks, Python between steps). Prints one table; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from neuron_peagle.files import atomic_write_text


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=3, help="held-out code prompts")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--max-length", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path, default=Path("bench_out/step_floor.json"))
    return parser.parse_args()


def stream_bandwidth(nbytes: int, dtype: torch.dtype, repeats: int) -> float:
    """Bytes per second a full read of an `nbytes` buffer reaches (median over repeats)."""
    buffer = torch.ones(nbytes // dtype.itemsize, dtype=dtype)
    buffer.sum()  # fault the pages in
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        seconds.append(time.perf_counter() - start)
    return nbytes / statistics.median(seconds)


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers, a shared tensor (a tied head) counted once."""
    return sum({t.data_ptr(): t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers())}.values())


def decode_run(engine, prompts, new_tokens: int) -> dict:
    """Decode steps of a run: the graph call's ms (median) and the host loop's ms per step (total / steps)."""
    from neuron_peagle.runtime.engine import SamplingParams

    records = []
    start = time.perf_counter()
    outputs = engine.generate(prompts, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True),
                              on_step=records.append)
    total = time.perf_counter() - start
    prefill = sum(o.stats.prefill_time_s for o in outputs)
    step_ms = statistics.median(r.wall_s for r in records) * 1000
    loop_ms = (total - prefill) / len(records) * 1000
    tokens = sum(sum(r.kept) for r in records)
    return {"steps": len(records), "graph_call_ms": step_ms, "loop_ms_per_step": loop_ms,
            "host_share": 1 - sum(r.wall_s for r in records) / (total - prefill),
            "tokens_per_s": tokens / (total - prefill), "tokens_per_step": tokens / len(records)}


def op_split(engine, prompt, steps: int) -> list[tuple[str, float]]:
    """Self time per op name of one decode step (torch.profiler), ms, largest first: a run of `steps` decode
    steps less a run of its prefill alone, over `steps`."""
    from neuron_peagle.runtime.engine import SamplingParams

    def profiled(new_tokens: int) -> dict[str, float]:
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        engine.generate([prompt], params)  # every graph warm, every cache page touched
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            engine.generate([prompt], params)
        totals: dict[str, float] = {}
        for event in profiler.key_averages():
            name = "compiled graph (fused kernels)" if event.key.startswith("## Call CompiledFxGraph") else event.key
            if not name.startswith("peagle::"):
                totals[name] = totals.get(name, 0.0) + event.self_cpu_time_total / 1000
        return totals

    run, prefill = profiled(steps + 1), profiled(1)
    per_step = {name: (ms - prefill.get(name, 0.0)) / steps for name, ms in run.items()}
    return sorted(per_step.items(), key=lambda item: -item[1])


def main() -> None:
    args = parse_args()
    from neuron_peagle.runtime.engine import Engine
    from neuron_peagle.speculation import SpeculationConfig
    from neuron_peagle.training.prompt_sets import load_prompts

    shapes = dict(batch_size=args.batch_size, max_length=args.max_length, prefill_buckets=(128, 512),
                  dtype=args.dtype, backend=args.backend)
    plain = Engine.from_pretrained(speculation=SpeculationConfig(mode="plain"), **shapes)
    peagle = Engine.from_pretrained(speculation=SpeculationConfig(), **shapes)
    for engine in (plain, peagle):
        engine.warm(greedy=True)
    texts = [p.text for p in load_prompts("heldout") if p.domain == "code"][:args.prompts]
    prompts = [plain.encode(t) for t in texts]
    weights = tensor_bytes(plain.target) - tensor_bytes(plain.target.rotary)
    cache = plain.runner.cache
    kv = sum(t.numel() * t.element_size() for t in cache.buffers())  # a compiled step reads all of it
    bandwidth = stream_bandwidth(weights, plain.target.embed_tokens.weight.dtype, args.repeats)
    floor_ms = (weights + kv) / bandwidth * 1000
    runs = {"plain": decode_run(plain, prompts, args.max_new_tokens),
            "P-EAGLE": decode_run(peagle, prompts, args.max_new_tokens)}
    split = op_split(plain, prompts[0], 32)
    report = {"command": {k: str(v) for k, v in vars(args).items()}, "threads": torch.get_num_threads(),
              "plain_ops_ms_per_step": split,
              "weight_bytes": weights, "kv_bytes": kv, "bandwidth_gb_s": bandwidth / 1e9, "floor_ms": floor_ms,
              "floor_tokens_per_s": args.batch_size * 1000 / floor_ms, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(report, indent=2))
    print(f"{args.dtype} {args.backend}, batch {args.batch_size}, {torch.get_num_threads()} threads: weights "
          f"{weights / 1e6:.0f} MB + KV {kv / 1e6:.0f} MB at {bandwidth / 1e9:.1f} GB/s -> floor {floor_ms:.1f} ms "
          f"a plain step ({report['floor_tokens_per_s']:.1f} tokens/s)")
    print("| engine | runner step ms (graph call and its inputs, median) | host loop ms per step | host share | "
          "tokens/step | tokens/s | step / plain floor |")
    print("|---|---|---|---|---|---|---|")
    for name, run in runs.items():
        print(f"| {name} | {run['graph_call_ms']:.1f} | {run['loop_ms_per_step']:.1f} | {100 * run['host_share']:.1f}% "
              f"| {run['tokens_per_step']:.2f} | {run['tokens_per_s']:.1f} | "
              f"{run['graph_call_ms'] / floor_ms:.2f}x |")

    print("\nplain decode, self time per op in one step (torch.profiler: 32 steps less the prefill), ms:")
    print("| op | ms per step |\n|---|---|")
    for name, ms in split[:12]:
        print(f"| `{name}` | {ms:.2f} |")


if __name__ == "__main__":
    main()
