"""`neuron-peagle` command line: a thin layer over `Engine`.

    neuron-peagle generate "prompt" [--json] [--model DIR] [--max-new-tokens N] ...
    neuron-peagle generate --prompts-file prompts.jsonl --batch-size 4 --json
    neuron-peagle generate "prompt" --artifacts DIR --json    (graphs built by `python -m compile.build`)
    neuron-peagle profile "prompt" --out DIR [generate's options]  (a profiler session: neuron_peagle.profiling)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from neuron_peagle.backends import BACKEND_HELP, NEURON_BACKENDS
from neuron_peagle.config import DEFAULT_BACKEND, DEFAULT_LOOKUP_NGRAM, DEFAULT_SHORT_DRAFT_TOKENS, KERNEL_MODES
from neuron_peagle.errors import NeuronPeagleError


def _buckets(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"buckets must be comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neuron-peagle", description="P-EAGLE speculative decoding")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text for one prompt or a file of prompts")
    _add_engine_options(gen)
    gen.add_argument("--json", action="store_true", help="print one JSON object per prompt per line")
    gen.add_argument("--tp-degree", type=int, default=1, metavar="N",
                     help="shard the target over N processes (eager backend; run under `torchrun "
                          "--nproc-per-node N`; rank 0 prints)")
    prof = sub.add_parser("profile", help="generate under the backend's profilers and write a profiler session")
    _add_engine_options(prof)
    prof.set_defaults(tp_degree=1)  # a profiler session is one process
    prof.add_argument("--out", type=Path, required=True, help="session directory (session.json, steps.jsonl, "
                      "trace.json, ...; on neuron also the runtime's device profiles in DIR/neuron)")
    prof.add_argument("--no-warmup", action="store_true", help="profile the first generation too (compilation "
                      "and first-call costs included)")
    prof.add_argument("--no-trace", action="store_true", help="no torch.profiler trace: step times without its "
                      "per-operator overhead (session.json and steps.jsonl only, plus device profiles on neuron)")
    return parser


def _add_engine_options(gen: argparse.ArgumentParser) -> None:
    """The prompt, engine and sampling options `generate` and `profile` share."""
    gen.add_argument("prompt", nargs="?", help="the prompt (or use --prompts-file)")
    gen.add_argument("--prompts-file", type=Path, help='JSONL file, one {"prompt": ...} per line')
    gen.add_argument("--model", type=Path, default=None, help="Hugging Face model directory "
                     "(default: the embedded SmolLM2-135M-Instruct)")
    gen.add_argument("--drafter", type=Path, default=None, help="speculators-format P-EAGLE drafter "
                     "directory (default: the project's drafter for the default model)")
    gen.add_argument("--mode", default="parallel", choices=("plain", "sequential", "parallel"),
                     help="parallel = P-EAGLE (one drafter pass), sequential = EAGLE-style (K passes)")
    gen.add_argument("--num-speculative-tokens", "-k", type=int, default=7, help="K, drafts per step")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--batch-size", type=int, default=1)
    gen.add_argument("--max-length", type=int, default=1024, help="KV cache length (prompt + output)")
    gen.add_argument("--buckets", type=_buckets, default=(128, 512), help="prefill buckets, e.g. 128,512")
    gen.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    gen.add_argument("--backend", default=None, choices=tuple(BACKEND_HELP), metavar="NAME",
                     help="; ".join(f"{name}: {text}" for name, text in BACKEND_HELP.items())
                     + f" (default: {DEFAULT_BACKEND}, or eager with --tp-degree above 1)")
    gen.add_argument("--kernels", default="auto", choices=("auto", *KERNEL_MODES),
                     help="draft-pass kernels (auto: NKI on neuron and nxd, else PyTorch; interpreter: the kernel "
                          "source on the CPU interpreter, slow, eager only)")
    add_speculation_options(gen)
    gen.add_argument("--artifacts", type=Path, default=None, help="run the graphs compiled into DIR by "
                     "`python -m compile.build`; model, drafter, mode, K and shapes come from its manifest "
                     "(options left at their defaults take the manifest's values, others must match it)")
    gen.add_argument("--no-chat-template", action="store_true", help="feed the prompt text as it is")


def add_speculation_options(parser: argparse.ArgumentParser) -> None:
    """`--lookup-ngram`, `--short-draft-tokens` and `--datastore`, shared by `neuron-peagle` and
    `python -m compile.build` (which bakes them into its step graphs)."""
    parser.add_argument("--lookup-ngram", type=int, default=DEFAULT_LOOKUP_NGRAM, metavar="N",
                        help="speculative modes: where the last N tokens (or failing that N-1, ... 2) occurred "
                             "earlier in the sequence, draft the tokens that followed them instead of the "
                             "drafter's (default %(default)s; 0: the drafter alone; plain mode: ignored)")
    parser.add_argument("--short-draft-tokens", type=int, default=None, metavar="N",
                        help="adaptive K: steps whose context lookup found nothing to copy draft only N tokens "
                             f"(a second step graph), the others K (default {DEFAULT_SHORT_DRAFT_TOKENS} when "
                             "lookup is on, K is larger and there is no datastore; 0: every step drafts K)")
    parser.add_argument("--datastore", type=_datastore_choice, default="auto", metavar="{auto,on,off}",
                        help="with context lookup: where neither the sequence nor its lookup after the first "
                             "draft knows what follows, draft from the drafter's n-gram datastore of the "
                             "target's answers (auto, the default: where the drafter directory has one)")


def backend_of(args: argparse.Namespace) -> str:
    """--backend, or the default: the fastest exact CPU path, except that tensor parallelism runs on eager."""
    if args.backend is not None:
        return args.backend
    return "eager" if getattr(args, "tp_degree", 1) > 1 else DEFAULT_BACKEND


def _datastore_choice(value: str) -> bool | str:
    choices = {"auto": "auto", "on": True, "off": False}
    if value not in choices:
        raise argparse.ArgumentTypeError(f"expected auto, on or off, got {value!r}")
    return choices[value]


def _read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompts_file is None:
        if args.prompt is None:
            raise NeuronPeagleError("give a prompt or --prompts-file")
        return [args.prompt]
    if args.prompt is not None:
        raise NeuronPeagleError("give either a prompt or --prompts-file, not both")
    if not args.prompts_file.is_file():
        raise NeuronPeagleError(f"prompts file {str(args.prompts_file)!r} does not exist")
    prompts = []
    for number, line in enumerate(args.prompts_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            prompts.append(str(record["prompt"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise NeuronPeagleError(
                f'{args.prompts_file}:{number}: expected a JSON object with a "prompt" field'
            ) from None
    if not prompts:
        raise NeuronPeagleError(f"prompts file {str(args.prompts_file)!r} holds no prompt")
    return prompts


def speculation_options(mode: str, lookup_ngram: int, short_draft_tokens: int | None,
                        datastore: bool | str = "auto") -> dict:
    """The command lines' `--lookup-ngram`, `--short-draft-tokens` and `--datastore` as engine keyword
    arguments. Plain decoding drafts nothing, so none applies there. An unset short K (None) and an
    "auto" datastore are resolved where the drafter is known (runtime.drafter_choice.resolve_speculation);
    a value given is passed on, and checked."""
    if mode == "plain":
        return {"lookup_ngram": 0, "short_draft_tokens": 0, "datastore": False}
    return {"lookup_ngram": lookup_ngram, "short_draft_tokens": short_draft_tokens, "datastore": datastore}


# generate option -> the ArtifactRequest field it is checked against when running from artifacts
ARTIFACT_OPTIONS = {"model": "model_dir", "drafter": "drafter_dir", "backend": "backend", "mode": "mode",
                    "num_speculative_tokens": "num_speculative_tokens", "batch_size": "batch_size",
                    "max_length": "max_length", "buckets": "prefill_buckets", "dtype": "dtype",
                    "lookup_ngram": "lookup_ngram", "short_draft_tokens": "short_draft_tokens",
                    "datastore": "datastore"}


def _expected_by_options(args: argparse.Namespace) -> dict:
    """The artifact-related options the user changed from their defaults."""
    defaults = build_parser().parse_args(["generate"])
    return {field: getattr(args, option) for option, field in ARTIFACT_OPTIONS.items()
            if getattr(args, option) != getattr(defaults, option)}


def _engine_and_prompts(args: argparse.Namespace, quiet: bool):
    """The engine the options describe, the sampling parameters, and the prompts as checked token ids.
    Everything is checked before the first prompt runs, so an error never discards finished work."""
    from neuron_peagle.runtime.engine import Engine, SamplingParams

    prompts = _read_prompts(args)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed)
    if args.artifacts is not None and args.tp_degree != 1:
        raise NeuronPeagleError("--tp-degree shards a model loaded here; --artifacts holds graphs built "
                                "without tensor parallelism")
    if args.artifacts is not None:
        engine = Engine.from_compiled(args.artifacts, **_expected_by_options(args))
        if not quiet:
            print(f"[{engine.artifacts.describe()}]", flush=True)
    else:
        engine = Engine.from_pretrained(args.model, args.drafter, mode=args.mode,
                                        num_speculative_tokens=args.num_speculative_tokens,
                                        batch_size=args.batch_size, max_length=args.max_length,
                                        prefill_buckets=args.buckets, dtype=args.dtype, backend=backend_of(args),
                                        kernels=args.kernels, tp_degree=args.tp_degree,
                                        **speculation_options(args.mode, args.lookup_ngram,
                                                              args.short_draft_tokens, args.datastore))
    quiet = quiet or engine.target.tp.rank != 0  # under tensor parallelism, rank 0 speaks for all
    if engine.drafter is not None and not quiet:
        lookup = f", context lookup of up to {engine.build.lookup_ngram}-grams" if engine.build.lookup_ngram else ""
        if engine.build.short_draft_tokens:
            lookup += f", K={engine.build.short_draft_tokens} where it finds nothing"
        if engine.build.datastore:
            lookup += ", n-gram datastore"
        print(f"[{engine.mode} speculative decoding, K={engine.num_speculative_tokens}, "
              f"{engine.drafter.describe()}{lookup}; backend {engine.build.backend}, {engine.build.dtype}]", flush=True)
    elif not quiet:
        print(f"[plain decoding; backend {engine.build.backend}, {engine.build.dtype}]", flush=True)
    ids = [engine.encode(p, not args.no_chat_template) if p else [] for p in prompts]
    for i, prompt_ids in enumerate(ids):
        engine.validate(prompt_ids, params, i)
    if args.artifacts is None:  # from_compiled has warmed every graph already
        # Compile (or load) the graphs these prompts need now, so that no decode step waits on a compiler.
        engine.warm(greedy=params.temperature == 0, buckets={engine.build.bucket_for(len(p)) for p in ids})
    return engine, params, prompts, ids


def profile(args: argparse.Namespace) -> None:
    from neuron_peagle.profiling import NEURON_PROFILE_DIR, neuron_capture_env, profile_generation

    if args.out.exists() and not args.out.is_dir():
        raise NeuronPeagleError(f"--out {str(args.out)!r} is a file, not a session directory")
    if backend_of(args) in NEURON_BACKENDS or args.artifacts is not None:
        # Read by the Neuron runtime when it starts, so before the engine loads anything.
        os.environ.update(neuron_capture_env(args.out.resolve()))
    engine, params, _, ids = _engine_and_prompts(args, quiet=False)
    _, report = profile_generation(engine, ids, params, args.out.resolve(), warmup=not args.no_warmup,
                                   trace=not args.no_trace)
    print(report.describe(), flush=True)
    if engine.build.backend in NEURON_BACKENDS:
        print(f"device profiles: neuron-explorer view -d {args.out / NEURON_PROFILE_DIR}", flush=True)


def generate(args: argparse.Namespace) -> None:
    engine, params, prompts, ids = _engine_and_prompts(args, quiet=args.json)
    backend = engine.build.backend
    outputs = engine.generate(ids, params)
    if engine.target.tp.rank != 0:  # every rank decoded the same tokens; rank 0 prints them
        return
    for prompt, out in zip(prompts, outputs):
        if args.json:
            record = {"prompt": prompt, "prompt_ids": out.prompt_ids, "output_ids": out.output_ids,
                      "text": out.text, "model_dir": str(engine.model_dir), "backend": backend,
                      "mode": engine.mode, "lookup_ngram": engine.build.lookup_ngram,
                      "short_draft_tokens": engine.build.short_draft_tokens,
                      "datastore": engine.build.datastore,
                      "drafter": engine.drafter.describe() if engine.drafter is not None else None,
                      **out.stats.to_dict()}
            print(json.dumps(record), flush=True)
        else:
            print(out.text)
            accept = (f", acceptance length {out.stats.acceptance_length:.2f}"
                      if out.stats.num_draft_tokens else "")
            print(f"[{out.stats.num_new_tokens} tokens, {out.stats.tokens_per_s:.1f} tokens/s decode{accept}, "
                  f"{backend}, finish: {out.stats.finish_reason}]", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            generate(args)
        elif args.command == "profile":
            profile(args)
    except NeuronPeagleError as err:
        print(f"neuron-peagle: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
