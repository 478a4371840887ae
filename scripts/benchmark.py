"""Speculative decoding benchmark on held-out prompts: plain vs EAGLE-style sequential vs P-EAGLE, per backend.

    python -m scripts.benchmark --ks 3,5,7 --batch-sizes 1 --prompts-per-domain 8
    python -m scripts.benchmark --backends eager,inductor --modes sequential+datastore,parallel+datastore --ks 7
    python -m scripts.benchmark --modes parallel --ks 7 --compare-drafter <new drafter dir>   # old and new drafter

For each domain (code, math, chat; prompts the drafter never trained on) and batch size it runs, in
one process on the same prompts, plain decoding and each mode x K on every backend, taking turns
prompt group by prompt group (see `run_interleaved`). Compiled backends compile every graph the run
needs before it starts (`Engine.warm`, timed: the compile time of a cold process unless the
compiler's cache already holds the graphs). It reports acceptance length, acceptance per draft position,
decode tokens/s (prefill excluded; median over prompt groups) and the speedup over plain decoding
(median over prompt groups of plain's time / the mode's time on that group), checks that greedy
outputs are identical to plain decoding, and adds transformers' own greedy and prompt-lookup decoding
as outside baselines (batch 1, timed after the sweep: their ratios are less exact). Writes JSON and
PNG plots.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from neuron_peagle.files import atomic_path, atomic_write_text
from neuron_peagle.speculation import DEFAULT_LOOKUP_NGRAM, DEFAULT_SHORT_DRAFT_TOKENS, SpeculationConfig


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--drafter", type=Path, default=None, help="P-EAGLE drafter (default: the project's)")
    parser.add_argument("--sequential-drafter", type=Path, default=None,
                        help="drafter for sequential mode (default: the same as --drafter)")
    parser.add_argument("--compare-drafter", type=Path, default=None,
                        help="a second drafter: every speculative mode also runs with it, in the same interleaved "
                             "run (its rows are named mode@<its folder name>)")
    parser.add_argument("--domains", default="code,math,chat")
    parser.add_argument("--prompts-per-domain", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--ks", default="3,5,7")
    parser.add_argument("--modes", default="sequential,parallel",
                        help="speculative modes; a '+lookup' suffix (parallel+lookup) adds context lookup, "
                             "'+adaptive' adds lookup and K chosen per step by cost (of K, the short K and K = 0), "
                             "'+datastore' adds lookup and the drafter's n-gram datastore; they combine "
                             "(parallel+adaptive+datastore); without '+adaptive' every step drafts K")
    parser.add_argument("--lookup-ngram", type=int, default=DEFAULT_LOOKUP_NGRAM,
                        help="longest n-gram of the '+lookup' modes (default: the command line's, %(default)s)")
    parser.add_argument("--short-k", type=int, default=DEFAULT_SHORT_DRAFT_TOKENS,
                        help="the '+adaptive' modes' short K (default: the command line's, %(default)s); "
                             "their K from --ks is the long one (Ks at or below the short K are skipped)")
    parser.add_argument("--batch-sizes", default="1")
    parser.add_argument("--backends", default="eager", help="comma-separated backends (eager, inductor)")
    parser.add_argument("--prefill-buckets", default="128,512", help="prefill buckets; longer prompts are left out")
    parser.add_argument("--repeats", type=int, default=1,
                        help="times every engine decodes every prompt group (median time per group)")
    parser.add_argument("--max-length", type=int, default=768)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="dtype of target and drafter in every mode, and of the transformers baselines")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers baselines")
    parser.add_argument("--hf-dtypes", default=None,
                        help="comma-separated dtypes of the transformers baselines (default: --dtype); with several, "
                             "each speculative row is also compared with the fastest transformers greedy")
    parser.add_argument("--out", type=Path, default=Path("bench_out/spec.json"))
    return parser.parse_args()


def heldout_prompts(domain: str, count: int) -> list[str]:
    from neuron_peagle.training.prompt_sets import load_prompts

    return [p.text for p in load_prompts("heldout") if p.domain == domain][:count]


def run_interleaved(engines: dict[str, object], prompt_ids: list[list[int]], new_tokens: int,
                    repeats: int) -> dict[str, dict]:
    """Every engine on every group of prompts, the engines taking turns group by group (in an order that
    rotates), `repeats` times over. A slow spell of a noisy machine then falls on all engines alike,
    and each engine's speed on a group is compared with plain decoding's on the same group, minutes
    rather than a whole sweep apart. Per group, the decode time is the median over repeats."""
    from neuron_peagle.runtime.engine import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    names = list(engines)
    batch = next(iter(engines.values())).build.batch_size
    groups = [prompt_ids[first:first + batch] for first in range(0, len(prompt_ids), batch)]
    for engine in engines.values():
        engine.generate(prompt_ids[:1], SamplingParams(max_new_tokens=8, ignore_eos=True))  # warm-up
    outputs = {name: [None] * len(groups) for name in names}
    times = {name: [[] for _ in groups] for name in names}
    for repeat in range(repeats):
        for g, group in enumerate(groups):
            shift = (repeat + g) % len(names)
            for name in names[shift:] + names[:shift]:
                result = engines[name].generate(group, params)
                times[name][g].append(result[0].stats.decode_time_s)  # one decode loop for the whole group
                outputs[name][g] = outputs[name][g] or result
    group_time = {name: [statistics.median(t) for t in times[name]] for name in names}
    group_tokens = [sum(o.stats.num_decoded_tokens for o in group) for group in outputs[names[0]]]
    summaries = {}
    for name in names:
        stats = [o.stats for group in outputs[name] for o in group]
        steps = max(1, sum(s.num_steps for s in stats))
        k = stats[0].num_speculative_tokens
        summaries[name] = {
            "outputs": [o.output_ids for group in outputs[name] for o in group],
            "group_time": group_time[name],
            "tokens_per_s": statistics.median(n / t for n, t in zip(group_tokens, group_time[name])),
            "speedup": statistics.median(p / t for p, t in zip(group_time[names[0]], group_time[name])),
            "acceptance_length": statistics.mean(s.acceptance_length for s in stats),
            "acceptance_length_median": statistics.median(s.acceptance_length for s in stats),
            "acceptance_per_position": [statistics.mean(s.acceptance_per_position[j] for s in stats) for j in range(k)],
            "draft_ms_per_step": 1000 * sum(s.draft_time_s for s in stats) / steps,
            "verify_ms_per_step": 1000 * sum(s.verify_time_s for s in stats) / steps,
            "host_ms_per_step": 1000 * sum(s.host_time_s for s in stats) / steps,
        }
    return summaries


def hf_baselines(model_dir: Path, prompt_ids: list[list[int]], new_tokens: int, dtype: str) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    results = {}
    for name, extra in (("hf_greedy", {}), ("hf_prompt_lookup", {"prompt_lookup_num_tokens": 10})):
        rates = []
        for ids in prompt_ids:
            x = torch.tensor([ids])
            kwargs = dict(attention_mask=torch.ones_like(x), do_sample=False, pad_token_id=2, eos_token_id=None)
            with torch.no_grad():
                start = time.perf_counter()
                model.generate(x, max_new_tokens=1, **kwargs)
                prefill = time.perf_counter() - start
                start = time.perf_counter()
                out = model.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs, **extra)
                total = time.perf_counter() - start
            rates.append((out.shape[1] - len(ids) - 1) / max(1e-9, total - prefill))
        results[name] = {"tokens_per_s": statistics.median(rates)}
    return results


def plot(results: dict, out: Path) -> None:
    """One figure, a column per domain (smallest batch measured): the fraction of steps that accepted each
    draft position (top; the largest K of every speculative configuration) and the speedup over plain
    decoding against K (bottom). Written next to `out` as <stem>.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    domains = sorted({r["domain"] for r in rows})
    batch = min(r["batch_size"] for r in rows)
    fig, axes = plt.subplots(2, len(domains), figsize=(3.6 * len(domains), 6), squeeze=False, sharey="row")
    for column, domain in enumerate(domains):
        speculative = [r for r in rows if r["k"] and r["domain"] == domain and r["batch_size"] == batch]
        labels = sorted({f"{r['backend']} {r['mode']}" for r in speculative})
        top, bottom = axes[0][column], axes[1][column]
        for label in labels:
            mine = sorted((r for r in speculative if f"{r['backend']} {r['mode']}" == label), key=lambda r: r["k"])
            longest = mine[-1]
            top.plot(range(1, longest["k"] + 1), longest["acceptance_per_position"], marker="o", label=label)
            bottom.plot([r["k"] for r in mine], [r["speedup"] for r in mine], marker="o", label=label)
        top.set_title(f"{domain}, batch {batch}")
        top.set_xlabel("draft position")
        top.set_ylim(0, 1)
        bottom.axhline(1.0, color="grey", lw=0.8)
        bottom.set_xlabel("K (num_speculative_tokens)")
    axes[0][0].set_ylabel("steps accepting this position")
    axes[1][0].set_ylabel("speedup over plain decoding")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(out.with_suffix(".png")) as tmp:  # a stopped run never leaves half a figure
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def agreement(outputs: list[list[int]], reference: list[list[int]]) -> dict:
    """How far greedy outputs match plain decoding's: prompts identical, and the share of tokens before
    each output's first difference (bf16 verify passes round differently from one-token decode steps,
    so a near-tie can flip; in float32 every output is identical)."""
    prefix = sum(next((i for i, (a, b) in enumerate(zip(out, ref)) if a != b), min(len(out), len(ref)))
                 for out, ref in zip(outputs, reference))
    return {"identical_prompts": sum(out == ref for out, ref in zip(outputs, reference)),
            "common_prefix": prefix / max(1, sum(len(ref) for ref in reference))}


def split_mode(mode: str, lookup_ngram: int, short_k: int) -> tuple[str, dict]:
    """mode -> (drafting mode, SpeculationConfig fields): 'parallel' -> ('parallel', drafter alone); '+lookup' adds
    context lookup, '+adaptive' lookup and adaptive K, '+datastore' lookup and the drafter's n-gram
    datastore (suffixes combine: 'parallel+adaptive+datastore'). Without '+adaptive' every step drafts K."""
    base, *extras = mode.split("+")
    unknown = set(extras) - {"lookup", "adaptive", "datastore"}
    if unknown:
        raise SystemExit(f"unknown mode suffix {sorted(unknown)} in {mode!r}: '+lookup', '+adaptive', '+datastore'")
    return base, {"lookup_ngram": lookup_ngram if extras else 0,
                  "short_draft_tokens": short_k if "adaptive" in extras else 0,
                  "plain_step": "adaptive" in extras, "datastore": "datastore" in extras}


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from neuron_peagle.default_model import require_default_model
    from neuron_peagle.runtime.engine import Engine

    model_dir = args.model or require_default_model()
    ks = [int(k) for k in args.ks.split(",")]
    modes = args.modes.split(",")
    rows = []
    buckets = tuple(int(b) for b in args.prefill_buckets.split(","))
    common = dict(max_length=args.max_length, prefill_buckets=buckets, dtype=args.dtype)
    backends = args.backends.split(",")
    configs = [(mode, k) for mode in modes for k in ks
               if k > split_mode(mode, args.lookup_ngram, args.short_k)[1]["short_draft_tokens"]]
    domain_prompts: dict[str, list[list[int]]] = {}
    drafters = [("", None)] + ([(f"@{args.compare_drafter.name}", args.compare_drafter)] if args.compare_drafter else [])
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        engines, compile_s = {}, {}
        for backend in backends:
            engines[f"{backend} plain"] = Engine.from_pretrained(args.model, None, SpeculationConfig(mode="plain"),
                                                                 batch_size=batch_size, backend=backend, **common)
            for (mode, k), (tag, other) in itertools.product(configs, drafters):
                base_mode, options = split_mode(mode, args.lookup_ngram, args.short_k)
                drafter = other or (args.sequential_drafter if base_mode == "sequential" and args.sequential_drafter
                                    else args.drafter)
                speculation = SpeculationConfig(mode=base_mode, num_speculative_tokens=k, **options)
                engines[f"{backend} {mode}{tag} K={k}"] = Engine.from_pretrained(
                    args.model, drafter, speculation, batch_size=batch_size, backend=backend, **common)
        for name, engine in engines.items():
            start = time.perf_counter()
            engine.warm(greedy=True)
            compile_s[name] = time.perf_counter() - start
            if compile_s[name] > 0.5:
                print(f"b{batch_size} {name}: graphs ready in {compile_s[name]:.1f} s", flush=True)
        reference = f"{backends[0]} plain"
        for domain in args.domains.split(","):
            texts = heldout_prompts(domain, args.prompts_per_domain)
            prompt_ids = [ids for ids in (engines[reference].encode(t) for t in texts) if len(ids) <= buckets[-1]]
            domain_prompts[domain] = prompt_ids
            results = run_interleaved(engines, prompt_ids, args.max_new_tokens, args.repeats)
            base = results[reference]
            for name, result in results.items():
                backend, _, config = name.partition(" ")
                mode, _, k = config.partition(" K=")
                own_plain = results[f"{backend} plain"]
                row = {"domain": domain, "batch_size": batch_size, "backend": backend, "mode": mode,
                       "k": int(k) if k else 0, "dtype": args.dtype, "compile_s": round(compile_s[name], 1),
                       "drafter": engines[name].drafter.describe() if engines[name].drafter else None,
                       "identical": result["outputs"] == base["outputs"],
                       "speedup_vs_own_plain": statistics.median(
                           p / t for p, t in zip(own_plain["group_time"], result["group_time"])),
                       **agreement(result["outputs"], base["outputs"]),
                       **{key: v for key, v in result.items() if key not in ("outputs", "group_time")}}
                rows.append(row)
                print(f"{domain} b{batch_size} {name}: AL {row['acceptance_length']:.2f}, "
                      f"{row['tokens_per_s']:.1f} tok/s, x{row['speedup']:.2f} vs {reference}, "
                      f"x{row['speedup_vs_own_plain']:.2f} vs {backend} plain, identical={row['identical']} "
                      f"({row['identical_prompts']}/{len(prompt_ids)} prompts, "
                      f"{row['common_prefix']:.0%} of tokens before the first difference)", flush=True)
        del engines
    hf_dtypes = (args.hf_dtypes or args.dtype).split(",")
    for domain, prompt_ids in ({} if args.no_hf else domain_prompts).items():
        plain_rate = next(r["tokens_per_s"] for r in rows if r["domain"] == domain and r["mode"] == "plain"
                          and r["batch_size"] == 1)
        for hf_dtype in hf_dtypes:
            for name, value in hf_baselines(model_dir, prompt_ids[:4], args.max_new_tokens, hf_dtype).items():
                rows.append({"domain": domain, "batch_size": 1, "backend": "transformers", "mode": name, "k": 0,
                             "dtype": hf_dtype, "speedup": value["tokens_per_s"] / plain_rate, **value})
                print(f"{domain} {name} {hf_dtype}: {value['tokens_per_s']:.1f} tok/s", flush=True)
        greedy = [r for r in rows if r["domain"] == domain and r["mode"] == "hf_greedy"]
        fastest = max(greedy, key=lambda r: r["tokens_per_s"])
        for r in rows:
            if r["domain"] == domain and r["backend"] != "transformers":
                r["vs_fastest_hf_greedy"] = r["tokens_per_s"] / fastest["tokens_per_s"]
                r["fastest_hf_greedy"] = f"{fastest['tokens_per_s']:.1f} tok/s ({fastest['dtype']})"

    results = {"args": {k: str(v) for k, v in vars(args).items()}, "torch_threads": torch.get_num_threads(),
               "machine": platform.machine(), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
    plot(results, args.out)
    print(f"\n| domain | batch | backend | mode | K | acceptance length, mean (median) | tokens/s | vs {backends[0]} plain | "
          "vs own plain | identical prompts | graphs ready (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        al = (f"{r['acceptance_length']:.2f} ({r['acceptance_length_median']:.2f})" if "acceptance_length" in r
              else "-")
        own = f"{r['speedup_vs_own_plain']:.2f}x" if "speedup_vs_own_plain" in r else "-"
        print(f"| {r['domain']} | {r['batch_size']} | {r['backend']} | {r['mode']} | {r['k'] or '-'} | {al} | "
              f"{r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | {own} | {r.get('identical_prompts', '-')} | "
              f"{r.get('compile_s', '-')} |")
    if any("vs_fastest_hf_greedy" in r for r in rows):
        print("\n| domain | batch | backend | mode | K | tokens/s | transformers' faster greedy | vs it |\n|---|---|---|---|---|---|---|---|")
        for r in rows:
            if "vs_fastest_hf_greedy" in r:
                print(f"| {r['domain']} | {r['batch_size']} | {r['backend']} | {r['mode']} | {r['k'] or '-'} | "
                      f"{r['tokens_per_s']:.1f} | {r['fastest_hf_greedy']} | **{r['vs_fastest_hf_greedy']:.2f}x** |")


if __name__ == "__main__":
    main()
