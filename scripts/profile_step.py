"""Where a speculative step's time goes: draft / verify / accept / host, per design choice.

    python -m scripts.profile_step --dtypes float32,bfloat16 --ks 3,7 --layers 1,2 --draft-vocabs 8192,49152

The drafters are random (so nearly every draft is rejected and every step does the same work: one
committed token per step); what is measured is the cost of a step, not acceptance. With an acceptance
length AL, speculative decoding beats plain decoding when AL * plain_ms > step_ms: the `break-even
AL` column. Eager backend, batch 1, one prompt, on the default model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from neuron_peagle.files import atomic_write_text
from neuron_peagle.speculation import SpeculationConfig


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--ks", default="3,7")
    parser.add_argument("--layers", default="1", help="drafter decoder layers")
    parser.add_argument("--draft-vocabs", default="8192", help="draft vocabulary sizes")
    parser.add_argument("--steps", type=int, default=48, help="decode steps measured per configuration")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=768)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("bench_out/profile_step.json"))
    return parser.parse_args()


PROMPT = "Write a Python function that merges two sorted lists into one sorted list."


def measure(engine, steps: int, repeats: int) -> dict[str, float]:
    """Median over repeats of the per-step milliseconds of each part of the step."""
    from neuron_peagle.runtime.engine import SamplingParams

    params = SamplingParams(max_new_tokens=steps + 1, ignore_eos=True)
    engine.generate([PROMPT], SamplingParams(max_new_tokens=4, ignore_eos=True))  # warm-up
    runs = []
    for _ in range(repeats):
        stats = engine.generate([PROMPT], params)[0].stats
        per_step = lambda seconds: 1000 * seconds / stats.num_steps  # noqa: E731
        runs.append({"step_ms": per_step(stats.decode_time_s), "draft_ms": per_step(stats.draft_time_s),
                     "verify_ms": per_step(stats.verify_time_s), "accept_ms": per_step(stats.accept_time_s),
                     "host_ms": per_step(stats.host_time_s), "acceptance_length": stats.acceptance_length})
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def random_drafter_dir(root: Path, layers: int, draft_vocab: int) -> Path:
    from neuron_peagle.config import DrafterConfig, ModelConfig
    from neuron_peagle.default_model import require_default_model
    from neuron_peagle.models.drafter_io import save_drafter
    from neuron_peagle.models.target import default_feature_layers
    from neuron_peagle.runtime.drafter_choice import random_drafter

    target = ModelConfig.from_dir(require_default_model())
    config = DrafterConfig.for_target(target, default_feature_layers(target.num_hidden_layers), num_layers=layers,
                                      draft_vocab_size=draft_vocab)
    # d2t stays zero: the reduced vocabulary is the first `draft_vocab` target ids.
    return save_drafter(random_drafter(config, 64, seed=0), root / f"drafter_l{layers}_v{draft_vocab}")


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from neuron_peagle.runtime.engine import Engine

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes.split(","):
            common = dict(max_length=args.max_length, prefill_buckets=(128,), dtype=dtype)
            plain = measure(Engine.from_pretrained(speculation=SpeculationConfig(mode="plain"), **common), args.steps,
                            args.repeats)
            rows.append({"dtype": dtype, "mode": "plain", "k": 0, "layers": 0, "draft_vocab": 0, **plain})
            print(f"{dtype} plain: {plain['step_ms']:.1f} ms/step", flush=True)
            for layers in [int(x) for x in args.layers.split(",")]:
                for vocab in [int(x) for x in args.draft_vocabs.split(",")]:
                    drafter = random_drafter_dir(Path(tmp), layers, vocab)
                    for mode in ("parallel", "sequential"):
                        for k in [int(x) for x in args.ks.split(",")]:
                            speculation = SpeculationConfig(mode=mode, num_speculative_tokens=k, lookup_ngram=0,
                                                            datastore=False, short_draft_tokens=0)
                            engine = Engine.from_pretrained(None, drafter, speculation, **common)
                            result = measure(engine, args.steps, args.repeats)
                            row = {"dtype": dtype, "mode": mode, "k": k, "layers": layers, "draft_vocab": vocab,
                                   **result, "break_even_al": result["step_ms"] / plain["step_ms"]}
                            rows.append(row)
                            print(f"{dtype} {mode} K={k} layers={layers} vocab={vocab}: "
                                  f"{result['step_ms']:.1f} ms/step (draft {result['draft_ms']:.1f}, verify "
                                  f"{result['verify_ms']:.1f})", flush=True)
                            del engine
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                            "torch_threads": torch.get_num_threads(), "rows": rows}, indent=2) + "\n")
    print("\n| dtype | mode | K | drafter layers | draft vocab | step ms | draft | verify | accept | host "
          "| break-even AL |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        even = f"{r['break_even_al']:.2f}" if "break_even_al" in r else "-"
        print(f"| {r['dtype']} | {r['mode']} | {r['k'] or '-'} | {r['layers'] or '-'} | {r['draft_vocab'] or '-'} | "
              f"{r['step_ms']:.1f} | {r['draft_ms']:.1f} | {r['verify_ms']:.1f} | {r['accept_ms']:.1f} | "
              f"{r['host_ms']:.1f} | {even} |")


if __name__ == "__main__":
    main()
