"""`manifest.json`: what an artifact directory holds and exactly what it was built from.

A loader trusts compiled graphs only as far as the manifest vouches for them, so it records
everything a graph depends on: package versions, the sha256 of every weight and config file
(target and drafter), the build shapes, and per graph its interface, aliased state, compiler
arguments, HLO hash and audit. A graph's fingerprint hashes the parts that change its compiled
form; a rebuild recompiles exactly the graphs whose fingerprint changed.

Layout of an artifact directory:
    manifest.json          this file
    compile_log.jsonl      one record per graph per build run, then a summary record
    compile_cache/         inductor: TORCHINDUCTOR_CACHE_DIR; neuron: TORCH_NEURONX_NEFF_CACHE_DIR
    portable_cache.bin     inductor: torch.compiler.save_cache_artifacts() after the build
    hlo/<graph>.hlo.txt    xla, nxd: the HLO text of every graph
    xla_cache/             torch-xla's persistent compilation cache (xla backend)
    neuron/model.pt        one neuronx-distributed NxDModel holding every graph, keyed by its name,
                           without weights (nxd backend)
    neuron/<graph>.neff    each graph's NEFF as neuronx-cc wrote it (reused by rebuilds, for profiling)

The manifest also records the sha256 of every file the loader reads from the artifact directory
(`checksums`, see `artifact_checksums`): a file changed or lost since the build is refused at load.
Every file is written whole or not at all (neuron_peagle.files), the manifest last.

An nxd manifest also lists the weight dict its NxDModel reads (`neuron_checkpoint`: every tensor
name, shape and dtype): the loader rebuilds that dict from the checked model directory and refuses
one that differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from torch import Tensor

from neuron_peagle.checksums import is_relative_name
from neuron_peagle.capabilities import capabilities_of
from neuron_peagle.config import BuildConfig
from neuron_peagle.default_model import sha256_of
from neuron_peagle.errors import ArtifactError
from neuron_peagle.files import atomic_write_text
from neuron_peagle.output_dirs import TOOL, OutputKind, marker_fields
from neuron_peagle.speculation import SpeculationConfig

# Raised whenever the manifest's fields or the way graphs are traced change: a manifest of another format
# describes graphs this version would not build that way, so it is refused and the artifacts rebuilt.
FORMAT_VERSION = 5
MANIFEST_NAME = "manifest.json"
LOG_NAME = "compile_log.jsonl"
HLO_DIR = "hlo"
XLA_CACHE_DIR = "xla_cache"
NEURON_DIR = "neuron"
NEURON_MODEL_FILE = f"{NEURON_DIR}/model.pt"
# inductor / neuron: the compiler's own cache directory, pointed here while building and loading (on
# CPU it holds the built C++ kernels, so the same machine loads without compiling), and PyTorch's
# portable cache artifacts (torch.compiler.save_cache_artifacts: graphs and kernel sources, for
# another machine with the same versions, which then only rebuilds the C++).
COMPILE_CACHE_DIR = "compile_cache"
PORTABLE_CACHE_FILE = "portable_cache.bin"
# An artifact directory, as neuron_peagle.output_dirs knows it: what a build writes at its top.
ARTIFACTS = OutputKind("artifact directory", MANIFEST_NAME, frozenset(
    {MANIFEST_NAME, LOG_NAME, HLO_DIR, XLA_CACHE_DIR, NEURON_DIR, COMPILE_CACHE_DIR, PORTABLE_CACHE_FILE}))


def installed_versions(backend: str) -> dict[str, str | None]:
    """Installed version of every package the backend's graphs depend on (None: not installed)."""
    versions: dict[str, str | None] = {}
    for package in capabilities_of(backend).packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def weight_files(directory: Path) -> list[Path]:
    """The files a model's or drafter's weights come from: config.json, safetensors, shard index."""
    names = ["config.json", "model.safetensors.index.json"]
    files = [directory / n for n in names if (directory / n).is_file()]
    return files + sorted(directory.glob("*.safetensors"))


@dataclass(frozen=True)
class WeightsInfo:
    """Where a model's or drafter's weights were read from, and the sha256 of each file."""

    path: str | None  # None: a random-init drafter, made from `random_seed`
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    random_seed: int | None = None

    @classmethod
    def of_dir(cls, directory: Path) -> "WeightsInfo":
        return cls(str(directory.resolve()), {f.name: sha256_of(f) for f in weight_files(directory)})


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype without the "torch." prefix

    @classmethod
    def of(cls, name: str, tensor: Tensor) -> "TensorInfo":
        return cls(name, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))

    @classmethod
    def of_named(cls, tensors: tuple) -> tuple["TensorInfo", ...]:
        """One per field of a NamedTuple of tensors (a graph's Inputs or Outputs), in field order."""
        return tuple(cls.of(name, t) for name, t in zip(type(tensors)._fields, tensors))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TensorInfo":
        return cls(data["name"], tuple(data["shape"]), data["dtype"])


def tensor_infos(tensors: dict[str, Tensor]) -> tuple[TensorInfo, ...]:
    """name, shape and dtype of every tensor, sorted by name."""
    return tuple(TensorInfo.of(name, tensors[name]) for name in sorted(tensors))


@dataclass(frozen=True)
class GraphRecord:
    name: str
    kind: str
    bucket: int | None
    greedy: bool
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    state: tuple[TensorInfo, ...]  # aliased state buffers: updated in place, kept on the device
    compiler_args: tuple[str, ...]
    hlo_file: str  # relative to the artifact directory
    hlo_sha256: str
    fingerprint: str
    files: tuple[str, ...]  # the compiled form, relative to the artifact directory
    compile_time_s: float  # of the build that compiled it
    audit: dict[str, Any]  # AuditResult.to_dict()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GraphRecord":
        tensors = {key: tuple(TensorInfo.from_dict(t) for t in data[key]) for key in ("inputs", "outputs", "state")}
        return cls(**{**data, **tensors, "compiler_args": tuple(data["compiler_args"]),
                      "files": tuple(data["files"])})


@dataclass(frozen=True)
class Manifest:
    backend: str  # "inductor" | "neuron" | "xla" | "nxd"
    versions: dict[str, str | None]
    build: BuildConfig
    speculation: SpeculationConfig  # resolved: every value concrete
    tp_degree: int
    target: str  # trn1 | trn2: the neuronx-cc target (recorded on xla too: it is in the fingerprints)
    model: WeightsInfo
    drafter: WeightsInfo | None  # None in plain mode
    graphs: tuple[GraphRecord, ...]
    audit_notes: tuple[str, ...]
    format_version: int = FORMAT_VERSION
    neuron_checkpoint: tuple[TensorInfo, ...] = ()  # neuron: the weight dict every graph reads; xla: empty
    # sha256 of every file the build wrote that the loader reads (`artifact_checksums`), relative path ->
    # hex; verified before anything loads.
    checksums: dict[str, str] = field(default_factory=dict)

    def graph(self, name: str) -> GraphRecord | None:
        return next((g for g in self.graphs if g.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        """The manifest as written: the marker of a directory this tool owns (neuron_peagle.output_dirs), the
        fields, and the sha256 of all of that (`content_sha256`), so that an edited manifest is refused."""
        data = dataclasses.asdict(self)
        data["audit"] = {"notes": data.pop("audit_notes")}
        return sealed(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Manifest":
        data = {k: v for k, v in data.items() if k not in (*marker_fields(ARTIFACTS), "content_sha256")}
        drafter, audit = data.pop("drafter"), data.pop("audit")
        return cls(**{
            **data,
            "build": BuildConfig.from_dict(data["build"]),
            "speculation": SpeculationConfig.from_dict(data["speculation"]),
            "model": WeightsInfo(**data["model"]),
            "drafter": WeightsInfo(**drafter) if drafter is not None else None,
            "graphs": tuple(GraphRecord.from_dict(g) for g in data["graphs"]),
            "audit_notes": tuple(audit["notes"]),
            "neuron_checkpoint": tuple(TensorInfo.from_dict(t) for t in data["neuron_checkpoint"]),
            "checksums": _checksums_from(data["checksums"]),
        })

    def save(self, directory: Path) -> None:
        # Written whole, then renamed (neuron_peagle.files): an interrupted build never leaves half a manifest.
        atomic_write_text(directory / MANIFEST_NAME, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, directory: Path) -> "Manifest":
        path = directory / MANIFEST_NAME
        if not path.is_file():
            raise ArtifactError(f"{directory} holds no {MANIFEST_NAME}; build it with `python -m compile.build`")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ArtifactError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(data, dict) or data.get("tool") != TOOL or data.get("kind") != ARTIFACTS.what:
            raise ArtifactError(f"{path} is not a manifest this tool wrote (no \"tool\": \"{TOOL}\" of an "
                                f"{ARTIFACTS.what}); build artifacts with `python -m compile.build`")
        if data.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(f"{path}: manifest format {data.get('format_version')!r}, this version reads format "
                                f"{FORMAT_VERSION}; rebuild the artifacts with `python -m compile.build`")
        if data.get("content_sha256") != _content_sha256(data):
            raise ArtifactError(f"{path} was edited since the build (its content no longer matches its "
                                "content_sha256): the artifacts were compiled for what it said then; rebuild them "
                                "with `python -m compile.build`")
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError, ValueError) as err:
            raise ArtifactError(f"{path}: malformed manifest ({err!r})") from None


def sealed(data: dict[str, Any]) -> dict[str, Any]:
    """A manifest's fields as written: with the marker of a directory this tool owns and `content_sha256`."""
    data = {**marker_fields(ARTIFACTS), **{k: v for k, v in data.items() if k != "content_sha256"}}
    return {**data, "content_sha256": _content_sha256(data)}


def _content_sha256(data: dict[str, Any]) -> str:
    """sha256 of a manifest's content, every field but this checksum itself."""
    content = {k: v for k, v in data.items() if k != "content_sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _checksums_from(data: Any) -> dict[str, str]:
    """The manifest's checksums, checked: relative paths inside the artifact directory -> sha256 hex."""
    if not isinstance(data, dict) or not all(isinstance(k, str) and is_relative_name(k) and isinstance(v, str)
                                             for k, v in data.items()):
        raise ValueError("checksums must map relative file paths to sha256 hex strings")
    return dict(data)


def artifact_checksums(out: Path, graphs: Sequence[GraphRecord]) -> dict[str, str]:
    """sha256 of every regular file of `out` that the build wrote and the loader reads: the graphs' HLO
    (xla, nxd), their compiled files (xla: the persistent cache entries each graph added, one or two per
    graph; nxd: its NEFF and neuron/model.pt) and portable_cache.bin (inductor).

    Not compile_cache/ (inductor, neuron, recorded as a graph's file): the compiler writes and reads it
    itself, keyed by the content of what it caches, thousands of small files that it may add to at
    load; a corrupt entry there costs a recompile at worst, never other results."""
    names = {g.hlo_file for g in graphs if g.hlo_file} | {f for g in graphs for f in g.files}
    names.add(PORTABLE_CACHE_FILE)
    return {name: sha256_of(out / name) for name in sorted(names) if (out / name).is_file()}


def fingerprint(hlo_sha256: str, compiler_args: tuple[str, ...], versions: dict[str, str | None],
                weights: list[WeightsInfo | None]) -> str:
    """What a compiled graph depends on, hashed: its HLO, compiler arguments, versions and weights
    (their contents, not where they lie: moving a model directory recompiles nothing)."""
    payload = {"hlo": hlo_sha256, "compiler_args": list(compiler_args), "versions": versions,
               "weights": [[w.files, w.random_seed] if w is not None else None for w in weights]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
