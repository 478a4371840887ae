"""Engines from compiled artifacts (`Engine.from_compiled`): check, then warm every graph.

Refused, each with an ArtifactError that names the problem, before any model is loaded:
- a package version differing from the one the graphs were compiled with;
- a weight or config file (target or drafter) whose sha256 is not the recorded one;
- a requested shape, mode or backend other than the one built.
Then the engine is built on the recorded settings and every planned graph is traced once: its
HLO must be the one built and audited (else the graph code changed since), and running it loads
the compiled graph, so generation itself compiles nothing.

The xla compiled form is torch-xla's persistent cache, which can only be set up before the
process compiles anything. Decision: if the process already has compiled XLA graphs with another
cache, the engine is still built, with a warning, and its graphs compiled in the process (the same
graphs, so the same output; only the start-up cost differs). Whether each graph was loaded or
compiled is in `engine.artifacts.graphs`. (PJRT CPU cannot deserialize executables, so on CPU
every graph is compiled at load; a trn instance loads them.)

The manifest format and the graph plan are the build's own (compile/), so that what is loaded is
planned and checked by the very code that built it.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from compile.manifest import XLA_CACHE_DIR, Manifest, WeightsInfo, installed_versions
from compile.plan import neuron_compiler_args, plan_graphs, trace_hlo
from neuron_peagle.backends.xla import XlaBackend, initialize_persistent_cache
from neuron_peagle.errors import ArtifactError

# How a graph reached the device at load, from torch-xla's counters.
LOADED = "loaded from the persistent cache"
UNLOADABLE = "compiled: this PJRT device cannot deserialize cached executables"
MISSING = "compiled: not in the persistent cache"
IN_PROCESS = "compiled earlier in this process"


@dataclass(frozen=True)
class ArtifactRequest:
    """What a caller expects of the artifacts; None takes the manifest's value. The model and
    drafter directories say where the weights are now (checked by sha256), the rest must match."""

    model_dir: Path | None = None
    drafter_dir: Path | None = None
    backend: str | None = None
    mode: str | None = None
    num_speculative_tokens: int | None = None
    batch_size: int | None = None
    max_length: int | None = None
    prefill_buckets: tuple[int, ...] | None = None
    dtype: str | None = None


@dataclass
class LoadReport:
    artifact_dir: Path
    cache: str  # "persistent cache in <dir>" or why the process compiles instead
    graphs: dict[str, str] = field(default_factory=dict)  # graph name -> LOADED | UNLOADABLE | ...

    def describe(self) -> str:
        counts: dict[str, int] = {}
        for status in self.graphs.values():
            counts[status] = counts.get(status, 0) + 1
        return f"{len(self.graphs)} graphs from {self.artifact_dir} ({self.cache}): " + "; ".join(
            f"{n} {status}" for status, n in counts.items())


def _check_versions(manifest: Manifest) -> None:
    installed = installed_versions(manifest.backend)
    wrong = [f"{name} {built} (installed: {installed.get(name) or 'none'})"
             for name, built in manifest.versions.items() if installed.get(name) != built]
    if wrong:
        raise ArtifactError("the artifacts were compiled with " + ", ".join(wrong)
                            + "; rebuild them with `python -m compile.build` in this environment")


def _check_request(manifest: Manifest, request: ArtifactRequest) -> None:
    built = {"backend": manifest.backend, "mode": manifest.mode,
             "num_speculative_tokens": manifest.num_speculative_tokens, "batch_size": manifest.build.batch_size,
             "max_length": manifest.build.max_length, "prefill_buckets": manifest.build.prefill_buckets,
             "dtype": manifest.build.dtype}
    wrong = []
    for name, value in built.items():
        asked = getattr(request, name)
        if asked is not None and (tuple(asked) if name == "prefill_buckets" else asked) != value:
            wrong.append(f"{name} {value} (requested: {asked})")
    if wrong:
        raise ArtifactError("the artifacts were built for " + ", ".join(wrong) + "; rebuild them for these shapes")


def _check_weights(info: WeightsInfo, directory: Path, kind: str) -> None:
    if not directory.is_dir():
        raise ArtifactError(f"the {kind} directory {directory} the artifacts were built from does not exist; "
                            f"pass where it is now")
    now = WeightsInfo.of_dir(directory).files
    for name in sorted(set(info.files) | set(now)):
        if name not in now:
            raise ArtifactError(f"{kind} file {directory / name} is missing (the artifacts were built with it)")
        if name not in info.files:
            raise ArtifactError(f"{kind} file {directory / name} was not there when the artifacts were built")
        if now[name] != info.files[name]:
            raise ArtifactError(f"{kind} file {directory / name} changed since the artifacts were built: "
                                f"sha256 {now[name][:16]}..., built with {info.files[name][:16]}...; rebuild them")


def _checked_dirs(manifest: Manifest, request: ArtifactRequest) -> tuple[Path, Path | None]:
    """Run every check that needs no model loaded; returns the model and drafter directories."""
    if manifest.backend == "neuron":
        from neuron_peagle.backends.neuron import require_sdk

        require_sdk()
    _check_versions(manifest)
    _check_request(manifest, request)
    model_dir = request.model_dir or Path(manifest.model.path)
    _check_weights(manifest.model, model_dir, "model")
    drafter_dir = None
    if manifest.drafter is not None and manifest.drafter.path is not None:
        drafter_dir = request.drafter_dir or Path(manifest.drafter.path)
        _check_weights(manifest.drafter, drafter_dir, "drafter")
    return model_dir, drafter_dir


def _warm(engine, manifest: Manifest, report: LoadReport) -> None:
    """Check each graph's HLO against the built one, then run it once as the engine does."""
    backend: XlaBackend = engine.backend
    specs = plan_graphs(engine.decoder, neuron_compiler_args(manifest.target))
    if sorted(s.name for s in specs) != sorted(g.name for g in manifest.graphs):
        raise ArtifactError(f"the engine needs graphs {sorted(s.name for s in specs)}, the artifacts hold "
                            f"{sorted(g.name for g in manifest.graphs)}; rebuild them")
    for spec in specs:
        hlo, _ = trace_hlo(spec, backend)
        record = manifest.graph(spec.name)
        if hashlib.sha256(hlo.encode()).hexdigest() != record.hlo_sha256:
            raise ArtifactError(f"graph {spec.name} now traces to a different HLO than the one built "
                                f"({report.artifact_dir / record.hlo_file}): the graph code changed since; rebuild")
        counts = {name: backend.counter(name) for name in
                  ("UncachedCompile", "PersistentCacheHit", "PersistentCacheDeserializeFailure")}
        backend.run(spec.module, spec.example_inputs)
        delta = {name: backend.counter(name) - before for name, before in counts.items()}
        if delta["PersistentCacheHit"]:
            report.graphs[spec.name] = LOADED
        elif not delta["UncachedCompile"]:
            report.graphs[spec.name] = IN_PROCESS
        else:
            report.graphs[spec.name] = UNLOADABLE if delta["PersistentCacheDeserializeFailure"] else MISSING


def load_engine(engine_cls, artifact_dir: Path, request: ArtifactRequest):
    manifest = Manifest.load(artifact_dir)
    model_dir, drafter_dir = _checked_dirs(manifest, request)
    if manifest.backend == "neuron":
        from neuron_peagle.backends.neuron import NOT_WIRED

        raise ArtifactError(NOT_WIRED)
    cache_dir = artifact_dir / XLA_CACHE_DIR
    if initialize_persistent_cache(cache_dir, readonly=True):
        report = LoadReport(artifact_dir, f"persistent cache in {cache_dir}")
    else:
        report = LoadReport(artifact_dir, "cache not usable: this process compiled XLA graphs before")
        warnings.warn(f"this process compiled XLA graphs before loading {artifact_dir}, so torch-xla's persistent "
                      "cache cannot be pointed at its xla_cache: every graph is compiled now instead; load "
                      "artifacts first thing in a process to skip that", RuntimeWarning, stacklevel=3)
    build = manifest.build
    engine = engine_cls.from_pretrained(model_dir, drafter_dir, mode=manifest.mode,
                                        num_speculative_tokens=manifest.num_speculative_tokens,
                                        batch_size=build.batch_size, max_length=build.max_length,
                                        prefill_buckets=build.prefill_buckets, dtype=build.dtype, backend="xla",
                                        kernels=build.kernels)
    _warm(engine, manifest, report)
    engine.artifacts = report
    return engine
