"""Start-up cost of the compiled CPU path: compiling cold, and starting from artifacts.

    python -m scripts.benchmark_startup --out bench_out/startup --repeats 2

Each measurement is a fresh process (as a user starts one), timed from outside:
1. `compile.build --backend inductor` into an empty artifact directory, with no compiler cache
   anywhere else to lean on (a cold compile of every planned graph);
2. `neuron-peagle generate --artifacts DIR` of one prompt, `repeats` times: loading every graph from
   the artifacts' compile cache, then decoding;
3. the same prompt with `--backend inductor` and an empty compiler cache (a first-time user without
   artifacts: the graphs it needs compile on the spot), and with `--backend eager` (nothing compiles).
Writes JSON and prints a Markdown table (median of the repeats where there are several).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from neuron_peagle.files import atomic_write_text

PROMPT = "Write a Python function that checks whether a number is prime."


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return seconds, done.stdout + done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench_out/startup"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--prefill-buckets", default="128")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    artifacts = args.out / "artifacts"
    if artifacts.exists():
        raise SystemExit(f"{artifacts} exists: give an --out that holds no artifacts, so the build is cold")
    shapes = ["--dtype", args.dtype, "--prefill-buckets", args.prefill_buckets]
    generate = [sys.executable, "-m", "neuron_peagle.cli", "generate", PROMPT, "--max-new-tokens",
                str(args.max_new_tokens)]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}  # the build sets its own
        seconds, _ = timed([sys.executable, "-m", "compile.build", "--backend", "inductor", "--out", str(artifacts),
                              *shapes], env)
        graphs = json.loads((artifacts / "manifest.json").read_text())["graphs"]
        rows.append({"what": f"compile.build, cold ({len(graphs)} graphs)", "seconds": [seconds]})
        loads = [timed([*generate, "--artifacts", str(artifacts)], env)[0] for _ in range(args.repeats)]
        rows.append({"what": "generate --artifacts (load every graph from the artifacts, then decode)", "seconds": loads})
        cold = []
        for i in range(args.repeats):
            cold_env = {**env, "TORCHINDUCTOR_CACHE_DIR": str(Path(scratch) / f"cold{i}")}
            cold.append(timed([*generate, "--backend", "inductor", *shapes], cold_env)[0])
        rows.append({"what": "generate --backend inductor, empty compiler cache (compile what it needs)",
                     "seconds": cold})
        eager = [timed([*generate, "--backend", "eager", *shapes], env)[0] for _ in range(args.repeats)]
        rows.append({"what": "generate --backend eager (nothing to compile)", "seconds": eager})
    for row in rows:
        row["median_s"] = round(statistics.median(row["seconds"]), 1)
    atomic_write_text(args.out / "startup.json", json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                             "rows": rows}, indent=2) + "\n")
    print("\n| process | wall time, s (median) | runs |")
    print("|---|---|---|")
    for row in rows:
        print(f"| {row['what']} | {row['median_s']} | {', '.join(f'{s:.1f}' for s in row['seconds'])} |")


if __name__ == "__main__":
    main()
