"""Loading torch.compile artifacts (backends inductor and neuron) that `python -m compile.build` wrote.

The compiler's cache directory is pointed at the artifact directory's `compile_cache/`, first thing,
and every graph is warmed: dynamo traces it again (a compiled graph is a Python callable, so it is never
deserialized whole), and the compiler finds its output in the cache (inductor: the FX graph cache and
the built C++ kernels; neuron: the NEFF cache) instead of compiling. The caches are keyed by the graph's
own content, so artifacts built from other graph code can only cost time, never give other results.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import torch

from neuron_peagle.backends.compiled import compiled_graph_count
from neuron_peagle.runtime.graph_specs import GraphSpec, plan_graphs
from neuron_peagle.runtime.manifest import COMPILE_CACHE_DIR, PORTABLE_CACHE_FILE, Manifest

# Where each compiler keeps its cache (read when it first needs the cache).
CACHE_ENV = {"inductor": "TORCHINDUCTOR_CACHE_DIR", "neuron": "TORCH_NEURONX_NEFF_CACHE_DIR"}


def use_artifact_cache(out: Path, backend: str) -> bool:
    """Point the compiler's cache at `out`'s; False if this process compiled with another one already
    (a compiler may keep the path it started with, so the cache could not be trusted to be used)."""
    env, path = CACHE_ENV[backend], str((out / COMPILE_CACHE_DIR).resolve())
    if os.environ.get(env) == path:
        return True
    if compiled_graph_count() > 0:
        return False
    os.environ[env] = path
    return True


def cache_counts() -> dict[str, int]:
    """inductor's FX graph cache hits and misses so far in this process."""
    from torch._dynamo.utils import counters

    return {"hit": int(counters["inductor"]["fxgraph_cache_hit"]), "miss": int(counters["inductor"]["fxgraph_cache_miss"])}


def run_timed(engine, spec: GraphSpec) -> tuple[tuple, float, str]:
    """Run one planned graph on the engine's backend: (outputs, seconds, how its compiled code was obtained)."""
    before = cache_counts()
    start = time.perf_counter()
    outputs = engine.backend.run(spec.module, spec.example_inputs)
    seconds = time.perf_counter() - start
    if engine.build.backend != "inductor":
        return outputs, seconds, "compiled or loaded by TorchNeuron (its NEFF cache)"
    if cache_counts()["miss"] > before["miss"]:
        return outputs, seconds, "compiled"
    return outputs, seconds, "loaded from the compile cache"


def load_compiled(engine_cls, artifact_dir: Path, manifest: Manifest, model_dir: Path, drafter_dir: Path | None):
    """An engine on the backend the artifacts were built for, every graph warmed from their caches."""
    from neuron_peagle.runtime.artifacts import LoadReport, check_plan, engine_from_manifest

    backend = manifest.backend
    if use_artifact_cache(artifact_dir, backend):
        cache = f"compile cache in {artifact_dir / COMPILE_CACHE_DIR}"
        portable = artifact_dir / PORTABLE_CACHE_FILE
        if backend == "inductor" and portable.is_file():
            torch.compiler.load_cache_artifacts(portable.read_bytes())
    else:
        cache = "cache not usable: this process compiled graphs before"
        warnings.warn(f"this process compiled graphs before loading {artifact_dir}, so the compiler's cache cannot be "
                      "pointed at its compile_cache: graphs not compiled already are compiled now instead; load "
                      "artifacts first thing in a process to skip that", RuntimeWarning, stacklevel=3)
    engine = engine_from_manifest(engine_cls, manifest, model_dir, drafter_dir, backend)
    specs = plan_graphs(engine.runner, ())
    check_plan(specs, manifest)
    report = LoadReport(artifact_dir, cache)
    for spec in specs:
        _, _, how = run_timed(engine, spec)
        report.graphs[spec.name] = how
    engine.artifacts = report
    return engine
