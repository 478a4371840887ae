"""Peak host memory and time of loading a target, measured by the loading process itself (its resident
set: VmRSS before, VmHWM after, from /proc/self/status), today's loader against a commit's, in one run.

The model is a random-weight Qwen3 of about 1.5B parameters (Qwen2.5-1.5B's shapes: hidden 1536, 28
layers, 12 heads, 2 KV heads, width 8960, vocabulary 151936, tied), built and saved in bfloat16 by
transformers the first time (about 3.1 GB). Each load runs in a fresh process; tensor parallelism runs
under torchrun, each rank reporting its own figures.

    python -m scripts.bench_loading [--baseline COMMIT] [--ranks 2] [--model-dir DIR]

prints a Markdown table: peak resident set over the process's own before loading (the loader's share),
that against the checkpoint's bf16 weight bytes, the absolute peak, and the load's seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DIR = REPO / ".bench" / "qwen3-1.5b-random-bf16"
SHAPE = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
             num_key_value_heads=2, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
             max_position_embeddings=4096)

# Run in a fresh process (cwd: the tree whose loader is measured); writes one JSON file per rank.
# argv: model_dir, "new" | "old", tp degree, output directory
CHILD = r"""
import json, os, sys, time
import torch

def status():
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out

model_dir, api, degree = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
from neuron_peagle.models.target import TargetModel
from neuron_peagle.parallel import TensorParallel
tp = TensorParallel.from_process_group(degree)
before = status()
start = time.perf_counter()
if api == "new":
    model = TargetModel.from_pretrained(model_dir, 512, torch.bfloat16, shard=tp.shard)
else:
    model = TargetModel.from_pretrained(model_dir, 512, torch.bfloat16, tp=tp)
seconds = time.perf_counter() - start
after = status()
params = {id(p): p for p in model.parameters()}.values()
held = sum(p.numel() * p.element_size() if not hasattr(p, "to_local") else p.to_local().numel() * p.element_size()
           for p in params)
with open(os.path.join(sys.argv[4], f"rank{tp.rank}.json"), "w") as out:
    json.dump({"rank": tp.rank, "before": before["VmRSS"], "peak": after["VmHWM"], "after": after["VmRSS"],
               "seconds": seconds, "held": held}, out)
if degree > 1:
    from neuron_peagle.parallel import exit_rank, shutdown
    shutdown()
    exit_rank(0)
"""


def make_model(model_dir: Path) -> None:
    """A random Qwen3 of ~1.5B parameters, saved in bfloat16 by transformers (once)."""
    if (model_dir / "config.json").is_file():
        return
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(**SHAPE, dtype="bfloat16")
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = Qwen3ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0, 0.02)
    model.save_pretrained(model_dir)
    from neuron_peagle.default_model import require_default_model

    source = require_default_model()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (source / name).is_file():
            (model_dir / name).write_bytes((source / name).read_bytes())


def measure(tree: Path, model_dir: Path, api: str, ranks: int) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // ranks))}
    out = Path(tempfile.mkdtemp())
    if ranks == 1:
        cmd = [sys.executable, "-c", CHILD, str(model_dir), api, "1", str(out)]
    else:
        script = out / "child.py"
        script.write_text(f"import sys; sys.path.insert(0, {str(tree)!r})\n" + CHILD)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               str(script), str(model_dir), api, str(ranks), str(out)]
    result = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise SystemExit(f"loading in {tree} ({api}, {ranks} ranks) failed:\n{result.stderr[-3000:]}")
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(ranks)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default=None, help="a commit whose loader to measure first (its API: tp=)")
    parser.add_argument("--ranks", type=int, default=2, help="tensor-parallel ranks for the sharded load")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_DIR)
    args = parser.parse_args(argv)
    make_model(args.model_dir)
    weights = sum(f.stat().st_size for f in args.model_dir.glob("*.safetensors"))
    runs: list[tuple[str, int, list[dict]]] = []
    with tempfile.TemporaryDirectory() as scratch:
        if args.baseline:
            tree = Path(scratch) / "baseline"
            subprocess.run(["git", "worktree", "add", "--detach", str(tree), args.baseline], cwd=REPO, check=True,
                           capture_output=True)
            try:
                runs.append((f"before ({args.baseline[:7]})", 1, measure(tree, args.model_dir, "old", 1)))
            finally:
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, capture_output=True)
        runs.append(("after", 1, measure(REPO, args.model_dir, "new", 1)))
        runs.append(("after", args.ranks, measure(REPO, args.model_dir, "new", args.ranks)))
    gb = 1e9
    print(f"checkpoint: {weights / gb:.2f} GB of bf16 weights in {args.model_dir.name}\n")
    print("| loader | ranks | rank | loader's peak (GB, over RSS before) | / bf16 weights | absolute peak (GB) "
          "| held after (GB) | load (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, ranks, results in runs:
        for r in results:
            own = r["peak"] - r["before"]
            print(f"| {name} | {ranks} | {r['rank']} | {own / gb:.2f} | {own / weights:.2f}x | {r['peak'] / gb:.2f} "
                  f"| {r['held'] / gb:.2f} | {r['seconds']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
