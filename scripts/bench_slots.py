"""Continuous batching and K chosen by cost, measured: slots against fixed groups, P-EAGLE against plain
decoding at a full batch, and the K chosen per occupancy.

    python -m scripts.bench_slots --requests 64 --batch-size 8 --rounds 2

In one process, on the same held-out prompts (taken in turn from the code, math and chat domains),
with the command line's speculation defaults and build (bf16 on inductor unless told otherwise):
1. Mixed requests: `--requests` prompts, each with its own max_new_tokens drawn (seeded) from 16..256,
   greedy. The P-EAGLE engine and the plain engine each run them on slots (a freed slot is refilled at
   once) and in fixed groups of batch_size (the next group starts when the whole group is done: how
   `generate` ran before slots), taking turns, `--rounds` times. Reported per arm: requests/s and
   tokens/s (wall time of the whole run, prefills included; median over rounds) and the ratios.
2. Full batch: the first batch_size prompts, `--full-tokens` new tokens each (ignore_eos), P-EAGLE
   against plain decoding at the same batch size: decode tokens/s, median over rounds.
3. The K the P-EAGLE engine chose per step, by how many slots were occupied (from its step records).
Every greedy output must be the same in every arm and round (and equal plain decoding's). Compiling
happens before anything is timed (`Engine.warm`). Writes JSON and prints the tables.
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from neuron_peagle.files import atomic_write_text


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--min-new-tokens", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--full-tokens", type=int, default=128, help="new tokens per prompt of the full-batch runs")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--prefill-buckets", default="128,512")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("bench_out/slots.json"))
    return parser.parse_args()


def heldout(count: int, longest: int, encode) -> list[list[int]]:
    """`count` held-out prompts, domains in turn, chat template applied, none longer than `longest` tokens."""
    from neuron_peagle.training.prompt_sets import load_prompts

    by_domain = collections.defaultdict(list)
    for prompt in load_prompts("heldout"):
        by_domain[prompt.domain].append(prompt.text)
    picked: list[list[int]] = []
    queues = [iter(by_domain[d]) for d in ("code", "math", "chat")]
    while len(picked) < count:
        for queue in queues:
            ids = encode(next(queue))
            if len(ids) <= longest and len(picked) < count:
                picked.append(ids)
    return picked


def timed_run(engine, prompts, params, refill: bool) -> tuple[float, list[list[int]], list]:
    """Wall seconds of a whole run, the outputs in input order, and the step records."""
    from neuron_peagle.runtime.host_loop import Request, run_requests

    requests = [Request(ids, p.max_new_tokens, engine.stop_token_ids(p), p) for ids, p in zip(prompts, params)]
    records: list = []
    start = time.perf_counter()
    rows = run_requests(engine.runner, requests, on_step=records.append, refill=refill)
    return time.perf_counter() - start, [row.output_ids for row in rows], records


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from neuron_peagle.runtime.engine import Engine, SamplingParams
    from neuron_peagle.speculation import SpeculationConfig

    buckets = tuple(int(b) for b in args.prefill_buckets.split(","))
    shapes = dict(batch_size=args.batch_size, max_length=args.max_length, prefill_buckets=buckets, dtype=args.dtype,
                  backend=args.backend)
    engines = {"P-EAGLE": Engine.from_pretrained(speculation=SpeculationConfig(), **shapes),
               "plain": Engine.from_pretrained(speculation=SpeculationConfig(mode="plain"), **shapes)}
    ready = {}
    for name, engine in engines.items():
        start = time.perf_counter()
        engine.warm()
        engine.runner.calibrate()
        ready[name] = time.perf_counter() - start
    spec = engines["P-EAGLE"]
    rng = random.Random(args.seed)
    prompts = heldout(args.requests, buckets[-1], spec.encode)
    lengths = [rng.randint(args.min_new_tokens, args.max_new_tokens) for _ in prompts]
    mixed = [SamplingParams(max_new_tokens=n) for n in lengths]
    full = [SamplingParams(max_new_tokens=args.full_tokens, ignore_eos=True)] * args.batch_size

    times: dict[str, list[float]] = collections.defaultdict(list)
    tokens: dict[str, int] = {}
    outputs: dict[str, list] = {}
    chosen = collections.Counter()
    arms = [(f"{name} {'slots' if refill else 'groups'}", name, refill) for name in engines for refill in (True, False)]
    for round_ in range(args.rounds):
        order = arms if round_ % 2 == 0 else arms[::-1]
        for arm, name, refill in order:
            seconds, out, records = timed_run(engines[name], prompts, mixed, refill)
            times[arm].append(seconds)
            tokens[arm] = sum(map(len, out))
            if outputs.setdefault(arm, out) != out:
                raise SystemExit(f"{arm}: the outputs changed between rounds")
            if arm == "P-EAGLE slots":
                for record in records:
                    chosen[(sum(i is not None for i in record.requests), record.num_speculative_tokens)] += 1
        for name in (engines if round_ % 2 == 0 else list(engines)[::-1]):
            _, out, records = timed_run(engines[name], prompts[:args.batch_size], full, True)
            decode = sum(r.wall_s for r in records)
            times[f"{name} full batch"].append(sum(map(len, out)) / decode)
            outputs.setdefault(f"{name} full batch", out)
    reference = outputs["plain slots"]
    same = {arm: out == reference for arm, out in outputs.items() if "full batch" not in arm}
    same["P-EAGLE full batch"] = outputs["P-EAGLE full batch"] == outputs["plain full batch"]
    # Requests whose tokens are plain decoding's (bf16 rounds differently by shape: see the README).
    identical = {arm: sum(a == b for a, b in zip(out, reference if "full batch" not in arm else
                                                  outputs["plain full batch"]))
                 for arm, out in outputs.items()}

    mixed_rows = {}
    for arm, _, _ in arms:
        seconds = statistics.median(times[arm])
        mixed_rows[arm] = {"seconds": seconds, "requests_per_s": len(prompts) / seconds,
                           "tokens_per_s": tokens[arm] / seconds, "runs_s": times[arm]}
    full_rows = {name: statistics.median(times[f"{name} full batch"]) for name in engines}
    by_occupancy = collections.defaultdict(dict)
    for (occupied, k), n in sorted(chosen.items()):
        by_occupancy[occupied][k] = n
    report = {
        "command": vars(args) | {"out": str(args.out)}, "machine": platform.machine(), "threads": torch.get_num_threads(),
        "graphs_ready_s": ready, "requests": len(prompts), "new_tokens_requested": sum(lengths),
        "step_seconds": {str(k): v for k, v in spec.runner.chooser.step_seconds.items()},
        "mixed": mixed_rows, "full_batch_tokens_per_s": full_rows, "same_tokens_as_plain": same,
        "requests_identical_to_plain": identical,
        "k_by_occupancy": {str(o): {str(k): n for k, n in ks.items()} for o, ks in by_occupancy.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(report, indent=2))

    print(f"{len(prompts)} requests, max_new_tokens {args.min_new_tokens}..{args.max_new_tokens} "
          f"({sum(lengths)} requested), batch {args.batch_size}, {args.dtype} {args.backend}, {args.rounds} rounds")
    print("| engine | batching | requests/s | tokens/s | slots / groups | requests with plain's tokens |")
    print("|---|---|---|---|---|---|")
    for arm, name, refill in arms:
        row = mixed_rows[arm]
        ratio = row["tokens_per_s"] / mixed_rows[f"{name} groups"]["tokens_per_s"]
        print(f"| {name} | {'slots' if refill else 'groups'} | {row['requests_per_s']:.3f} | {row['tokens_per_s']:.1f} "
              f"| {ratio:.2f}x | {identical[arm]} of {len(prompts)} |")
    print(f"\nfull batch of {args.batch_size}, {args.full_tokens} tokens each: P-EAGLE "
          f"{full_rows['P-EAGLE']:.1f} tokens/s, plain {full_rows['plain']:.1f} tokens/s, "
          f"{full_rows['P-EAGLE'] / full_rows['plain']:.2f}x; requests with plain's tokens: "
          f"{identical['P-EAGLE full batch']} of {args.batch_size}")
    ks = sorted({k for ks in by_occupancy.values() for k in ks}, reverse=True)
    print("\nmeasured step seconds: " + ", ".join(f"K={k}: {v * 1000:.1f} ms"
                                               for k, v in spec.runner.chooser.step_seconds.items()))
    print("| occupied slots | " + " | ".join(f"steps with K={k}" for k in ks) + " |")
    print("|---|" + "---|" * len(ks))
    for occupied, counts in sorted(by_occupancy.items()):
        print(f"| {occupied} | " + " | ".join(str(counts.get(k, 0)) for k in ks) + " |")


if __name__ == "__main__":
    main()
