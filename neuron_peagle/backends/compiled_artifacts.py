"""Artifacts of the torch.compile backends (inductor, neuron): the compiler's own cache, shipped.

Build: the compiler's cache directory is pointed into the artifact directory (`compile_cache/`) before
anything compiles, every planned graph is compiled by running it once with its example inputs (exactly
as `Engine.warm` and the runners run it), and then PyTorch's portable cache artifacts are written next to
it (inductor). The manifest records versions, weights, shapes and every graph's interface.

Load: a view of the same cache (hard links in the user's cache directory, so that loading never writes
into the artifacts) is pointed at, first thing, and every graph is warmed: dynamo traces it again (a compiled graph is a Python callable, so it is never deserialized whole), and the compiler finds
its output in the cache (inductor: the FX graph cache and the built C++ kernels; neuron: the NEFF cache)
instead of compiling. The caches are keyed by the graph's own content, so artifacts built from other graph
code can only cost time, never give other results.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from neuron_peagle.backends.artifacts import (ArtifactBuild, BuiltGraphs, LoadReport, check_plan, graph_record,
                                              interface_fingerprint)
from neuron_peagle.errors import ArtifactError
from neuron_peagle.files import atomic_write_bytes
from neuron_peagle.graphs.interface import PlannedGraph
from neuron_peagle.runtime.manifest import COMPILE_CACHE_DIR, PORTABLE_CACHE_FILE, Manifest, TensorInfo


@dataclass(frozen=True)
class CompilerCache:
    """Where a torch.compile backend's compiler keeps its cache, and what it can say about it."""

    env: str  # the environment variable the compiler reads its cache directory from (when it first needs it)
    portable: bool  # PyTorch's portable cache artifacts (torch.compiler.save/load_cache_artifacts) apply
    counts_hits: bool  # inductor's FX graph cache counters tell a cache hit from a compile


INDUCTOR_CACHE = CompilerCache("TORCHINDUCTOR_CACHE_DIR", portable=True, counts_hits=True)
NEURON_CACHE = CompilerCache("TORCH_NEURONX_NEFF_CACHE_DIR", portable=False, counts_hits=False)


def compiled_graph_count() -> int:
    """Graphs dynamo has compiled in this process (its own counter, over every backend)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def point_cache(cache: CompilerCache, directory: Path) -> bool:
    """Point the compiler's cache at `directory`; False if this process compiled with another one already
    (a compiler may keep the path it started with, so the cache could not be trusted to be used)."""
    path = str(directory.resolve())
    if os.environ.get(cache.env) == path:
        return True
    if compiled_graph_count() > 0:
        return False
    os.environ[cache.env] = path
    return True


def read_only_view(source: Path) -> Path:
    """A cache directory holding `source`'s files, for a load to read and the compiler to add to, so that
    loading never writes into the artifacts: hard links (a copy across file systems) in the user's cache,
    one per artifact content. The compilers replace cache entries by renaming new files into place, which
    leaves a linked file's content as it was. One view per loading process; those of ended processes are
    removed."""
    from neuron_peagle.default_model import cache_root
    from neuron_peagle.files import process_is_alive

    key = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:16]
    views = cache_root() / "artifact-caches"
    views.mkdir(parents=True, exist_ok=True)
    for old in views.glob(f"{key}-*"):
        pid = old.name.rpartition("-")[2]
        if pid.isdigit() and (int(pid) == os.getpid() or not process_is_alive(int(pid))):
            shutil.rmtree(old, ignore_errors=True)
    view = views / f"{key}-{os.getpid()}"

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, view, copy_function=link)
    return view


def use_compiled_artifacts(cache: CompilerCache, directory: Path, writable: bool) -> str:
    compile_cache = directory / COMPILE_CACHE_DIR
    if not writable and not (compile_cache.is_dir() and any(compile_cache.iterdir())):
        raise ArtifactError(f"{compile_cache} is missing or empty: the artifacts lost their compiled graphs; rebuild "
                            "them with `python -m compile.build`")
    if point_cache(cache, compile_cache if writable else read_only_view(compile_cache)):
        portable = directory / PORTABLE_CACHE_FILE
        if not writable and cache.portable and portable.is_file():
            torch.compiler.load_cache_artifacts(portable.read_bytes())
        return f"compile cache in {directory / COMPILE_CACHE_DIR}"
    if writable:
        raise ArtifactError(f"this process has already compiled graphs with another compile cache, so "
                            f"{directory / COMPILE_CACHE_DIR} would not receive them; run the build in a fresh process "
                            "(python -m compile.build)")
    warnings.warn(f"this process compiled graphs before loading {directory}, so the compiler's cache cannot be "
                  "pointed at its compile_cache: graphs not compiled already are compiled now instead; load "
                  "artifacts first thing in a process to skip that", RuntimeWarning, stacklevel=4)
    return "cache not usable: this process compiled graphs before"


def _cache_counts() -> dict[str, int]:
    """inductor's FX graph cache hits and misses so far in this process."""
    from torch._dynamo.utils import counters

    return {"hit": int(counters["inductor"]["fxgraph_cache_hit"]), "miss": int(counters["inductor"]["fxgraph_cache_miss"])}


def run_timed(backend, cache: CompilerCache, graph: PlannedGraph) -> tuple[tuple, float, str]:
    """Run one planned graph: (outputs, seconds, how its compiled code was obtained)."""
    before = _cache_counts()
    start = time.perf_counter()
    outputs = backend.run(graph.module, graph.example_inputs)
    seconds = time.perf_counter() - start
    if not cache.counts_hits:
        return outputs, seconds, f"compiled or loaded by {backend.name} (its compile cache)"
    if _cache_counts()["miss"] > before["miss"]:
        return outputs, seconds, "compiled"
    return outputs, seconds, "loaded from the compile cache"


def build_compiled(backend, cache: CompilerCache, plan: list[PlannedGraph], build: ArtifactBuild) -> BuiltGraphs:
    """Compile every planned graph (the compiler's cache already pointed into `build.out`)."""
    from tqdm import tqdm

    records, compiled = [], []
    for graph in tqdm(plan, desc=f"compile ({backend.name})", unit="graph", file=sys.stderr):
        outputs, seconds, how = run_timed(backend, cache, graph)
        if how == "compiled":
            compiled.append(graph.name)
        build.log.write({"event": "graph", "graph": graph.name, "status": how, "compile_s": round(seconds, 3)},
                        f"{graph.name}: {how} in {seconds:.1f} s")
        records.append(graph_record(graph, TensorInfo.of_named(outputs), interface_fingerprint(graph, build),
                                    (COMPILE_CACHE_DIR,), seconds))
    if cache.portable:
        saved = torch.compiler.save_cache_artifacts()
        if saved is not None:
            atomic_write_bytes(build.out / PORTABLE_CACHE_FILE, saved[0])
    return BuiltGraphs(records, compiled)


def load_compiled(backend, cache: CompilerCache, directory: Path, plan: list[PlannedGraph], manifest: Manifest,
         cache_note: str) -> LoadReport:
    """Warm every planned graph from the artifacts' cache."""
    check_plan(plan, manifest)
    report = LoadReport(directory, cache_note)
    for graph in plan:
        _, _, how = run_timed(backend, cache, graph)
        report.graphs[graph.name] = how
    return report
