"""Engines from compiled artifacts (`Engine.from_compiled`): check, then load and warm every graph.

Refused, each with an ArtifactError that names the problem, before any model is loaded:
- a package version differing from the one the graphs were compiled with;
- a weight or config file (target or drafter) whose sha256 is not the recorded one;
- a requested shape, mode or backend other than the one built;
- a file of the artifacts (HLO, compiled graph, portable cache) missing or not as built (the
  manifest's `checksums`).
Then the engine is built on the recorded settings, its graphs planned by the build's own code
(compile/plan.py), and every planned graph must be one the artifacts hold.

xla: every graph is traced once: its HLO must be the one built and audited (else the graph code
changed since), and running it loads the compiled graph, so generation itself compiles nothing.
The compiled form is torch-xla's persistent cache, which can only be set up before the process
compiles anything. Decision: if the process already has compiled XLA graphs with another cache,
the engine is still built, with a warning, and its graphs compiled in the process (the same graphs,
so the same output; only the start-up cost differs). Whether each graph was loaded or compiled is
in `engine.artifacts.graphs`. (PJRT CPU cannot deserialize executables, so on CPU every graph is
compiled at load; a trn instance loads them.)

inductor / neuron (torch.compile): compile/compiled_build.py points the compiler's cache at the
artifacts' compile_cache before anything compiles, and warms every graph from it.

nxd: the graphs are the keys of one NxDModel (`neuron/model.pt`, backends/nxd.py). Each
planned graph must take the inputs and hold the state it was built with, and the weight dict made
from the engine's own modules (from the checked model directory) must have the recorded names,
shapes and dtypes; then the NxDModel gets that dict, goes onto the NeuronCore with one copy of
the weights and of every state buffer shared by all keys, and each graph is run once. The runners
then call it through the same host loop as on eager and xla. Built with a tp_degree N above 1, the
target is put on NxD's parallel layers as the build did (backends/nxd_parallel.py) and the whole
weight dict is split into N by NxD's `shard_checkpoint`, one per rank.

The manifest format and the graph plan are the build's own (compile/), so that what is loaded is
planned and checked by the very code that built it.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from neuron_peagle.runtime.manifest import (NEURON_MODEL_FILE, XLA_CACHE_DIR, Manifest, TensorInfo, WeightsInfo, installed_versions,
                              tensor_infos)
from neuron_peagle.runtime.graph_specs import GraphSpec, neuron_compiler_args, plan_graphs, trace_hlo
from neuron_peagle.backends import COMPILE_BACKENDS
from neuron_peagle.backends.xla import XlaBackend, initialize_persistent_cache
from neuron_peagle.checksums import find_mismatch
from neuron_peagle.config import resolve_kernels
from neuron_peagle.errors import ArtifactError

# How a graph reached the device at load, from torch-xla's counters.
LOADED = "loaded from the persistent cache"
UNLOADABLE = "compiled: this PJRT device cannot deserialize cached executables"
MISSING = "compiled: not in the persistent cache"
IN_PROCESS = "compiled earlier in this process"
ON_NEURON = "loaded onto the NeuronCore (a key of the NxDModel)"


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
    kernels: str | None = None  # "auto": what auto means on the artifacts' backend
    lookup_ngram: int | None = None
    short_draft_tokens: int | None = None
    datastore: bool | None = None


@dataclass
class LoadReport:
    artifact_dir: Path
    cache: str  # the compile cache used, or why the process compiles instead; nxd: the NxDModel
    graphs: dict[str, str] = field(default_factory=dict)  # graph name -> LOADED | UNLOADABLE | ... | ON_NEURON

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


def check_request(manifest: Manifest, request: ArtifactRequest) -> None:
    """Every setting the request asks for is the one the artifacts were built with."""
    built = {"backend": manifest.backend, **manifest.speculation.to_dict(), "batch_size": manifest.build.batch_size,
             "max_length": manifest.build.max_length, "prefill_buckets": manifest.build.prefill_buckets,
             "dtype": manifest.build.dtype, "kernels": manifest.build.kernels}
    wrong = []
    for name, value in built.items():
        asked = getattr(request, name)
        if name == "kernels" and asked is not None:
            asked = resolve_kernels(asked, manifest.backend)
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


def check_artifact_files(artifact_dir: Path, manifest: Manifest) -> None:
    """Every file the manifest records a sha256 for (what the loader reads) is there and as built."""
    mismatch = find_mismatch(artifact_dir, manifest.checksums)
    if mismatch is None:
        return
    if mismatch.actual is None:
        raise ArtifactError(f"artifact file {mismatch.path} is missing (the build wrote it); rebuild the artifacts "
                            "with `python -m compile.build`")
    raise ArtifactError(f"artifact file {mismatch.path} changed since the build (sha256 {mismatch.actual[:16]}..., "
                        f"built as {mismatch.expected[:16]}...): it was modified or corrupted; rebuild the artifacts "
                        "with `python -m compile.build`")


def _checked_dirs(artifact_dir: Path, manifest: Manifest, request: ArtifactRequest) -> tuple[Path, Path | None]:
    """Run every check that needs no model loaded; returns the model and drafter directories."""
    if manifest.backend == "nxd":
        from neuron_peagle.backends.nxd import require_sdk

        require_sdk()
    _check_versions(manifest)
    check_request(manifest, request)
    check_artifact_files(artifact_dir, manifest)
    model_dir = request.model_dir or Path(manifest.model.path)
    _check_weights(manifest.model, model_dir, "model")
    drafter_dir = None
    if manifest.drafter is not None and manifest.drafter.path is not None:
        drafter_dir = request.drafter_dir or Path(manifest.drafter.path)
        _check_weights(manifest.drafter, drafter_dir, "drafter")
    return model_dir, drafter_dir


def check_plan(specs: list[GraphSpec], manifest: Manifest) -> None:
    if sorted(s.name for s in specs) != sorted(g.name for g in manifest.graphs):
        raise ArtifactError(f"the engine needs graphs {sorted(s.name for s in specs)}, the artifacts hold "
                            f"{sorted(g.name for g in manifest.graphs)}; rebuild them")


def _checkpoint_difference(built: tuple[TensorInfo, ...], now: tuple[TensorInfo, ...]) -> str | None:
    before, after = {t.name: t for t in built}, {t.name: t for t in now}
    for name in sorted(set(before) | set(after)):
        if name not in after:
            return f"{name} is missing"
        if name not in before:
            return f"{name} was not there when they were built"
        if before[name] != after[name]:
            return (f"{name} is {list(after[name].shape)} {after[name].dtype}, built as "
                    f"{list(before[name].shape)} {before[name].dtype}")
    return None


def check_nxd_plan(specs: list[GraphSpec], manifest: Manifest, checkpoint: dict[str, Tensor]) -> None:
    """What the NxDModel relies on and the loading process provides: the planned graphs, each with
    the inputs and state it was built with, and the weight dict with the recorded tensors."""
    check_plan(specs, manifest)
    for spec in specs:
        record = manifest.graph(spec.name)
        for part, now, built in (("inputs", TensorInfo.of_named(spec.example_inputs), record.inputs),
                                 ("state", tuple(TensorInfo.of(n, t) for n, t in spec.state_buffers.items()),
                                  record.state)):
            if now != built:
                raise ArtifactError(f"graph {spec.name} now has {part} {[(t.name, list(t.shape)) for t in now]}, "
                                    f"built with {[(t.name, list(t.shape)) for t in built]}: the graph code "
                                    "changed since; rebuild the artifacts")
    difference = _checkpoint_difference(manifest.neuron_checkpoint, tensor_infos(checkpoint))
    if difference is not None:
        raise ArtifactError(f"the weight dict the compiled graphs read does not match: {difference}; the model "
                            "code changed since the build; rebuild the artifacts")


def _warm(engine, manifest: Manifest, report: LoadReport) -> None:
    """Check each graph's HLO against the built one, then run it once as the engine does."""
    backend: XlaBackend = engine.backend
    specs = plan_graphs(engine.runner, neuron_compiler_args(manifest.target))
    check_plan(specs, manifest)
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


def engine_for_build(engine_cls, model_dir: Path, drafter_dir: Path | None, speculation, build, backend: str):
    """The engine a build's settings describe (its SpeculationConfig and BuildConfig), loaded as
    `from_pretrained` loads it, on `backend`: what compile.build compiles and what loading its artifacts
    rebuilds."""
    return engine_cls.from_pretrained(model_dir, drafter_dir, speculation, batch_size=build.batch_size,
                                      max_length=build.max_length, prefill_buckets=build.prefill_buckets,
                                      dtype=build.dtype, backend=backend, kernels=build.kernels)


def engine_from_manifest(engine_cls, manifest: Manifest, model_dir: Path, drafter_dir: Path | None, backend: str):
    return engine_for_build(engine_cls, model_dir, drafter_dir, manifest.speculation, manifest.build, backend)


def _load_nxd(engine_cls, artifact_dir: Path, manifest: Manifest, model_dir: Path, drafter_dir: Path | None):
    from neuron_peagle.backends.nxd_graphs import NxdBundle
    from neuron_peagle.backends.nxd_parallel import NxdTensorParallel, parallel_state

    engine = engine_from_manifest(engine_cls, manifest, model_dir, drafter_dir, "nxd")
    # Sharded artifacts: the target on NxD's parallel layers as built, the whole weight dict checked against
    # the recorded one, then split per rank by NxD's shard_checkpoint (all under NxD's parallel state).
    with parallel_state(manifest.tp_degree):
        sharding = NxdTensorParallel.of(engine, manifest.tp_degree) if manifest.tp_degree > 1 else None
        specs = plan_graphs(engine.runner, neuron_compiler_args(manifest.target))
        if sharding is not None:
            sharding.persist_tables(specs)
        bundle = NxdBundle.of(specs)
        checkpoint = sharding.whole_checkpoint(bundle) if sharding is not None else bundle.checkpoint
        check_nxd_plan(specs, manifest, checkpoint)
        weights = sharding.rank_checkpoints(bundle, checkpoint) if sharding is not None else [checkpoint]
    engine.backend.load(artifact_dir / NEURON_MODEL_FILE, bundle, weights)
    ranks = f" on {manifest.tp_degree} ranks" if manifest.tp_degree > 1 else ""
    report = LoadReport(artifact_dir, f"NxDModel {artifact_dir / NEURON_MODEL_FILE}{ranks}, weights from {model_dir}")
    for spec in specs:
        engine.backend.run(spec.module, spec.example_inputs)
        report.graphs[spec.name] = ON_NEURON
    engine.artifacts = report
    return engine


def load_engine(engine_cls, artifact_dir: Path, request: ArtifactRequest):
    manifest = Manifest.load(artifact_dir)
    model_dir, drafter_dir = _checked_dirs(artifact_dir, manifest, request)
    if manifest.backend == "nxd":
        return _load_nxd(engine_cls, artifact_dir, manifest, model_dir, drafter_dir)
    if manifest.backend in COMPILE_BACKENDS:
        from neuron_peagle.runtime.compiled_artifacts import load_compiled

        return load_compiled(engine_cls, artifact_dir, manifest, model_dir, drafter_dir)
    cache_dir = artifact_dir / XLA_CACHE_DIR
    if initialize_persistent_cache(cache_dir, readonly=True):
        report = LoadReport(artifact_dir, f"persistent cache in {cache_dir}")
    else:
        report = LoadReport(artifact_dir, "cache not usable: this process compiled XLA graphs before")
        warnings.warn(f"this process compiled XLA graphs before loading {artifact_dir}, so torch-xla's persistent "
                      "cache cannot be pointed at its xla_cache: every graph is compiled now instead; load "
                      "artifacts first thing in a process to skip that", RuntimeWarning, stacklevel=3)
    engine = engine_from_manifest(engine_cls, manifest, model_dir, drafter_dir, "xla")
    _warm(engine, manifest, report)
    engine.artifacts = report
    return engine
