"""Train a P-EAGLE (or EAGLE-3) drafter for a target, from data the target generates itself.

    python -m scripts.train_drafter --stage all --out neuron_peagle/drafters/smollm2-135m-instruct-peagle

Stages (each resumable, cached under --work-dir): `data` (the target answers the training prompts),
`features` (target features and last hidden states on those sequences), `train`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from neuron_peagle.default_model import cache_root


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="target directory (default: the embedded model)")
    parser.add_argument("--work-dir", type=Path, default=None, help="where data, features, checkpoints go")
    parser.add_argument("--out", type=Path, default=None, help="write the trained drafter here")
    parser.add_argument("--stage", choices=("data", "features", "train", "all"), default="all")
    parser.add_argument("--objective", choices=("peagle", "eagle3"), default="peagle")
    parser.add_argument("--prompts-per-source", type=int, default=350)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16, help="generation batch size")
    parser.add_argument("--generation-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="dtype of the target while it writes the responses (bfloat16 is ~2x faster on CPU)")
    parser.add_argument("--num-layers", type=int, default=1)
    parser.add_argument("--draft-vocab-size", type=int, default=8192)
    parser.add_argument("--depths", type=int, default=7, help="K trained: depth 0 + K-1 mask depths")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seconds", type=float, default=None, help="stop training after this long")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init-from", type=Path, default=None,
                        help="continue from this drafter directory (keeps its draft vocabulary)")
    parser.add_argument("--run-name", default=None, help="names this run's checkpoint and log in the work dir "
                        "(default: the objective); a checkpoint resumes only the run with the same settings")
    parser.add_argument("--threads", type=int, default=None)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from neuron_peagle.default_model import require_default_model
    from neuron_peagle.training.data import compute_features, generate_responses, read_examples
    from neuron_peagle.training.prompt_sets import load_prompts

    model_dir = args.model or require_default_model()
    work = args.work_dir or cache_root() / "training" / Path(model_dir).name
    responses = work / "responses.jsonl"
    if args.stage in ("data", "all"):
        from neuron_peagle.runtime.engine import Engine

        prompts = load_prompts("train")
        per_source: dict[str, int] = {}
        chosen = []
        for prompt in prompts:
            if per_source.get(prompt.source, 0) < args.prompts_per_source:
                per_source[prompt.source] = per_source.get(prompt.source, 0) + 1
                chosen.append(prompt)
        engine = Engine.from_pretrained(args.model, mode="plain", batch_size=args.batch_size, max_length=512,
                                        prefill_buckets=(64, 128, 256), dtype=args.generation_dtype)
        generate_responses(engine, chosen, responses, args.max_new_tokens)
    if args.stage in ("features", "all"):
        from neuron_peagle.models.target import TargetModel

        target = TargetModel.from_pretrained(model_dir, 512)
        compute_features(target, read_examples(responses), work / "features")
    if args.stage in ("train", "all"):
        from neuron_peagle.training.trainer import TrainConfig, train

        config = TrainConfig(objective=args.objective, num_layers=args.num_layers,
                             draft_vocab_size=args.draft_vocab_size, depths=args.depths, epochs=args.epochs,
                             lr=args.lr, seconds=args.seconds, seed=args.seed,
                             init_from=str(args.init_from) if args.init_from else None, run_name=args.run_name)
        train(model_dir, work, config, args.out)


if __name__ == "__main__":
    main()
