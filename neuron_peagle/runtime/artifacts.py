"""Opening compiled artifacts (`Engine.from_compiled`): every check that needs no model loaded.

Refused, each with an ArtifactError that names the problem, before any model is loaded:
- a package version differing from the one the graphs were compiled with;
- a weight or config file (target or drafter) whose sha256 is not the recorded one;
- a requested shape, mode or backend other than the one built;
- a file of the artifacts (HLO, compiled graph, portable cache) missing or not as built (the
  manifest's `checksums`).
Then the backend the artifacts were built for points its compiler's caches at them (`use_artifacts`),
first thing; the engine is built on the recorded settings, its graphs planned by the same code that
planned the build (graphs/interface.py), and the backend loads them (`load_artifacts`: each backend's
own loader, backends/*_artifacts.py), warming every one, so that generation compiles nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from neuron_peagle.backends import Backend, get_backend
from neuron_peagle.checksums import find_mismatch
from neuron_peagle.capabilities import capabilities_of
from neuron_peagle.errors import ArtifactError
from neuron_peagle.runtime.manifest import Manifest, WeightsInfo, installed_versions


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
    lnc: int | str | None = None  # "auto": what auto means on the artifacts' backend, here
    lookup_ngram: int | None = None
    short_draft_tokens: int | None = None
    plain_step: bool | None = None
    datastore: bool | None = None


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
             "dtype": manifest.build.dtype, "kernels": manifest.build.kernels, "lnc": manifest.build.lnc}
    wrong = []
    for name, value in built.items():
        asked = getattr(request, name)
        if name == "kernels" and asked is not None:
            asked = capabilities_of(manifest.backend).kernels_for(asked)
        if name == "lnc" and asked is not None:
            asked = capabilities_of(manifest.backend).lnc_for(asked)
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


def open_artifacts(artifact_dir: Path, request: ArtifactRequest) -> tuple[Manifest, Backend, Path, Path | None]:
    """The manifest, the backend it was built for (its compiler's caches pointed at the artifacts), and the
    model and drafter directories, after every check that needs no model loaded."""
    manifest = Manifest.load(artifact_dir)
    backend = get_backend(manifest.backend, manifest.tp_degree)  # a missing device stack: said first
    _check_versions(manifest)
    check_request(manifest, request)
    check_artifact_files(artifact_dir, manifest)
    model_dir = request.model_dir or Path(manifest.model.path)
    _check_weights(manifest.model, model_dir, "model")
    drafter_dir = None
    if manifest.drafter is not None and manifest.drafter.path is not None:
        drafter_dir = request.drafter_dir or Path(manifest.drafter.path)
        _check_weights(manifest.drafter, drafter_dir, "drafter")
    backend.use_artifacts(artifact_dir, writable=False)
    return manifest, backend, model_dir, drafter_dir
