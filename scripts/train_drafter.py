"""Train a P-EAGLE (or EAGLE-3) drafter for a target, from data the target generates itself.

    python -m scripts.train_drafter --stage all --out neuron_peagle/drafters/smollm2-135m-instruct-peagle

Stages (each resumable, cached under --work-dir): `data` (the target answers the training prompts;
the responses the repository keeps in training_data/ are taken first and the new ones stored back),
`features` (target features and last hidden states on those sequences), `train`. Outside `all`:
`corpus` (features of written text the target reads, in features_corpus/), `eval` (teacher-forced
per-depth accuracy of drafters on the target's own held-out responses, written to eval.json) and
`archive` (store the work directory's responses into the archive, after a data run was stopped).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from neuron_peagle.default_model import cache_root
from neuron_peagle.files import atomic_write_text
from neuron_peagle.speculation import SpeculationConfig
from neuron_peagle.training.objective import WEIGHTINGS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ARCHIVE_DIR = Path(__file__).resolve().parents[1] / "training_data"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="target directory (default: the embedded model)")
    parser.add_argument("--work-dir", type=Path, default=None, help="where data, features, checkpoints go")
    parser.add_argument("--out", type=Path, default=None, help="write the trained drafter here")
    parser.add_argument("--stage", choices=("data", "features", "corpus", "train", "eval", "archive", "all"),
                        default="all")
    parser.add_argument("--archive", type=Path, default=None,
                        help="the repository's response archive (default: training_data/<model name>.jsonl.gz); "
                             "'none' leaves it alone")
    parser.add_argument("--objective", choices=("peagle", "eagle3"), default="peagle")
    parser.add_argument("--prompts-per-source", type=int, default=350)
    parser.add_argument("--interleave", action="store_true",
                        help="data stage: answer the sources in turn (one prompt of each), so a run stopped early "
                             "still holds every source")
    parser.add_argument("--sources", default=None,
                        help="comma-separated training prompt sources, answered in this order (default: all, "
                             "in the packaged order); see neuron_peagle.training.prompt_sets")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--sample", type=int, default=0,
                        help="data stage: 0 answers greedily; n >= 1 writes each prompt's n-th sampled answer "
                             "(seed n, --temperature, --top-p), kept beside the greedy one")
    parser.add_argument("--temperature", type=float, default=0.8, help="data stage with --sample: temperature")
    parser.add_argument("--top-p", type=float, default=0.95, help="data stage with --sample: nucleus")
    parser.add_argument("--batch-size", type=int, default=16, help="generation batch size")
    parser.add_argument("--generation-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="dtype of the target while it writes the responses (bfloat16 is ~2x faster on CPU)")
    parser.add_argument("--feature-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="dtype of the target while it computes features (stored in bfloat16 either way)")
    parser.add_argument("--corpus", default="reference,stdlib",
                        help="corpus stage: which written texts the target reads (neuron_peagle.training.corpus)")
    parser.add_argument("--corpus-tokens", type=int, default=300_000, help="corpus stage: response tokens in all")
    parser.add_argument("--feature-sets", default="features",
                        help="train stage: comma-separated feature folders of the work dir (features = the "
                             "target's own responses, features_corpus = the corpus stage)")
    parser.add_argument("--eval-drafters", default=None,
                        help="eval stage: comma-separated drafter directories (default: the project's drafter)")
    parser.add_argument("--num-layers", type=int, default=1)
    parser.add_argument("--draft-vocab-size", type=int, default=8192)
    parser.add_argument("--depths", type=int, default=7, help="K trained: depth 0 + K-1 mask depths")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seconds", type=float, default=None, help="stop training after this long")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="train stage: bfloat16 autocast (auto: where the CPU has bf16 matrix units)")
    parser.add_argument("--prompt-weight", type=float, default=0.0,
                        help="train stage: loss weight of the target's predictions of prompt tokens (response "
                        "tokens weigh 1; 0 learns the response only)")
    parser.add_argument("--depth-weighting", choices=WEIGHTINGS, default="depth",
                        help="train stage: 'depth' averages the loss within each depth and weighs the depths "
                        "alike (the P-EAGLE paper); 'element' is one mean over every element COD keeps "
                        "(speculators' P-EAGLE), so the first drafts weigh most")
    parser.add_argument("--depth-decay", type=float, default=None,
                        help="train stage: depth d weighted decay**d (default: the objective's, P-EAGLE 1, EAGLE-3 0.8)")
    parser.add_argument("--ce-weight", type=float, default=0.0,
                        help="train stage: each element's loss is (1 - w) x KL + w x the cross-entropy of the "
                        "target's top token (greedy acceptance is a top-1 match)")
    parser.add_argument("--feature-noise", type=float, default=0.0,
                        help="train stage: uniform noise on the target features, of half-width this x each feature "
                        "layer's median |value| (a regulariser: speculators adds noise too)")
    parser.add_argument("--freeze-head", action="store_true",
                        help="train stage: keep the drafter's head where it starts (speculators freezes it)")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="train stage: AdamW weight decay of the matrices")
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
    from neuron_peagle.training.prompt_sets import load_prompts, round_robin

    model_dir = args.model or require_default_model()
    work = args.work_dir or cache_root() / "training" / Path(model_dir).name
    responses = work / "responses.jsonl"
    archive = archive_path(args.archive, Path(model_dir))
    if args.stage in ("data", "archive", "all") and archive is not None:
        take_archive(archive, responses, model_dir)
    if args.stage in ("data", "all"):
        from neuron_peagle.runtime.engine import Engine

        prompts = load_prompts("train")
        if args.sources:
            order = args.sources.split(",")
            unknown = sorted(set(order) - {p.source for p in prompts})
            if unknown:
                raise SystemExit(f"unknown prompt sources {unknown}; known: {sorted({p.source for p in prompts})}")
            prompts = sorted((p for p in prompts if p.source in order), key=lambda p: order.index(p.source))
        by_source: dict[str, list] = {}
        for prompt in prompts:
            group = by_source.setdefault(prompt.source, [])
            if len(group) < args.prompts_per_source:
                group.append(prompt)
        chosen = round_robin(list(by_source.values())) if args.interleave else [
            p for group in by_source.values() for p in group]
        engine = Engine.from_pretrained(args.model, None, SpeculationConfig(mode="plain"), batch_size=args.batch_size,
                                        max_length=512, prefill_buckets=(64, 128, 256), dtype=args.generation_dtype)
        try:
            generate_responses(engine, chosen, responses, args.max_new_tokens, args.sample, args.temperature,
                               args.top_p)
        finally:  # what was answered before a stop is kept too
            if archive is not None:
                store_archive(archive, responses)
    if args.stage == "archive" and archive is not None:
        store_archive(archive, responses)
    if args.stage in ("features", "all"):
        from neuron_peagle.models.target import TargetModel

        target = TargetModel.from_pretrained(model_dir, 512, DTYPES[args.feature_dtype])
        compute_features(target, read_examples(responses), work / "features")
    if args.stage == "corpus":
        from neuron_peagle.models.target import TargetModel
        from neuron_peagle.tokenizer import encode_prompt, load_tokenizer
        from neuron_peagle.training.corpus import corpus_examples

        tokenizer = load_tokenizer(model_dir)
        end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        examples = corpus_examples(args.corpus.split(","), lambda text: encode_prompt(tokenizer, text),
                                   lambda text: encode_prompt(tokenizer, text, chat_template=False), end,
                                   args.corpus_tokens, max_sequence=384)
        target = TargetModel.from_pretrained(model_dir, 512, DTYPES[args.feature_dtype])
        compute_features(target, examples, work / "features_corpus")
    if args.stage in ("train", "all"):
        from neuron_peagle.training.trainer import TrainConfig, train

        config = TrainConfig(objective=args.objective, num_layers=args.num_layers,
                             draft_vocab_size=args.draft_vocab_size, depths=args.depths, epochs=args.epochs,
                             lr=args.lr, seconds=args.seconds, seed=args.seed,
                             init_from=str(args.init_from) if args.init_from else None, run_name=args.run_name,
                             feature_sets=tuple(args.feature_sets.split(",")), precision=args.precision,
                             prompt_weight=args.prompt_weight, depth_weighting=args.depth_weighting,
                             depth_decay=args.depth_decay, ce_weight=args.ce_weight, feature_noise=args.feature_noise,
                             freeze_head=args.freeze_head, weight_decay=args.weight_decay)
        train(model_dir, work, config, args.out)
    if args.stage == "eval":
        evaluate(args, model_dir, work)


def archive_path(given: Path | None, model_dir: Path) -> Path | None:
    """--archive: None -> the repository's archive for this model; 'none' -> no archive."""
    if given is None:
        return ARCHIVE_DIR / f"{model_dir.name}.jsonl.gz"
    return None if str(given).lower() == "none" else given


def take_archive(archive: Path, responses: Path, model_dir: Path) -> None:
    """Add the archive's responses (if there is one yet) to the work directory's."""
    from neuron_peagle.config import ModelConfig
    from neuron_peagle.training.archive import merge_archive

    if archive.is_file():
        added = merge_archive(archive, responses, ModelConfig.from_dir(model_dir).vocab_size)
        print(f"{archive.name}: {added} archived responses added to {responses}", flush=True)


def store_archive(archive: Path, responses: Path) -> None:
    """Store every response of the work directory (a superset of the archive's) in the archive."""
    from neuron_peagle.training.archive import write_archive
    from neuron_peagle.training.data import read_examples

    count = write_archive(read_examples(responses), archive)
    print(f"{archive.name}: {count} responses stored", flush=True)


def evaluate(args: argparse.Namespace, model_dir: Path, work: Path) -> None:
    """Teacher-forced per-depth accuracy of drafters on the target's own held-out responses."""
    import json

    from neuron_peagle.models.drafter_io import load_drafter
    from neuron_peagle.models.target import TargetModel
    from neuron_peagle.runtime.drafter_choice import DEFAULT_DRAFTER_DIR
    from neuron_peagle.runtime.engine import Engine
    from neuron_peagle.training.evaluate import (CONFIDENCE_BANDS, HELDOUT_DIR, build_heldout, format_accuracy,
                                                  heldout_accuracy)

    def make_engine() -> Engine:
        return Engine.from_pretrained(args.model, None, SpeculationConfig(mode="plain"), batch_size=8, max_length=768,
                                      dtype="bfloat16")

    target = TargetModel.from_pretrained(model_dir, 768)
    heldout = build_heldout(make_engine, target, work / HELDOUT_DIR, {"code": 16, "math": 8, "chat": 8}, 96)
    report = {}
    for name in (args.eval_drafters.split(",") if args.eval_drafters else [str(DEFAULT_DRAFTER_DIR)]):
        drafter = load_drafter(Path(name), target.config, 800, torch.float32)
        results = heldout_accuracy(drafter, target, heldout, args.depths)
        print(format_accuracy(name, results), flush=True)
        report[name] = {r.domain: {"accuracy": r.accuracy, "estimated_acceptance_length":
                                   r.estimated_acceptance_length, "positions": r.positions,
                                   "draft_vocab_coverage": r.vocab_coverage,
                                   "depth0_by_target_confidence": [
                                       {"band": list(band), "share": share, "accuracy": acc}
                                       for band, (share, acc) in zip(CONFIDENCE_BANDS, r.by_confidence)]}
                         for r in results}
    atomic_write_text(work / "eval.json", json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
