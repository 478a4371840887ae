"""`neuron-peagle` command line: a thin layer over `Engine`.

    neuron-peagle generate "prompt" [--json] [--model DIR] [--max-new-tokens N] ...
    neuron-peagle generate --prompts-file prompts.jsonl --batch-size 4 --json
    neuron-peagle generate "prompt" --artifacts DIR --json    (graphs built by `python -m compile.build`)
    neuron-peagle profile "prompt" --out DIR [generate's options]  (a profiler session: neuron_peagle.profiling)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import sys
from pathlib import Path

from neuron_peagle import checks
from neuron_peagle.cli_args import EXIT_INTERRUPTED, Parser, buckets, output_dir, run
from neuron_peagle.capabilities import BACKENDS, DEFAULT_BACKEND, KERNEL_MODES, capabilities_of
from neuron_peagle.config import BuildConfig, ModelConfig
from neuron_peagle.errors import ConfigError, PromptLineError
from neuron_peagle.prompt_files import STDIN, PromptLine, read_prompt_lines
from neuron_peagle.speculation import DEFAULT_SHORT_DRAFT_TOKENS, MODES, SpeculationConfig


def build_parser() -> Parser:
    parser = Parser(prog="neuron-peagle", description="P-EAGLE speculative decoding")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text for one prompt or a file of prompts")
    _add_engine_options(gen)
    gen.add_argument("--json", action="store_true", help="print one JSON object per prompt per line")
    gen.add_argument("--overlap-host", type=_on_off_auto, default="auto", metavar="{auto,on,off}",
                     help="read each decode step's tokens on a reader thread while the next step runs (same tokens, "
                          "one step of lag; auto, the default: on for neuron, off on CPU where it measured slower)")
    gen.add_argument("--tp-degree", type=int, default=1, metavar="N",
                     help="shard the target over N processes (the parallel plan: heads, width, experts; eager, inductor "
                          "and neuron backends; run under `torchrun --nproc-per-node N`; rank 0 prints)")
    prof = sub.add_parser("profile", help="generate under the backend's profilers and write a profiler session")
    _add_engine_options(prof)
    prof.set_defaults(tp_degree=1)  # a profiler session is one process
    prof.add_argument("--out", type=output_dir, required=True, help="session directory (session.json, steps.jsonl, "
                      "trace.json, ...; on neuron also the runtime's device profiles in DIR/neuron)")
    prof.add_argument("--no-warmup", action="store_true", help="profile the first generation too (compilation "
                      "and first-call costs included)")
    prof.add_argument("--no-trace", action="store_true", help="no torch.profiler trace: step times without its "
                      "per-operator overhead (session.json and steps.jsonl only, plus device profiles on neuron)")
    return parser


def _add_engine_options(gen: argparse.ArgumentParser) -> None:
    """The prompt, engine and sampling options `generate` and `profile` share."""
    gen.add_argument("prompt", nargs="?", help="the prompt (or use --prompts-file)")
    gen.add_argument("--prompts-file", type=Path, help='JSONL file, one {"prompt": ...} per line; - reads '
                     "standard input")
    add_model_options(gen)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--max-new-tokens", type=int, default=128)
    add_build_options(gen)
    gen.add_argument("--backend", default=None, choices=tuple(BACKENDS), metavar="NAME",
                     help="; ".join(f"{name}: {caps.help}" for name, caps in BACKENDS.items())
                     + f" (default: {DEFAULT_BACKEND})")
    add_speculation_options(gen)
    gen.add_argument("--artifacts", type=Path, default=None, help="run the graphs compiled into DIR by "
                     "`python -m compile.build`; model, drafter, mode, K and shapes come from its manifest "
                     "(options not given take the manifest's values; an option given must match it)")
    gen.add_argument("--no-chat-template", action="store_true", help="feed the prompt text as it is")
    gen.add_argument("--ignore-eos", action="store_true", help="do not stop at the model's end-of-sequence tokens "
                     "(always generate --max-new-tokens)")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Which target and drafter: shared by `neuron-peagle` and `python -m compile.build`."""
    parser.add_argument("--model", type=Path, default=None, help="Hugging Face model directory "
                        "(default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--drafter", type=Path, default=None, help="speculators-format P-EAGLE drafter "
                        "directory (default: the project's drafter for the default model, else a random-init one)")


def add_build_options(parser: argparse.ArgumentParser) -> None:
    """The graphs' shapes and kernels (BuildConfig's fields but the backend), shared by `neuron-peagle` and
    `python -m compile.build`."""
    default = BuildConfig()
    parser.add_argument("--batch-size", type=int, default=default.batch_size,
                        help="slots: requests decoded at once; a finished one's slot is refilled at once")
    parser.add_argument("--max-length", type=int, default=default.max_length, help="KV cache length (prompt + output)")
    parser.add_argument("--prefill-buckets", type=buckets, default=default.prefill_buckets,
                        help="prefill buckets, e.g. 128,512")
    parser.add_argument("--dtype", default=default.dtype, choices=("float32", "bfloat16"))
    parser.add_argument("--kernels", default="auto", choices=("auto", *KERNEL_MODES),
                        help="draft-pass kernels (auto: NKI on NeuronCores, else PyTorch; interpreter: the kernel "
                             "source on the CPU interpreter, slow, eager only)")
    parser.add_argument("--lnc", type=lnc_option, default="auto",
                        help="physical NeuronCores per logical core the graphs and kernels are built for: 1 or 2 "
                             "(auto: the Neuron runtime's on --backend neuron, NEURON_LOGICAL_NC_CONFIG or 1 on nxd, "
                             "1 off NeuronCores)")


def lnc_option(text: str) -> int | str:
    """--lnc: "auto", 1 or 2, exactly (whether 2 can run is BuildConfig's check)."""
    if text == "auto":
        return text
    if text in ("1", "2"):
        return int(text)
    raise argparse.ArgumentTypeError(f"must be auto, 1 or 2, got {text!r}")


def add_speculation_options(parser: argparse.ArgumentParser) -> None:
    """The fields of SpeculationConfig, with its defaults, shared by `neuron-peagle` and
    `python -m compile.build` (which bakes them into its step graphs)."""
    default = SpeculationConfig()
    parser.add_argument("--mode", default=default.mode, choices=MODES,
                        help="parallel = P-EAGLE (one drafter pass), sequential = EAGLE-style (K passes)")
    parser.add_argument("--num-speculative-tokens", "-k", type=int, default=default.num_speculative_tokens,
                        help="K, drafts per step")
    parser.add_argument("--lookup-ngram", type=int, default=default.lookup_ngram, metavar="N",
                        help="speculative modes: where the last N tokens (or failing that N-1, ... 2) occurred "
                             "earlier in the sequence, draft the tokens that followed them instead of the "
                             "drafter's (default %(default)s; 0: the drafter alone; plain mode: ignored)")
    parser.add_argument("--short-draft-tokens", type=int, default=None, metavar="N",
                        help="a second step graph drafting N tokens; before each step the K (of K, N and 0 with "
                             "--plain-step) that commits the most tokens per second is chosen, from measured step "
                             f"times and acceptance (default {DEFAULT_SHORT_DRAFT_TOKENS} where K is larger and "
                             "K is chosen by cost: on the CPU backends, at batch size > 1 on the others, or where "
                             "lookup is on without a datastore; 0: none)")
    parser.add_argument("--plain-step", type=_on_off_auto, default=default.plain_step, metavar="{auto,on,off}",
                        help="a K=0 step graph (plain decoding) the engine may choose where drafting does not pay "
                             "(auto, the default: on the CPU backends, and at batch sizes above 1 on the others)")
    parser.add_argument("--datastore", type=_on_off_auto, default=default.datastore, metavar="{auto,on,off}",
                        help="with context lookup: where neither the sequence nor its lookup after the first "
                             "draft knows what follows, draft from the drafter's n-gram datastore of the "
                             "target's answers (auto, the default: where the drafter directory has one)")


def backend_of(args: argparse.Namespace) -> str:
    """--backend, or the default: the fastest exact CPU path."""
    return args.backend if args.backend is not None else DEFAULT_BACKEND


def _on_off_auto(value: str) -> bool | str:
    choices = {"auto": "auto", "on": True, "off": False}
    if value not in choices:
        raise argparse.ArgumentTypeError(f"expected auto, on or off, got {value!r}")
    return choices[value]


def speculation_of(args: argparse.Namespace) -> SpeculationConfig:
    """The speculation options as a SpeculationConfig; in plain mode the drafting options do not apply."""
    if args.mode == "plain":
        return SpeculationConfig(mode="plain")
    return SpeculationConfig(mode=args.mode, num_speculative_tokens=args.num_speculative_tokens,
                             lookup_ngram=args.lookup_ngram, datastore=args.datastore,
                             short_draft_tokens=args.short_draft_tokens, plain_step=args.plain_step)


# generate option -> the ArtifactRequest field it is checked against when running from artifacts
ARTIFACT_OPTIONS = {"model": "model_dir", "drafter": "drafter_dir", "backend": "backend", "mode": "mode",
                    "num_speculative_tokens": "num_speculative_tokens", "batch_size": "batch_size",
                    "max_length": "max_length", "prefill_buckets": "prefill_buckets", "dtype": "dtype", "kernels": "kernels", "lnc": "lnc",
                    "lookup_ngram": "lookup_ngram", "short_draft_tokens": "short_draft_tokens",
                    "plain_step": "plain_step", "datastore": "datastore"}


def _check_paths(args: argparse.Namespace) -> None:
    """Every path option names what exists and is readable: a directory or a file, as the option needs."""
    for flag, path, want in (("--model", args.model, "directory"), ("--drafter", args.drafter, "directory"),
                             ("--artifacts", args.artifacts, "directory"), ("--prompts-file", args.prompts_file, "file")):
        if path is None or (want == "file" and str(path) == STDIN):
            continue
        problem = checks.utf8_problem(str(path))
        if problem or not path.exists():
            raise ConfigError(f"{flag} {str(path)!r} does not exist")
        if (want == "directory") != path.is_dir():
            raise ConfigError(f"{flag} {str(path)!r} is a {'directory' if path.is_dir() else 'file'}, not a {want}")
        if not os.access(path, os.R_OK | (os.X_OK if want == "directory" else 0)):
            raise ConfigError(f"{flag} {str(path)!r} is not readable")
    out = getattr(args, "out", None)
    if out is not None:
        from neuron_peagle.output_dirs import check_output_dir
        from neuron_peagle.profiling import SESSION

        check_output_dir(out, SESSION)


def _read_prompts(args: argparse.Namespace) -> list[PromptLine]:
    if args.prompts_file is None:
        if args.prompt is None:
            raise ConfigError("give a prompt or --prompts-file")
        return [PromptLine(checks.prompt_text(1, args.prompt), "the prompt")]
    if args.prompt is not None:
        raise ConfigError("give either a prompt or --prompts-file, not both")
    return read_prompt_lines(args.prompts_file)


def _request_params(base, lines: list[PromptLine]) -> list:
    """Each prompt's SamplingParams: the command line's, with its line's own settings in their place
    (checked here, every line before any model loads; an error names the line and the field)."""
    out = []
    for line in lines:
        try:
            out.append(dataclasses.replace(base, **line.options) if line.options else base)
        except ConfigError as err:
            raise PromptLineError(f"{line.where}: {err}") from None
    return out


def _artifact_request(args: argparse.Namespace, given: set[str]) -> dict:
    """What the options ask of artifacts: every option given, even at its default value ("auto" asks nothing)."""
    if args.tp_degree != 1:
        raise ConfigError("--tp-degree shards a model loaded here; --artifacts holds graphs built without "
                          "tensor parallelism")
    return {field: getattr(args, option) for option, field in ARTIFACT_OPTIONS.items()
            if option in given and getattr(args, option) != "auto"}


def _limits(args: argparse.Namespace, given: set[str]) -> tuple[Path, BuildConfig, int]:
    """The model directory, the built shapes and K the prompts must fit, known before any model loads:
    from the artifacts' manifest (checked against the options given), or from the options (checked here)."""
    from neuron_peagle.default_model import require_default_model

    if args.artifacts is not None:
        from neuron_peagle.runtime.manifest import Manifest
        from neuron_peagle.runtime.artifacts import ArtifactRequest, check_request

        manifest = Manifest.load(args.artifacts)
        check_request(manifest, ArtifactRequest(**_artifact_request(args, given)))
        model_dir = args.model if args.model is not None else Path(manifest.model.path)
        return model_dir, manifest.build, manifest.speculation.num_speculative_tokens
    checks.integer("tp_degree", args.tp_degree, minimum=1)
    speculation = speculation_of(args)
    build = BuildConfig(batch_size=args.batch_size, max_length=args.max_length, prefill_buckets=args.prefill_buckets,
                        dtype=args.dtype, backend=backend_of(args), kernels=args.kernels, lnc=args.lnc)
    speculation.check_fits(build.max_length)
    model_dir = args.model if args.model is not None else require_default_model()
    return model_dir, build, 0 if speculation.plain else speculation.num_speculative_tokens


def _encode_checked(args: argparse.Namespace, limits: tuple[Path, BuildConfig, int], prompts: list[str],
                    params: list) -> list[list[int]]:
    """The prompts as token ids, each checked against the shapes it will run in, before any model loads
    (only the tokenizer and config.json are read)."""
    from neuron_peagle.runtime.requests import RequestLimits, check_requests
    from neuron_peagle.tokenizer import encode_prompt, load_tokenizer

    model_dir, build, num_speculative_tokens = limits
    vocab_size = ModelConfig.from_dir(model_dir).vocab_size
    tokenizer = load_tokenizer(model_dir)
    ids = [encode_prompt(tokenizer, p, not args.no_chat_template) if p else [] for p in prompts]
    return check_requests(ids, [p.max_new_tokens for p in params], [p.stop_token_ids for p in params],
                          RequestLimits(build, num_speculative_tokens, vocab_size))


def _load_engine(args: argparse.Namespace, given: set[str], build: BuildConfig):
    from neuron_peagle.runtime.engine import Engine

    if args.artifacts is not None:
        return Engine.from_compiled(args.artifacts, **_artifact_request(args, given))
    return Engine.from_build(args.model, args.drafter, speculation_of(args), build, tp_degree=args.tp_degree)


def _engine_and_prompts(args: argparse.Namespace, given: set[str], quiet: bool):
    """The engine the options describe, each prompt's sampling parameters, and the prompts as checked token ids.
    Every option, file and prompt is checked before a model loads, so an error costs nothing and never
    discards finished work."""
    from neuron_peagle.runtime.engine import SamplingParams

    _check_paths(args)
    base = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed, ignore_eos=args.ignore_eos)
    lines = _read_prompts(args)
    params = _request_params(base, lines)
    prompts = [line.prompt for line in lines]
    limits = _limits(args, given)
    ids = _encode_checked(args, limits, prompts, params)
    engine = _load_engine(args, given, limits[1])
    quiet = quiet or engine.rank != 0  # under tensor parallelism, rank 0 speaks for all
    if not quiet:
        if engine.artifacts is not None:
            print(f"[{engine.artifacts.describe()}]", flush=True)
        print(f"[{_describe(engine)}]", flush=True)
    if args.artifacts is None:  # from_compiled has warmed every graph already
        # Compile (or load) the graphs these prompts need now, so that no decode step waits on a compiler.
        greedy = {p.temperature == 0 for p in params}
        engine.warm(greedy=greedy.pop() if len(greedy) == 1 else None,
                    buckets={engine.build.bucket_for(len(p)) for p in ids})
    return engine, params, prompts, ids


def _describe(engine) -> str:
    backend = f"backend {engine.build.backend}, {engine.build.dtype}"
    if engine.drafter is None:
        return f"plain decoding; {backend}"
    return f"{engine.speculation.describe()}, {engine.drafter.describe()}; {backend}"


def profile(args: argparse.Namespace, given: set[str]) -> int:
    from neuron_peagle.profiling import neuron_capture_env, profile_generation

    _check_paths(args)
    if capabilities_of(backend_of(args)).on_neuron_cores or args.artifacts is not None:
        # Read by the Neuron runtime when it starts, so before the engine loads anything.
        os.environ.update(neuron_capture_env(args.out.resolve()))
    engine, params, _, ids = _engine_and_prompts(args, given, quiet=False)
    _, report = profile_generation(engine, ids, params, args.out.resolve(), warmup=not args.no_warmup,
                                   trace=not args.no_trace)
    print(report.describe(), flush=True)
    return 0


class _Records:
    """Prints each prompt's record (text, or a JSON line) the moment it is finished, flushed, with Ctrl-C
    held back while a record is written, so a record is never cut in half."""

    def __init__(self, args: argparse.Namespace, engine, prompts: list[str]) -> None:
        self.args, self.engine, self.prompts = args, engine, prompts
        self.printed: set[int] = set()

    def write(self, index: int, out) -> None:
        if index in self.printed or self.engine.rank != 0:  # rank 0 prints for every rank
            return
        with _sigint_held():
            print(self._format(index, out), flush=True)
            self.printed.add(index)

    def _format(self, index: int, out) -> str:
        engine, number = self.engine, index + 1
        if self.args.json:
            build = engine.build
            return json.dumps({
                "prompt_number": number, "prompt": self.prompts[index], "prompt_ids": out.prompt_ids,
                "output_ids": out.output_ids, "text": out.text, "model_dir": str(engine.model_dir),
                "backend": build.backend, **engine.speculation.to_dict(),
                "drafter": engine.drafter.describe() if engine.drafter is not None else None,
                **out.stats.to_dict()})
        stats = out.stats
        accept = f", acceptance length {stats.acceptance_length:.2f}" if stats.num_speculative_tokens else ""
        which = f"prompt {number} of {len(self.prompts)}: " if len(self.prompts) > 1 else ""
        return (f"{out.text}\n[{which}{stats.num_new_tokens} tokens, {stats.tokens_per_s:.1f} tokens/s decode"
                f"{accept}, {engine.build.backend}, finish: {stats.finish_reason}]")


@contextlib.contextmanager
def _sigint_held():
    """Defer SIGINT until the block is done (then raise KeyboardInterrupt as it would have). A process
    started with SIGINT ignored (a background job of a non-interactive shell) keeps ignoring it."""
    pending: list[int] = []
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield
        return
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    except ValueError:  # not the main thread: nothing to hold
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending:
            raise KeyboardInterrupt


def generate(args: argparse.Namespace, given: set[str]) -> int:
    from neuron_peagle.runtime.engine import GenerationInterrupted

    engine, params, prompts, ids = _engine_and_prompts(args, given, quiet=args.json)
    records = _Records(args, engine, prompts)
    try:
        engine.generate(ids, params, on_output=records.write,
                        overlap_host=None if args.overlap_host == "auto" else args.overlap_host)
    except GenerationInterrupted as stop:
        for index in sorted(stop.outputs):  # finished, but held back for an earlier prompt still running
            records.write(index, stop.outputs[index])
        print(f"neuron-peagle: interrupted: {len(stop.outputs)} of {len(prompts)} prompts finished "
              f"(their records are printed)", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    return 0


def _command(args: argparse.Namespace, given: set[str]) -> int:
    from neuron_peagle.parallel import exit_rank, shutdown

    code = (generate if args.command == "generate" else profile)(args, given)
    if args.command == "generate" and args.tp_degree > 1 and code == 0:
        shutdown()  # every rank leaves the process group together (not after an error: others may be gone)
        exit_rank(code)
    return code


def main(argv: list[str] | None = None) -> int:
    return run("neuron-peagle", build_parser, argv, _command)


if __name__ == "__main__":
    sys.exit(main())
