"""`python -m compile.build` (console script `neuron-peagle-compile`): compile every graph an engine
needs into an artifact directory that `Engine.from_compiled` loads.

    python -m compile.build --out artifacts/ --backend inductor --batch-size 1 --prefill-buckets 128,512 -k 7

inductor / neuron (main environment; compile/compiled_build.py): torch.compile every planned graph
with the compiler's cache pointed into `<out>/compile_cache`, then write PyTorch's portable cache
artifacts and manifest.json. A rebuild finds unchanged graphs in that cache.

xla / nxd (the torch-xla environment):
1. Load the target (and drafter) exactly as the engine does, graphs placed on the XLA device.
2. Plan the graphs (compile/plan.py) and trace each one lazily: write its HLO text, audit it
   (compile/audit.py), fingerprint it. Nothing is compiled yet.
3. Compile only the graphs whose fingerprint is not in the previous manifest: on xla by running
   the graph once with torch-xla's persistent compilation cache in `<out>/xla_cache`; on nxd
   with neuronx-distributed (compile/nxd_build.py): every graph is traced as a key of one
   NxDModel, the stale ones compiled by neuronx-cc, and the NxDModel saved as `neuron/model.pt`,
   so that all graphs share one device copy of the weights, KV caches and speculative state.
   With `--tp-degree N` (nxd only) the target's decoder layers are put on neuronx-distributed's
   parallel layers first, under NxD's parallel state (neuron_peagle/backends/nxd_parallel.py): the
   graphs traced, audited and compiled are a rank's, and the NxDModel runs on N NeuronCores.
   Files of graphs no longer planned are removed.
4. Write manifest.json, last, with the sha256 of every file the loader reads. Every file is written
   whole or not at all (neuron_peagle.files). Progress shows on a tqdm bar and goes to
   compile_log.jsonl as it happens.

Every build must run in a fresh process: torch-xla fixes its persistent cache when it compiles its
first graph, and a compiler's cache directory must be set before it first compiles, so the build
refuses a process that already has.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from compile import audit
from neuron_peagle.runtime.manifest import (COMPILE_CACHE_DIR, HLO_DIR, LOG_NAME, MANIFEST_NAME, NEURON_DIR, PORTABLE_CACHE_FILE,
                              XLA_CACHE_DIR, GraphRecord, Manifest, TensorInfo, WeightsInfo, artifact_checksums,
                              fingerprint, installed_versions)
from neuron_peagle.runtime.graph_specs import TARGETS, GraphSpec, neuron_compiler_args, plan_graphs, trace_hlo
from neuron_peagle.backends.xla import XlaBackend, initialize_persistent_cache
from neuron_peagle.backends import BACKEND_HELP, COMPILE_BACKENDS
from neuron_peagle.cli import add_speculation_options, speculation_of
from neuron_peagle.cli_args import Parser, buckets, run
from neuron_peagle.config import BuildConfig, ModelConfig
from neuron_peagle.default_model import require_default_model
from neuron_peagle.errors import ArtifactError, ConfigError
from neuron_peagle.files import atomic_write_text, remove_stale_temporaries, temporary_of
from neuron_peagle.parallel import TensorParallel
from neuron_peagle.runtime.drafter_choice import DrafterChoice, choose_drafter
from neuron_peagle.runtime.artifacts import engine_for_build
from neuron_peagle.runtime.engine import Engine
from neuron_peagle.speculation import SpeculationConfig

ARTIFACT_BACKENDS = ("inductor", "neuron", "xla", "nxd")


@dataclass(frozen=True)
class BuildRequest:
    model_dir: Path
    drafter_dir: Path | None  # None: plain mode, or a random-init drafter
    out_dir: Path
    backend: str = "inductor"  # one of ARTIFACT_BACKENDS
    build: BuildConfig = field(default_factory=BuildConfig)  # shapes; its backend field is ignored
    speculation: SpeculationConfig = field(default_factory=SpeculationConfig)
    tp_degree: int = 1
    target: str = "trn1"

    def __post_init__(self) -> None:
        if self.backend not in ARTIFACT_BACKENDS:
            raise ConfigError(f"artifacts are built for backends {', '.join(ARTIFACT_BACKENDS)}, not {self.backend!r}")
        if isinstance(self.tp_degree, bool) or not isinstance(self.tp_degree, int) or self.tp_degree < 1:
            raise ConfigError(f"tp_degree must be >= 1, got {self.tp_degree}")
        if self.tp_degree > 1:
            self._check_tensor_parallel()
        neuron_compiler_args(self.target)  # validates the target

    def _check_tensor_parallel(self) -> None:
        """Sharded artifacts are NxD's (trn1), for a degree that splits the target's heads, KV heads and
        MLP width (checked on its config.json, before anything loads)."""
        if self.backend != "nxd":
            raise ConfigError(
                f"tensor-parallel artifacts (tp_degree {self.tp_degree}) are built for the nxd backend only "
                f"(neuronx-distributed's parallel layers, trn1), not {self.backend!r}; TorchNeuron and the CPU "
                "backends shard at run time instead: `torchrun --nproc-per-node N -m neuron_peagle.cli generate "
                "--tp-degree N`")
        config = ModelConfig.from_dir(self.model_dir)
        TensorParallel(self.tp_degree).check(config.num_attention_heads, config.num_key_value_heads,
                                             config.intermediate_size)



@dataclass
class BuildReport:
    compiled: list[str]
    up_to_date: list[str]
    removed: list[str]  # graphs of the previous manifest that are no longer planned
    xla_compilations: int  # graphs torch-xla compiled in this process
    seconds: float


@dataclass(frozen=True)
class _Traced:
    """What tracing one graph tells before anything is compiled."""

    spec: GraphSpec
    outputs: tuple[TensorInfo, ...]
    hlo_file: str
    hlo_sha256: str
    fingerprint: str
    audit: audit.AuditResult


class _Log:
    """compile_log.jsonl, appended and flushed per record, echoed above the progress bar."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: dict, line: str) -> None:
        record = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), **record}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        tqdm.write(line, file=sys.stderr)


def _trace(spec: GraphSpec, backend: XlaBackend, out: Path, versions: dict, weights: list[WeightsInfo | None],
           vocab_sizes: tuple[int, ...]) -> _Traced:
    hlo, outputs = trace_hlo(spec, backend)
    hlo_file = f"{HLO_DIR}/{spec.name}.hlo.txt"
    atomic_write_text(out / hlo_file, hlo)
    result = audit.audit_hlo(hlo, vocab_sizes)
    audit.check(spec.name, result, str(out / hlo_file))
    digest = hashlib.sha256(hlo.encode()).hexdigest()
    return _Traced(spec, TensorInfo.of_named(outputs), hlo_file, digest,
                   fingerprint(digest, spec.compiler_args, versions, weights), result)


def _record(item: _Traced, files: tuple[str, ...], compile_seconds: float) -> GraphRecord:
    spec = item.spec
    return GraphRecord(
        name=spec.name, kind=spec.kind, bucket=spec.bucket, greedy=spec.greedy,
        inputs=TensorInfo.of_named(spec.example_inputs),
        outputs=item.outputs, state=tuple(TensorInfo.of(n, t) for n, t in spec.state_buffers.items()),
        compiler_args=spec.compiler_args, hlo_file=item.hlo_file, hlo_sha256=item.hlo_sha256,
        fingerprint=item.fingerprint, files=files, compile_time_s=round(compile_seconds, 3),
        audit=item.audit.to_dict())


def _compile_xla(spec: GraphSpec, backend: XlaBackend, out: Path) -> list[str]:
    """Run the graph once, exactly as the engine does, so torch-xla compiles it into the persistent
    cache; returns the cache entries that appeared."""
    cache = out / XLA_CACHE_DIR
    before = _listing(cache)
    backend.run(spec.module, spec.example_inputs)
    return sorted(str(p.relative_to(out)) for p in _listing(cache) - before)


def _listing(folder: Path) -> set[Path]:
    return set(folder.iterdir()) if folder.is_dir() else set()


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


def _prune(out: Path, previous: Manifest | None, keep: set[str]) -> None:
    """Delete the files the previous build's manifest lists that no planned, up-to-date graph owns.
    Nothing else is deleted: a file no manifest of ours recorded is not the build's to remove."""
    if previous is None:
        return
    owned = {g.hlo_file for g in previous.graphs if g.hlo_file} | {f for g in previous.graphs for f in g.files}
    for name in sorted(owned - keep):
        path = out / name
        if Path(name).parts[0] not in (HLO_DIR, XLA_CACHE_DIR, NEURON_DIR) or not path.exists():
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


# What a build writes into its output directory (and an interrupted build may leave without a manifest),
# besides the temporary siblings of these files (`.manifest.json.tmp-<pid>`, neuron_peagle.files) that an
# interrupted write leaves behind; the ".tmp" names are those of builds before neuron_peagle.files.
OWN_ENTRIES = {MANIFEST_NAME, MANIFEST_NAME + ".tmp", LOG_NAME, HLO_DIR, XLA_CACHE_DIR, NEURON_DIR, COMPILE_CACHE_DIR,
               PORTABLE_CACHE_FILE, PORTABLE_CACHE_FILE + ".tmp"}


def is_own_entry(name: str) -> bool:
    """Whether an entry of an output directory is one a build writes, or the temporary of one."""
    return name in OWN_ENTRIES or temporary_of(name) in OWN_ENTRIES


def check_out_dir(out: Path) -> None:
    """Refuse an output that is a file, or a directory of someone else's: one that holds no manifest and
    files that no build writes. A build only ever writes into a new or empty directory, or one it built;
    in one it accepts, the temporaries a killed build left behind are removed."""
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"--out {out} is a file, not an artifact directory")
    if out.is_dir() and not (out / MANIFEST_NAME).is_file():
        foreign = sorted(p.name for p in out.iterdir() if not is_own_entry(p.name))
        if foreign:
            raise ArtifactError(f"{out} holds files of its own ({', '.join(foreign[:5])}"
                                f"{', ...' if len(foreign) > 5 else ''}) and no {MANIFEST_NAME}: it is not an artifact "
                                "directory, and the build writes only into a new or empty directory or one it built "
                                "before")
    if out.is_dir():
        remove_stale_temporaries(out)


def engine_for(request: BuildRequest, backend: str) -> Engine:
    """The engine the request describes, loaded exactly as `Engine.from_pretrained` loads it."""
    return engine_for_build(Engine, request.model_dir, request.drafter_dir, request.speculation, request.build,
                            backend)


def build_artifacts(request: BuildRequest) -> BuildReport:
    started = time.perf_counter()
    if request.backend == "nxd":
        # Before any work: the SDK (its parallel layers too), then everything runs under NxD's parallel
        # state, which tensor-parallel layers need while they are built, traced and sharded.
        from neuron_peagle.backends.nxd import require_sdk
        from neuron_peagle.backends.nxd_parallel import parallel_state

        require_sdk()
        check_out_dir(request.out_dir)
        with parallel_state(request.tp_degree):
            return _build_traced(request, started)
    check_out_dir(request.out_dir)
    if request.backend in COMPILE_BACKENDS:
        return _build_compiled(request, started)
    return _build_traced(request, started)


def _build_traced(request: BuildRequest, started: float) -> BuildReport:
    """xla / nxd: trace, audit and compile every planned graph (see the module docstring)."""
    out = request.out_dir
    (out / HLO_DIR).mkdir(parents=True, exist_ok=True)
    if request.backend != "nxd" and not initialize_persistent_cache(out / XLA_CACHE_DIR, readonly=False):
        raise ArtifactError(
            f"this process has already compiled XLA graphs, so torch-xla's persistent cache can no longer "
            f"be pointed at {out / XLA_CACHE_DIR}; run the build in a fresh process (python -m compile.build)"
        )
    versions = installed_versions(request.backend)
    engine = engine_for(request, "xla")
    backend: XlaBackend = engine.backend
    first_compile = backend.compile_count()
    model, drafter = WeightsInfo.of_dir(request.model_dir), _drafter_weights(engine.drafter)
    vocab_sizes = (engine.target.config.vocab_size,) + ((engine.drafter.config.draft_vocab_size,)
                                                        if engine.drafter else ())
    sharding = None
    if request.backend == "nxd" and request.tp_degree > 1:
        from neuron_peagle.backends.nxd_parallel import NxdTensorParallel

        # The target's layers on NxD's parallel layers before anything is traced: the HLO, its audit and
        # the NEFFs are those of a rank's graph.
        sharding = NxdTensorParallel.of(engine, request.tp_degree)
    specs = plan_graphs(engine.runner, neuron_compiler_args(request.target))
    if sharding is not None:
        sharding.persist_tables(specs)
    previous = _previous(out, request.backend)
    log = _Log(out / LOG_NAME)

    traced: list[_Traced] = []
    fresh: dict[str, GraphRecord] = {}
    for spec in tqdm(specs, desc="trace + audit", unit="graph", file=sys.stderr):
        item = _trace(spec, backend, out, versions, [model, drafter], vocab_sizes)
        traced.append(item)
        old = previous.graph(spec.name) if previous else None
        if old is not None and old.fingerprint == item.fingerprint and all((out / f).is_file() for f in old.files):
            fresh[spec.name] = old
            log.write({"event": "graph", "graph": spec.name, "status": "up to date"}, f"{spec.name}: up to date")
    _prune(out, previous, {t.hlo_file for t in traced} | {f for record in fresh.values() for f in record.files})

    records: list[GraphRecord] = []
    stale = [t for t in traced if t.spec.name not in fresh]
    neuron = None
    if request.backend == "nxd":
        from compile.nxd_build import NxdBuild

        neuron = NxdBuild(specs, out, sharding)
    bar = tqdm(total=len(stale), desc=f"compile ({request.backend})", unit="graph", file=sys.stderr)
    for item in traced:
        spec = item.spec
        if spec.name in fresh:
            files, seconds = fresh[spec.name].files, fresh[spec.name].compile_time_s
            if neuron is not None:
                neuron.reuse(spec)
        else:
            bar.set_postfix_str(spec.name)
            start = time.perf_counter()
            files = _compile_xla(spec, backend, out) if neuron is None else neuron.compile(spec)
            seconds = time.perf_counter() - start
            bar.update()
            log.write({"event": "graph", "graph": spec.name, "status": "compiled", "compile_s": round(seconds, 3)},
                      f"{spec.name}: compiled in {seconds:.1f} s")
        records.append(_record(item, tuple(files), seconds))
    bar.close()
    if neuron is not None:
        neuron.save()

    manifest = Manifest(
        backend=request.backend, versions=versions,
        build=dataclasses.replace(request.build, backend=request.backend), speculation=engine.speculation,
        tp_degree=request.tp_degree, target=request.target,
        model=model, drafter=drafter, graphs=tuple(records),
        audit_notes=tuple(audit.notes({t.spec.name: t.audit.findings for t in traced})),
        neuron_checkpoint=neuron.checkpoint if neuron is not None else (),
        checksums=artifact_checksums(out, records))
    manifest.save(out)
    planned = {s.name for s in specs}
    report = BuildReport(
        compiled=[t.spec.name for t in stale], up_to_date=list(fresh),
        removed=[g.name for g in previous.graphs if g.name not in planned] if previous else [],
        xla_compilations=backend.compile_count() - first_compile, seconds=time.perf_counter() - started)
    log.write({"event": "build", **dataclasses.asdict(report), "seconds": round(report.seconds, 2)},
              f"{len(specs)} graphs: {len(report.compiled)} compiled, {len(report.up_to_date)} up to date "
              f"({report.seconds:.1f} s); manifest in {out / 'manifest.json'}")
    return report


def _build_compiled(request: BuildRequest, started: float) -> BuildReport:
    """inductor / neuron: torch.compile every graph into the artifact directory's compile cache."""
    from compile.compiled_build import compile_graphs
    from neuron_peagle.runtime.compiled_artifacts import use_artifact_cache

    out = request.out_dir
    out.mkdir(parents=True, exist_ok=True)
    if not use_artifact_cache(out, request.backend):
        raise ArtifactError(f"this process has already compiled graphs with another compile cache, so "
                            f"{out / COMPILE_CACHE_DIR} would not receive them; run the build in a fresh process "
                            "(python -m compile.build)")
    versions = installed_versions(request.backend)
    engine = engine_for(request, request.backend)
    model, drafter = WeightsInfo.of_dir(request.model_dir), _drafter_weights(engine.drafter)
    previous = _previous(out, request.backend)
    log = _Log(out / LOG_NAME)
    records, compiled = compile_graphs(engine, out, versions, [model, drafter], log)
    manifest = Manifest(
        backend=request.backend, versions=versions, build=dataclasses.replace(request.build, backend=request.backend),
        speculation=engine.speculation, tp_degree=request.tp_degree,
        target=request.target, model=model, drafter=drafter, graphs=tuple(records), audit_notes=(),
        checksums=artifact_checksums(out, records))
    manifest.save(out)
    planned = {r.name for r in records}
    report = BuildReport(compiled=compiled, up_to_date=[r.name for r in records if r.name not in compiled],
                         removed=[g.name for g in previous.graphs if g.name not in planned] if previous else [],
                         xla_compilations=0, seconds=time.perf_counter() - started)
    log.write({"event": "build", **dataclasses.asdict(report), "seconds": round(report.seconds, 2)},
              f"{len(records)} graphs: {len(compiled)} compiled, {len(report.up_to_date)} from the compile cache "
              f"({report.seconds:.1f} s); manifest in {out / 'manifest.json'}")
    return report


def build_parser() -> Parser:
    parser = Parser(prog="neuron-peagle-compile", description=(
        "Trace, audit and compile every fixed-shape graph an engine needs into an artifact directory."))
    parser.add_argument("--out", type=Path, required=True, help="artifact directory (created or updated)")
    parser.add_argument("--model", type=Path, default=None, help="Hugging Face target directory "
                        "(default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--drafter", type=Path, default=None, help="speculators-format drafter directory "
                        "(default: the project's drafter for the default model, else a random-init one)")
    parser.add_argument("--backend", default="inductor", choices=ARTIFACT_BACKENDS, metavar="NAME",
                        help="; ".join(f"{name}: {BACKEND_HELP[name]}" for name in ARTIFACT_BACKENDS)
                        + " (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=1024, help="KV cache length (prompt + output)")
    parser.add_argument("--prefill-buckets", type=buckets, default=(128, 512), help="prefill buckets, e.g. 128,512")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--kernels", default="auto", choices=("auto", "reference", "nki"),
                        help="draft-pass kernels: NKI custom calls or plain PyTorch (auto: nki on neuron)")
    add_speculation_options(parser)  # as `neuron-peagle generate`, baked into the step graphs
    parser.add_argument("--tp-degree", type=int, default=1, metavar="N", help="tensor-parallel degree: nxd builds "
                        "graphs sharded over N NeuronCores (default 1)")
    parser.add_argument("--target", default="trn1", choices=TARGETS, help="neuronx-cc --target")
    return parser


def request_from_args(args: argparse.Namespace) -> BuildRequest:
    model_dir = args.model if args.model is not None else require_default_model()
    speculation = speculation_of(args)
    choice = None
    if not speculation.plain:
        choice = choose_drafter(model_dir, args.drafter, is_default_target=args.model is None)
    build = BuildConfig(batch_size=args.batch_size, max_length=args.max_length, prefill_buckets=args.prefill_buckets,
                        dtype=args.dtype, backend=args.backend, kernels=args.kernels)
    drafter_dir = choice.path if choice is not None else None
    return BuildRequest(model_dir, drafter_dir, args.out, args.backend, build,
                        speculation.resolved(choice is not None and choice.has_datastore), args.tp_degree, args.target)


def _build(args: argparse.Namespace, given: set[str]) -> int:
    build_artifacts(request_from_args(args))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run("neuron-peagle-compile", build_parser, argv, _build)


if __name__ == "__main__":
    sys.exit(main())
