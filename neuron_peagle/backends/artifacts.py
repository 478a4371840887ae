"""What every backend's artifact builder and loader share (no device stack imported here).

`compile.build` asks a backend to build artifacts for an engine's planned graphs (`Backend.build_artifacts`
with an `ArtifactBuild`), then writes the manifest from the `BuiltGraphs` it returns; `Engine.from_compiled`
asks it to load them (`Backend.load_artifacts`), which returns a `LoadReport`. Each backend's own half
is in its module (compiled_artifacts.py, xla_artifacts.py, nxd_artifacts.py).
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Sequence
from dataclasses import astuple, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from neuron_peagle.errors import ArtifactError, ConfigError
from neuron_peagle.graphs.interface import PlannedGraph
from neuron_peagle.runtime.manifest import GraphRecord, Manifest, TensorInfo, WeightsInfo, fingerprint


# The flags NxD uses for transformer graphs (see docs): no implicit down-casting, inf saturation.
NEURON_COMPILER_FLAGS = ("--enable-saturate-infinity", "--auto-cast=none", "--model-type=transformer", "-O1")
TARGETS = ("trn1", "trn2")


def neuron_compiler_args(target: str, lnc: int = 1) -> tuple[str, ...]:
    """neuronx-cc arguments for every graph of a build for `target` (trn1 or trn2) at `lnc` physical cores
    per logical core, set explicitly (the compiler's default is 2 on trn2, and it must equal the NKI
    kernels' launch, NCC_EVRF066): recorded by every traced build (xla: in its fingerprints), passed to
    neuronx-cc by the nxd build."""
    if target not in TARGETS:
        raise ConfigError(f"target must be one of {TARGETS}, got {target!r}")
    if target == "trn1" and lnc != 1:
        raise ConfigError(f"trn1 runs one physical NeuronCore per logical core (LNC 1), got lnc={lnc}")
    return (*NEURON_COMPILER_FLAGS, "--target", target, "--logical-nc-config", str(lnc))


class BuildLog:
    """compile_log.jsonl, appended and flushed per record, each record echoed on stderr (above a progress
    bar, when one is shown)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: dict, line: str) -> None:
        from tqdm import tqdm

        record = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), **record}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        tqdm.write(line, file=sys.stderr)


@dataclass
class ArtifactBuild:
    """What a backend's builder needs besides the planned graphs."""

    out: Path
    versions: dict[str, str | None]  # of the backend's packages (Capabilities.packages)
    weights: list[WeightsInfo | None]  # target, drafter: what every graph's fingerprint depends on
    vocab_sizes: tuple[int, ...]  # the target's vocabulary, and the drafter's: the HLO audit flags them
    compiler_args: tuple[str, ...]  # neuronx-cc's, for the xla and nxd builds
    previous: Manifest | None  # an earlier build into `out` for the same backend
    log: BuildLog


@dataclass
class BuiltGraphs:
    """What a builder made: one manifest record per planned graph, and what the manifest adds."""

    records: list[GraphRecord]
    compiled: list[str]  # graphs compiled by this build (the others were up to date, or found in a cache)
    compilations: int = 0  # graphs the compiler compiled in this process
    audit_notes: tuple[str, ...] = ()
    neuron_checkpoint: tuple[TensorInfo, ...] = ()  # nxd: the weight dict every graph reads


@dataclass
class LoadReport:
    artifact_dir: Path
    cache: str  # the compile cache used, or why the process compiles instead; nxd: the NxDModel
    graphs: dict[str, str] = field(default_factory=dict)  # graph name -> how it was made ready

    def describe(self) -> str:
        counts: dict[str, int] = {}
        for status in self.graphs.values():
            counts[status] = counts.get(status, 0) + 1
        return f"{len(self.graphs)} graphs from {self.artifact_dir} ({self.cache}): " + "; ".join(
            f"{n} {status}" for status, n in counts.items())


def check_plan(plan: Sequence[PlannedGraph], manifest: Manifest) -> None:
    """The engine plans exactly the graphs the artifacts hold."""
    if sorted(g.name for g in plan) != sorted(g.name for g in manifest.graphs):
        raise ArtifactError(f"the engine needs graphs {sorted(g.name for g in plan)}, the artifacts hold "
                            f"{sorted(g.name for g in manifest.graphs)}; rebuild them")


def graph_record(graph: PlannedGraph, outputs: tuple[TensorInfo, ...], fingerprint_of: str, files: tuple[str, ...],
                 seconds: float, compiler_args: tuple[str, ...] = (), hlo_file: str = "", hlo_sha256: str = "",
                 audit: dict | None = None) -> GraphRecord:
    """A graph's manifest record: its interface, its state, and what its compiled form is."""
    return GraphRecord(
        name=graph.name, kind=graph.kind, bucket=graph.bucket, greedy=graph.greedy,
        inputs=TensorInfo.of_named(graph.example_inputs), outputs=outputs,
        state=tuple(TensorInfo.of(n, t) for n, t in graph.state_buffers.items()),
        compiler_args=tuple(compiler_args), hlo_file=hlo_file, hlo_sha256=hlo_sha256, fingerprint=fingerprint_of,
        files=tuple(files), compile_time_s=round(seconds, 3), audit=audit or {})


def interface_fingerprint(graph: PlannedGraph, build: ArtifactBuild) -> str:
    """The fingerprint of a graph whose compiled form the compiler's own cache keys by content (inductor,
    neuron): its name and inputs, the versions and the weights."""
    interface = f"{graph.name}:{[astuple(t) for t in TensorInfo.of_named(graph.example_inputs)]}"
    return fingerprint(interface, (), build.versions, build.weights)


def inside(out: Path, name: str) -> bool:
    """Whether `name`, a path a manifest records, is a relative path that stays inside `out` (and is not
    `out` itself), links and `..` resolved."""
    if not name or Path(name).is_absolute():
        return False
    root = out.resolve()
    path = (out / name).resolve()
    return path != root and path.is_relative_to(root)


def prune(out: Path, previous: Manifest | None, keep: set[str], folders: tuple[str, ...]) -> None:
    """Delete the files the previous build's manifest lists in the build's own `folders` that no planned,
    up-to-date graph owns. Nothing else is deleted: a file no manifest of ours recorded is not the build's
    to remove, and every path is checked to lie inside `out` before anything is deleted."""
    if previous is None:
        return
    owned = {g.hlo_file for g in previous.graphs if g.hlo_file} | {f for g in previous.graphs for f in g.files}
    outside = sorted(name for name in owned if not inside(out, name))
    if outside:
        raise ArtifactError(f"{out / 'manifest.json'} lists {outside[0]!r}, which lies outside {out}: it is not a "
                            "manifest this tool wrote; nothing was deleted")
    doomed = [out / name for name in sorted(owned - keep)
              if Path(name).parts[0] in folders and (out / name).exists()]
    for path in doomed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
