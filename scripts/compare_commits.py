"""Two commits side by side in one run: the same tokens, and the speed of each, for a change that must not
change behaviour (a refactor).

    python -m scripts.compare_commits --before 1a29134 --after HEAD --rounds 3 --prompts-per-domain 4

Each commit is checked out into a scratch worktree and driven through its own public API only
(`Engine.from_pretrained`, `generate`, the command line), so the two need not share any internal code:
1. `make run`'s job: `python -m compile.build --backend inductor --prefill-buckets 128` into a fresh
   artifact directory, then `neuron-peagle generate PROMPT --artifacts DIR --max-new-tokens 128 --json`:
   its token ids must be the same for both commits.
2. A P-EAGLE benchmark (the command line's speculation defaults, bf16 on inductor, batch 1, greedy) on
   held-out prompts: each round runs both commits, in fresh processes, taking turns (the order alternates
   from round to round, so a slow spell of the machine falls on both alike). Reported per commit: decode
   tokens/s per prompt (median over rounds), the median over prompts, and the ratio after / before; the
   token ids of every prompt must be the same for both commits and in every round.
Writes a JSON report and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAKE_RUN_PROMPT = "Write a Python function that checks whether a number is prime."

# Run inside a commit's worktree: its engine on held-out prompts; prints one JSON line.
WORKLOAD = r"""
import json, sys
from neuron_peagle.runtime.engine import Engine, SamplingParams
from neuron_peagle.training.prompt_sets import load_prompts

args = json.loads(sys.argv[1])
prompts = []
for domain in args["domains"]:
    prompts += [p.text for p in load_prompts("heldout") if p.domain == domain][: args["per_domain"]]
engine = Engine.from_pretrained(None, None, None, backend=args["backend"], dtype=args["dtype"], batch_size=1,
                                max_length=args["max_length"], prefill_buckets=tuple(args["buckets"]))
engine.warm(greedy=True)
params = SamplingParams(max_new_tokens=args["new_tokens"], ignore_eos=True)
ids = [engine.encode(p) for p in prompts]
ids = [p for p in ids if len(p) <= args["buckets"][-1]]
outputs = engine.generate(ids, params)
print(json.dumps({"tokens_per_s": [o.stats.tokens_per_s for o in outputs],
                  "acceptance_length": [o.stats.acceptance_length for o in outputs],
                  "output_ids": [o.output_ids for o in outputs]}))
"""


def worktree(revision: str, root: Path) -> Path:
    path = root / revision.replace("/", "_")
    subprocess.run(["git", "worktree", "add", "--detach", str(path), revision], cwd=REPO, check=True,
                   capture_output=True)
    return path


def run_workload(tree: Path, settings: dict) -> dict:
    result = subprocess.run([sys.executable, "-c", WORKLOAD, json.dumps(settings)], cwd=tree, capture_output=True,
                            text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{tree}: the workload failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def make_run_tokens(tree: Path, scratch: Path) -> list[int]:
    """`make run`'s main job in one commit's tree: build inductor artifacts, generate from them."""
    artifacts = scratch / f"artifacts-{tree.name}"
    subprocess.run([sys.executable, "-m", "compile.build", "--backend", "inductor", "--out", str(artifacts),
                    "--prefill-buckets", "128"], cwd=tree, check=True, capture_output=True)
    result = subprocess.run([sys.executable, "-m", "neuron_peagle.cli", "generate", MAKE_RUN_PROMPT, "--artifacts",
                             str(artifacts), "--max-new-tokens", "128", "--json"], cwd=tree, check=True,
                            capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["output_ids"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="git revision")
    parser.add_argument("--after", default="HEAD", help="git revision")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--domains", default="code,math,chat")
    parser.add_argument("--prompts-per-domain", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prefill-buckets", default="128,512")
    parser.add_argument("--max-length", type=int, default=768)
    parser.add_argument("--skip-make-run", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench_out/compare_commits.json"))
    args = parser.parse_args()
    settings = {"domains": args.domains.split(","), "per_domain": args.prompts_per_domain,
                "new_tokens": args.max_new_tokens, "backend": args.backend, "dtype": args.dtype,
                "buckets": [int(b) for b in args.prefill_buckets.split(",")], "max_length": args.max_length}
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        trees = {"before": worktree(args.before, scratch), "after": worktree(args.after, scratch)}
        try:
            report = {"before": args.before, "after": args.after, "settings": settings}
            if not args.skip_make_run:
                tokens = {name: make_run_tokens(tree, scratch) for name, tree in trees.items()}
                report["make_run_same_tokens"] = tokens["before"] == tokens["after"]
                report["make_run_tokens"] = len(tokens["after"])
            runs: dict[str, list[dict]] = {"before": [], "after": []}
            for round_index in range(args.rounds):
                order = ["before", "after"] if round_index % 2 == 0 else ["after", "before"]
                for name in order:
                    runs[name].append(run_workload(trees[name], settings))
                    print(f"round {round_index + 1}: {name} done", file=sys.stderr, flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, capture_output=True)
    reference = runs["before"][0]["output_ids"]
    report["same_tokens"] = all(run["output_ids"] == reference for name in runs for run in runs[name])
    for name in runs:
        per_prompt = [statistics.median(run["tokens_per_s"][i] for run in runs[name])
                      for i in range(len(reference))]
        report[name + "_tokens_per_s"] = per_prompt
        report[name + "_median_tokens_per_s"] = statistics.median(per_prompt)
        report[name + "_acceptance_length"] = statistics.median(runs[name][0]["acceptance_length"])
    ratios = [a / b for a, b in zip(report["after_tokens_per_s"], report["before_tokens_per_s"])]
    report["median_ratio_after_over_before"] = statistics.median(ratios)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"| commit | median decode tokens/s | median acceptance length |\n|---|---|---|\n"
          f"| before {args.before} | {report['before_median_tokens_per_s']:.2f} | "
          f"{report['before_acceptance_length']:.2f} |\n"
          f"| after {args.after} | {report['after_median_tokens_per_s']:.2f} | "
          f"{report['after_acceptance_length']:.2f} |\n"
          f"after / before (median over {len(ratios)} prompts of the per-prompt ratio): "
          f"{report['median_ratio_after_over_before']:.3f}; same tokens in every run: {report['same_tokens']}; "
          f"make run same tokens: {report.get('make_run_same_tokens')}")


if __name__ == "__main__":
    main()
