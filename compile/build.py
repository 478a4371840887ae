"""`python -m compile.build` (console script `neuron-peagle-compile`): compile every graph an engine
needs into an artifact directory that `Engine.from_compiled` loads.

    python -m compile.build --out artifacts/ --backend inductor --batch-size 1 --prefill-buckets 128,512 -k 7

1. Check the request (backend, tensor-parallel degree, neuronx-cc target), make the backend (a missing
   device stack is said before any work), and claim the output directory: a new or empty directory, or one
   a build made (its manifest names this tool), locked for the whole build (neuron_peagle.output_dirs).
2. Point the backend's compiler caches into the output directory (`Backend.use_artifacts`), then load the
   engine exactly as `Engine.from_pretrained` loads it, on that backend.
3. The backend builds every planned graph (`Backend.build_artifacts`; each backend's builder is in
   neuron_peagle/backends: compiled_artifacts.py for inductor and neuron, xla_artifacts.py for xla,
   nxd_artifacts.py for nxd), recompiling only what changed since the previous build into the same
   directory, and removing the files of graphs no longer planned.
4. Write manifest.json, last, with the sha256 of every file the loader reads. Every file is written whole
   or not at all (neuron_peagle.files). Progress shows on a tqdm bar and goes to compile_log.jsonl as it
   happens.

Every build must run in a fresh process: torch-xla fixes its persistent cache when it compiles its first
graph, and a compiler's cache directory must be set before it first compiles, so the build refuses a
process that already has.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from neuron_peagle.backends import get_backend
from neuron_peagle.backends.artifacts import TARGETS, ArtifactBuild, BuildLog, neuron_compiler_args
from neuron_peagle.cli import add_build_options, add_model_options, add_speculation_options, speculation_of
from neuron_peagle.cli_args import Parser, output_dir, run
from neuron_peagle.capabilities import BACKENDS, backends_that, capabilities_of
from neuron_peagle.config import BuildConfig, ModelConfig
from neuron_peagle.default_model import require_default_model
from neuron_peagle.errors import ArtifactError, ConfigError
from neuron_peagle.graphs.interface import plan
from neuron_peagle.output_dirs import check_output_dir, claim_output_dir
from neuron_peagle.parallel import TensorParallel
from neuron_peagle.runtime.drafter_choice import DrafterChoice
from neuron_peagle.runtime.engine import Engine
from neuron_peagle.runtime.manifest import (ARTIFACTS, LOG_NAME, MANIFEST_NAME, Manifest, WeightsInfo,
                                            artifact_checksums, installed_versions)
from neuron_peagle.speculation import SpeculationConfig


@dataclass(frozen=True)
class BuildRequest:
    model_dir: Path | None  # None: the embedded default model
    drafter_dir: Path | None  # None: the default model's drafter, plain mode, or a random-init drafter
    out_dir: Path
    backend: str = "inductor"  # one that builds artifacts (Capabilities.builds_artifacts)
    build: BuildConfig = field(default_factory=BuildConfig)  # shapes; its backend field is ignored
    speculation: SpeculationConfig = field(default_factory=SpeculationConfig)
    tp_degree: int = 1
    target: str = "trn1"

    def __post_init__(self) -> None:
        if not capabilities_of(self.backend).builds_artifacts:
            raise ConfigError(f"artifacts are built for backends {', '.join(backends_that('builds_artifacts'))}, "
                              f"not {self.backend!r}")
        if isinstance(self.tp_degree, bool) or not isinstance(self.tp_degree, int) or self.tp_degree < 1:
            raise ConfigError(f"tp_degree must be >= 1, got {self.tp_degree}")
        if self.tp_degree > 1:
            self._check_tensor_parallel()
        if self.build.backend != self.backend:  # the build's backend is this one: what "auto" means is its
            object.__setattr__(self, "build", dataclasses.replace(self.build, backend=self.backend, lnc="auto"))
        neuron_compiler_args(self.target, self.build.lnc)  # validates the target and its LNC

    def _check_tensor_parallel(self) -> None:
        """Sharded artifacts are NxD's (trn1), for a degree that splits the target's heads, KV heads and
        MLP width (checked on its config.json, before anything loads)."""
        if not capabilities_of(self.backend).shards_ahead_of_time:
            raise ConfigError(
                f"tensor-parallel artifacts (tp_degree {self.tp_degree}) are built for the "
                f"{' or '.join(backends_that('shards_ahead_of_time'))} backend only (neuronx-distributed's parallel "
                f"layers, trn1), not {self.backend!r}; TorchNeuron and the CPU backends shard at run time instead: "
                "`torchrun --nproc-per-node N -m neuron_peagle.cli generate --tp-degree N`")
        config = ModelConfig.from_dir(self.model_dir if self.model_dir is not None else require_default_model())
        TensorParallel(self.tp_degree).check(config)


@dataclass
class BuildReport:
    compiled: list[str]
    up_to_date: list[str]
    removed: list[str]  # graphs of the previous manifest that are no longer planned
    xla_compilations: int  # graphs torch-xla compiled in this process
    seconds: float


def _drafter_weights(choice: DrafterChoice | None) -> WeightsInfo | None:
    if choice is None:  # plain mode
        return None
    if choice.path is None:  # a random-init drafter: its seed makes its weights
        return WeightsInfo(None, random_seed=choice.seed)
    return WeightsInfo.of_dir(choice.path)


def _previous(out: Path, backend: str) -> Manifest | None:
    """The manifest of an earlier build into `out` for the same backend, if one is readable."""
    try:
        manifest = Manifest.load(out)
    except ArtifactError:
        return None
    return manifest if manifest.backend == backend else None


def build_artifacts(request: BuildRequest) -> BuildReport:
    """Build the request's artifacts into its output directory, which the build holds locked throughout
    (neuron_peagle.output_dirs: a new or empty directory, or one a build made)."""
    started = time.perf_counter()
    check_output_dir(request.out_dir, ARTIFACTS)  # whose directory it is: before anything else
    backend = get_backend(request.backend, request.tp_degree)  # a missing device stack: before any work
    with claim_output_dir(request.out_dir, ARTIFACTS) as out:
        return _build(request, backend, out, started)


def _build(request: BuildRequest, backend, out: Path, started: float) -> BuildReport:
    backend.use_artifacts(out, writable=True)
    engine = Engine.from_build(request.model_dir, request.drafter_dir, request.speculation, request.build,
                               backend=backend)
    model, drafter = WeightsInfo.of_dir(engine.model_dir), _drafter_weights(engine.drafter)
    vocab_sizes = (engine.target.config.vocab_size,) + ((engine.drafter.config.draft_vocab_size,)
                                                        if engine.drafter else ())
    previous = _previous(out, request.backend)
    log = BuildLog(out / LOG_NAME)
    planned = plan(engine.runner)
    versions = installed_versions(request.backend)
    built = backend.build_artifacts(planned, ArtifactBuild(
        out, versions, [model, drafter], vocab_sizes, neuron_compiler_args(request.target, request.build.lnc), previous, log))
    Manifest(backend=request.backend, versions=versions, build=engine.build,
             speculation=engine.speculation, tp_degree=request.tp_degree, target=request.target, model=model,
             drafter=drafter, graphs=tuple(built.records), audit_notes=built.audit_notes,
             neuron_checkpoint=built.neuron_checkpoint, checksums=artifact_checksums(out, built.records)).save(out)
    names = {g.name for g in planned}
    report = BuildReport(
        compiled=built.compiled, up_to_date=[g.name for g in planned if g.name not in built.compiled],
        removed=[g.name for g in previous.graphs if g.name not in names] if previous else [],
        xla_compilations=built.compilations, seconds=time.perf_counter() - started)
    log.write({"event": "build", **dataclasses.asdict(report), "seconds": round(report.seconds, 2)},
              f"{len(planned)} graphs: {len(report.compiled)} compiled, {len(report.up_to_date)} up to date or from "
              f"the compile cache ({report.seconds:.1f} s); manifest in {out / MANIFEST_NAME}")
    return report


def build_parser() -> Parser:
    parser = Parser(prog="neuron-peagle-compile", description=(
        "Trace, audit and compile every fixed-shape graph an engine needs into an artifact directory."))
    parser.add_argument("--out", type=output_dir, required=True, help="artifact directory (created or updated)")
    add_model_options(parser)
    choices = backends_that("builds_artifacts")
    parser.add_argument("--backend", default="inductor", choices=choices, metavar="NAME",
                        help="; ".join(f"{name}: {BACKENDS[name].help}" for name in choices) + " (default: %(default)s)")
    add_build_options(parser)
    add_speculation_options(parser)  # as `neuron-peagle generate`, baked into the step graphs
    parser.add_argument("--tp-degree", type=int, default=1, metavar="N", help="tensor-parallel degree: nxd builds "
                        "graphs sharded over N NeuronCores (default 1)")
    parser.add_argument("--target", default="trn1", choices=TARGETS, help="neuronx-cc --target")
    return parser


def request_from_args(args: argparse.Namespace) -> BuildRequest:
    build = BuildConfig(batch_size=args.batch_size, max_length=args.max_length, prefill_buckets=args.prefill_buckets,
                        dtype=args.dtype, backend=args.backend, kernels=args.kernels, lnc=args.lnc)
    return BuildRequest(args.model, args.drafter, args.out, args.backend, build, speculation_of(args), args.tp_degree,
                        args.target)


def _command(args: argparse.Namespace, given: set[str]) -> int:
    build_artifacts(request_from_args(args))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run("neuron-peagle-compile", build_parser, argv, _command)


if __name__ == "__main__":
    sys.exit(main())
