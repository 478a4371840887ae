"""The torch.compile half of `python -m compile.build` (backends inductor and neuron); its loader is
neuron_peagle/runtime/compiled_artifacts.py.

Build: the compiler's cache directory is pointed into the artifact directory (`compile_cache/`)
before anything compiles, every planned graph is compiled by running it once with its example
inputs (exactly as `Engine.warm` and the runners run it), and then PyTorch's portable cache
artifacts are written next to it (inductor). The manifest records versions, weights, shapes and
every graph's interface, as for the other backends.

Load: the same cache directory is pointed at again, first thing, and every graph is warmed: dynamo
traces it again (a compiled graph is a Python callable, so it is never deserialized whole), and the
compiler finds its output in the cache (inductor: the FX graph cache and the built C++ kernels;
neuron: the NEFF cache) instead of compiling. The caches are keyed by the graph's own content, so
artifacts built from other graph code can only cost time, never give other results.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from neuron_peagle.files import atomic_write_bytes
from neuron_peagle.runtime.compiled_artifacts import run_timed
from neuron_peagle.runtime.graph_specs import GraphSpec, plan_graphs
from neuron_peagle.runtime.manifest import COMPILE_CACHE_DIR, PORTABLE_CACHE_FILE, GraphRecord, TensorInfo, fingerprint

def compile_graphs(engine, out: Path, versions: dict, weights: list, log) -> tuple[list[GraphRecord], list[str]]:
    """Compile every planned graph of `engine` (its backend's compile cache already pointed into `out`,
    by `use_artifact_cache`); returns the manifest's graph records and the names of the graphs that
    were compiled (not found in the cache)."""
    records, compiled = [], []
    specs = plan_graphs(engine.runner, ())
    for spec in tqdm(specs, desc=f"compile ({engine.build.backend})", unit="graph", file=sys.stderr):
        outputs, seconds, how = run_timed(engine, spec)
        if how == "compiled":
            compiled.append(spec.name)
        log.write({"event": "graph", "graph": spec.name, "status": how, "compile_s": round(seconds, 3)},
                  f"{spec.name}: {how} in {seconds:.1f} s")
        records.append(graph_record(spec, outputs, versions, weights, seconds))
    if engine.build.backend == "inductor":
        saved = torch.compiler.save_cache_artifacts()
        if saved is not None:
            atomic_write_bytes(out / PORTABLE_CACHE_FILE, saved[0])
    return records, compiled


def graph_record(spec: GraphSpec, outputs: tuple, versions: dict, weights: list, seconds: float) -> GraphRecord:
    """A compiled graph's manifest record: its interface and what its compiled form depends on (no HLO:
    the compile cache is keyed by the graph's own content)."""
    inputs = TensorInfo.of_named(spec.example_inputs)
    interface = f"{spec.name}:{[dataclasses.astuple(t) for t in inputs]}"
    return GraphRecord(
        name=spec.name, kind=spec.kind, bucket=spec.bucket, greedy=spec.greedy, inputs=inputs,
        outputs=TensorInfo.of_named(outputs),
        state=tuple(TensorInfo.of(n, t) for n, t in spec.state_buffers.items()),
        compiler_args=(), hlo_file="", hlo_sha256="", fingerprint=fingerprint(interface, (), versions, weights),
        files=(COMPILE_CACHE_DIR,), compile_time_s=round(seconds, 3), audit={})
