"""Two builds of the same engines side by side in one interleaved run (inductor, batch 1, greedy).

    python -m scripts.bench_variants --variant bf16-rounding --dtype bfloat16 --prompts-per-domain 8

Per variant, two builds (the current default first) of plain decoding and of P-EAGLE with the command
line's defaults, on the same held-out prompts, taking turns (scripts.benchmark.run_interleaved):
- bf16-rounding: inductor's default options (`INDUCTOR_OPTIONS`: none; the model rounds the residual
  stream entering each norm itself, `models.layers.rounded_float`) against `emulate_precision_casts`
  (every bf16 intermediate rounded where eager PyTorch rounds it, the default before).
A variant's builds must differ in what each engine is built or compiled with (its backend, its modules):
dynamo guards every module global a graph reads, so patching one between builds makes the first build's
graphs recompile, an error here.
Reports per domain and build: decode tokens/s of both engines, P-EAGLE's speedup over its own plain
decoding (median over prompts), its acceptance length, and on how many
prompts P-EAGLE's greedy output is token for token its own plain decoding's. Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from neuron_peagle.files import atomic_write_text
from neuron_peagle.speculation import SpeculationConfig


# variant -> its builds: (name, inductor options (None: the backend's default))
VARIANTS = {
    "bf16-rounding": (("norm input rounded", None), ("every cast emulated", {"emulate_precision_casts": True})),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=tuple(VARIANTS), required=True)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--domains", default="code,math,chat")
    parser.add_argument("--prompts-per-domain", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="default: bench_out/<variant>_<dtype>.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from neuron_peagle.backends.compiled import inductor_backend
    from neuron_peagle.config import BuildConfig
    from neuron_peagle.runtime.engine import Engine
    from scripts.benchmark import agreement, heldout_prompts, run_interleaved

    build = BuildConfig(batch_size=1, max_length=768, prefill_buckets=(128, 512), dtype=args.dtype, backend="inductor")
    builds = VARIANTS[args.variant]
    engines = {}
    for name, options in builds:
        for mode, speculation in (("plain", SpeculationConfig(mode="plain")), ("P-EAGLE", SpeculationConfig())):
            engine = Engine.from_build(None, None, speculation, build, backend=inductor_backend(options))
            engine.warm(greedy=True)
            engines[f"{name} {mode}"] = engine
    rows = []
    for domain in args.domains.split(","):
        reference = engines[f"{builds[0][0]} plain"]
        prompt_ids = [ids for ids in (reference.encode(t) for t in heldout_prompts(domain, args.prompts_per_domain))
                      if len(ids) <= build.prefill_buckets[-1]]
        results = run_interleaved(engines, prompt_ids, args.max_new_tokens, args.repeats)
        for name, _ in builds:
            plain, spec = results[f"{name} plain"], results[f"{name} P-EAGLE"]
            row = {"domain": domain, "build": name, "plain_tokens_per_s": plain["tokens_per_s"],
                   "peagle_tokens_per_s": spec["tokens_per_s"], "acceptance_length": spec["acceptance_length"],
                   "speedup_vs_own_plain": statistics.median(p / s for p, s in zip(plain["group_time"], spec["group_time"])),
                   "identical_prompts": agreement(spec["outputs"], plain["outputs"])["identical_prompts"],
                   "prompts": len(prompt_ids)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = args.out or Path(f"bench_out/{args.variant}_{args.dtype}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                       "torch_threads": torch.get_num_threads(), "rows": rows}, indent=2) + "\n")
    print(f"\n| domain | inductor {args.dtype} | plain tokens/s | P-EAGLE tokens/s | acceptance length | "
          "P-EAGLE vs own plain | P-EAGLE identical to plain |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['domain']} | {r['build']} | {r['plain_tokens_per_s']:.1f} | {r['peagle_tokens_per_s']:.1f} | "
              f"{r['acceptance_length']:.2f} | {r['speedup_vs_own_plain']:.2f}x | {r['identical_prompts']}/{r['prompts']} |")


if __name__ == "__main__":
    main()
