"""Artifacts of the traced backends (xla, and nxd, which shares the first half): HLO, audit, compiled graphs.

Build:
1. Trace every planned graph lazily on the XLA device: write its HLO text, audit it (hlo_audit.py),
   fingerprint it. Nothing is compiled yet.
2. Compile only the graphs whose fingerprint is not in the previous manifest: on xla by running the graph
   once with torch-xla's persistent compilation cache in `<out>/xla_cache` (nxd: nxd_artifacts.py).
   Files of graphs no longer planned are removed.

Load (xla): every graph is traced once: its HLO must be the one built and audited (else the graph code
changed since), and running it loads the compiled graph, so generation itself compiles nothing. The
compiled form is torch-xla's persistent cache, which can only be set up before the process compiles
anything. Decision: if the process already has compiled XLA graphs with another cache, the engine is still
built, with a warning, and its graphs compiled in the process (the same graphs, so the same output; only
the start-up cost differs). (PJRT CPU cannot deserialize executables, so on CPU every graph is compiled at
load; a trn instance loads them.)
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from neuron_peagle.backends.hlo_audit import AuditResult, audit_hlo
from neuron_peagle.backends.hlo_audit import check as check_audit
from neuron_peagle.backends.hlo_audit import notes as audit_notes_of
from neuron_peagle.backends.artifacts import (ArtifactBuild, BuiltGraphs, LoadReport, check_plan, graph_record, inside,
                                              prune)
from neuron_peagle.errors import ArtifactError
from neuron_peagle.files import atomic_write_text
from neuron_peagle.graphs.interface import PlannedGraph
from neuron_peagle.runtime.manifest import (HLO_DIR, NEURON_DIR, XLA_CACHE_DIR, GraphRecord, Manifest, TensorInfo,
                                            fingerprint)

# How a graph reached the device at load, from torch-xla's counters.
LOADED = "loaded from the persistent cache"
UNLOADABLE = "compiled: this PJRT device cannot deserialize cached executables"
MISSING = "compiled: not in the persistent cache"
IN_PROCESS = "compiled earlier in this process"


@contextmanager
def stand_in_state(graph: PlannedGraph, device: torch.device) -> Iterator[list[Tensor]]:
    """Swap the graph's state buffers for fresh device tensors of the same shapes, for one trace.

    Tracing updates the state lazily, and a trace taken only to read its HLO is never run: its pending
    updates must not reach the real state (or the next graph's HLO). Fresh device data lowers to the same
    HLO parameters as the real state.
    """
    owners = [(graph.module.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2])
              for name in graph.state_names]
    originals = [owner._buffers[attr] for owner, attr in owners]
    for (owner, attr), buffer in zip(owners, originals):
        owner._buffers[attr] = torch.zeros(buffer.shape, dtype=buffer.dtype).to(device)
    try:
        yield [owner._buffers[attr] for owner, attr in owners]
    finally:
        for (owner, attr), buffer in zip(owners, originals):
            owner._buffers[attr] = buffer


def trace_hlo(graph: PlannedGraph, backend) -> tuple[str, tuple[TensorInfo, ...]]:
    """The graph's HLO text (outputs, then state) on an XlaBackend, and its outputs' names, shapes and
    dtypes; nothing runs.

    Only for reading: lowering state that was updated through views (the prefill graphs) changes the IR a
    later sync would compile, so the graphs to compile run apart, as the engine runs them.
    """
    with stand_in_state(graph, backend.device) as state:
        outputs = backend.trace(graph.module, graph.example_inputs)
        hlo = backend.hlo_text([*outputs, *state])
    return hlo, TensorInfo.of_named(outputs)


@dataclass(frozen=True)
class Traced:
    """What tracing one graph tells before anything is compiled."""

    graph: PlannedGraph
    outputs: tuple[TensorInfo, ...]
    hlo_file: str
    hlo_sha256: str
    fingerprint: str
    audit: AuditResult

    def record(self, files: tuple[str, ...], seconds: float, compiler_args: tuple[str, ...]) -> GraphRecord:
        return graph_record(self.graph, self.outputs, self.fingerprint, files, seconds, compiler_args, self.hlo_file,
                            self.hlo_sha256, self.audit.to_dict())


def trace_all(plan: list[PlannedGraph], backend, build: ArtifactBuild) -> tuple[list[Traced], dict[str, GraphRecord]]:
    """Trace and audit every planned graph (HLO written into `build.out`), and find the ones the previous
    build compiled from the same fingerprint; the previous build's files that nothing keeps are removed."""
    from tqdm import tqdm

    out = build.out
    (out / HLO_DIR).mkdir(parents=True, exist_ok=True)
    previous = build.previous
    traced, fresh = [], {}
    for graph in tqdm(plan, desc="trace + audit", unit="graph", file=sys.stderr):
        hlo, outputs = trace_hlo(graph, backend)
        hlo_file = f"{HLO_DIR}/{graph.name}.hlo.txt"
        atomic_write_text(out / hlo_file, hlo)
        result = audit_hlo(hlo, build.vocab_sizes)
        check_audit(graph.name, result, str(out / hlo_file))
        digest = hashlib.sha256(hlo.encode()).hexdigest()
        item = Traced(graph, outputs, hlo_file, digest,
                      fingerprint(digest, build.compiler_args, build.versions, build.weights), result)
        traced.append(item)
        old = previous.graph(graph.name) if previous else None
        if old is not None and old.fingerprint == item.fingerprint and all(
                inside(out, f) and (out / f).is_file() for f in old.files):
            fresh[graph.name] = old
            build.log.write({"event": "graph", "graph": graph.name, "status": "up to date"}, f"{graph.name}: up to date")
    prune(out, previous, {t.hlo_file for t in traced} | {f for record in fresh.values() for f in record.files},
          (HLO_DIR, XLA_CACHE_DIR, NEURON_DIR))
    return traced, fresh


def compile_traced(traced: list[Traced], fresh: dict[str, GraphRecord], build: ArtifactBuild, backend_name: str,
                   compile_one: Callable[[PlannedGraph], list[str]],
                   reuse_one: Callable[[PlannedGraph], None] = lambda graph: None) -> list[GraphRecord]:
    """Compile the graphs that are not up to date (`compile_one` returns a graph's files), reuse the others
    (`reuse_one`); the manifest's records, in plan order."""
    from tqdm import tqdm

    records = []
    bar = tqdm(total=len(traced) - len(fresh), desc=f"compile ({backend_name})", unit="graph", file=sys.stderr)
    for item in traced:
        name = item.graph.name
        if name in fresh:
            files, seconds = fresh[name].files, fresh[name].compile_time_s
            reuse_one(item.graph)
        else:
            bar.set_postfix_str(name)
            start = time.perf_counter()
            files = compile_one(item.graph)
            seconds = time.perf_counter() - start
            bar.update()
            build.log.write({"event": "graph", "graph": name, "status": "compiled", "compile_s": round(seconds, 3)},
                            f"{name}: compiled in {seconds:.1f} s")
        records.append(item.record(tuple(files), seconds, build.compiler_args))
    bar.close()
    return records


def audit_notes(traced: list[Traced]) -> tuple[str, ...]:
    return tuple(audit_notes_of({t.graph.name: t.audit.findings for t in traced}))


def build_xla(backend, plan: list[PlannedGraph], build: ArtifactBuild) -> BuiltGraphs:
    """The xla build: trace and audit, then run each stale graph once so that torch-xla compiles it into
    the persistent cache (pointed into `build.out` by `use_artifacts`)."""
    first_compile = backend.compile_count()
    traced, fresh = trace_all(plan, backend, build)
    cache = build.out / XLA_CACHE_DIR

    def compile_one(graph: PlannedGraph) -> list[str]:
        before = _listing(cache)
        backend.run(graph.module, graph.example_inputs)
        return sorted(str(p.relative_to(build.out)) for p in _listing(cache) - before)

    records = compile_traced(traced, fresh, build, backend.name, compile_one)
    return BuiltGraphs(records, [t.graph.name for t in traced if t.graph.name not in fresh],
                       backend.compile_count() - first_compile, audit_notes(traced))


def _listing(folder: Path) -> set[Path]:
    return set(folder.iterdir()) if folder.is_dir() else set()


def load_xla(backend, directory: Path, plan: list[PlannedGraph], manifest: Manifest, cache_note: str) -> LoadReport:
    """Check each graph's HLO against the built one, then run it once as the engine does."""
    check_plan(plan, manifest)
    report = LoadReport(directory, cache_note)
    for graph in plan:
        hlo, _ = trace_hlo(graph, backend)
        record = manifest.graph(graph.name)
        if hashlib.sha256(hlo.encode()).hexdigest() != record.hlo_sha256:
            raise ArtifactError(f"graph {graph.name} now traces to a different HLO than the one built "
                                f"({directory / record.hlo_file}): the graph code changed since; rebuild")
        counts = {name: backend.counter(name) for name in
                  ("UncachedCompile", "PersistentCacheHit", "PersistentCacheDeserializeFailure")}
        backend.run(graph.module, graph.example_inputs)
        delta = {name: backend.counter(name) - before for name, before in counts.items()}
        if delta["PersistentCacheHit"]:
            report.graphs[graph.name] = LOADED
        elif not delta["UncachedCompile"]:
            report.graphs[graph.name] = IN_PROCESS
        else:
            report.graphs[graph.name] = UNLOADABLE if delta["PersistentCacheDeserializeFailure"] else MISSING
    return report
