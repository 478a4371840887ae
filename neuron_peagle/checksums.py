"""sha256 records of the files in a directory, and their verification at load.

A drafter directory saved by this library holds `checksums.json` (file name -> sha256 hex of each
file it wrote, written last): loading it refuses a file that was modified or corrupted since. A
directory without one (a drafter from another tool) loads unverified. Compiled artifacts keep the
same kind of record in their manifest (neuron_peagle/runtime/manifest.py `Manifest.checksums`) and verify it with
`find_mismatch` too.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from neuron_peagle.default_model import sha256_of
from neuron_peagle.errors import WeightsError
from neuron_peagle.files import atomic_write_text

CHECKSUMS_FILE = "checksums.json"
SHOWN = 16  # hex digits of a sha256 shown in messages


@dataclass(frozen=True)
class Mismatch:
    """A recorded file that is missing (`actual` None) or whose sha256 is not the recorded one."""

    path: Path
    expected: str
    actual: str | None

    def describe(self) -> str:
        if self.actual is None:
            return f"{self.path} is missing"
        return f"{self.path} has sha256 {self.actual[:SHOWN]}..., expected {self.expected[:SHOWN]}..."


def is_relative_name(name: str) -> bool:
    """A path inside the directory: relative, no '..' part (a record never points elsewhere)."""
    path = PurePosixPath(name)
    return bool(name) and not path.is_absolute() and ".." not in path.parts and "\\" not in name


def file_checksums(directory: Path, names: Iterable[str]) -> dict[str, str]:
    """name -> sha256 of each named file of `directory`, sorted by name."""
    return {name: sha256_of(directory / name) for name in sorted(names)}


def find_mismatch(directory: Path, expected: dict[str, str]) -> Mismatch | None:
    """The first recorded file (by name) that is missing or differs from its record, or None."""
    for name in sorted(expected):
        path = directory / name
        if not path.is_file():
            return Mismatch(path, expected[name], None)
        actual = sha256_of(path)
        if actual != expected[name]:
            return Mismatch(path, expected[name], actual)
    return None


def read_checksums(directory: Path) -> dict[str, str] | None:
    """The directory's checksums.json, checked to be a JSON object of file name -> sha256 hex; None
    when it has none. A corrupt one is a WeightsError naming it."""
    path = directory / CHECKSUMS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise WeightsError(f"{path}: unreadable checksum record ({err}); it is corrupt: restore it, or save the "
                           "drafter again") from None
    if not isinstance(data, dict) or not all(
            isinstance(name, str) and is_relative_name(name) and isinstance(digest, str) and _is_sha256(digest)
            for name, digest in data.items()):
        raise WeightsError(f"{path}: not a checksum record (a JSON object of file name -> sha256 hex); it is "
                           "corrupt: restore it, or save the drafter again")
    return data


def _is_sha256(digest: str) -> bool:
    return len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)


def write_checksums(directory: Path, record: dict[str, str]) -> None:
    """Write `record` as the directory's checksums.json, whole or not at all."""
    atomic_write_text(directory / CHECKSUMS_FILE, json.dumps(dict(sorted(record.items())), indent=2) + "\n")


def record_checksums(directory: Path, names: Iterable[str], create: bool = True) -> None:
    """Record the sha256 of the named files (just written) in the directory's checksums.json, keeping
    the entries of other files that still exist. With `create` False, only a directory that has a
    checksums.json gets them (a drafter from another tool is left without one)."""
    previous = _readable_checksums(directory) if create else read_checksums(directory)
    if previous is None and not create:
        return
    kept = {name: digest for name, digest in (previous or {}).items() if (directory / name).is_file()}
    write_checksums(directory, {**kept, **file_checksums(directory, names)})


def _readable_checksums(directory: Path) -> dict[str, str] | None:
    """read_checksums, with a corrupt record taken as none: a save writes a new one over it."""
    try:
        return read_checksums(directory)
    except WeightsError:
        return None


def verify_checksums(directory: str | Path, names: Iterable[str] | None = None, kind: str = "drafter") -> None:
    """When `directory` has a checksums.json, every file it lists (or, with `names`, those of the named
    files it lists) must exist with its recorded sha256, else a WeightsError naming the file. Without
    one, nothing is checked."""
    directory = Path(directory)
    recorded = read_checksums(directory)
    if recorded is None:
        return
    if names is not None:
        recorded = {name: recorded[name] for name in names if name in recorded}
    mismatch = find_mismatch(directory, recorded)
    if mismatch is not None:
        raise WeightsError(f"{mismatch.describe()} (recorded in {directory / CHECKSUMS_FILE}): the {kind} was "
                           f"modified or corrupted since it was saved; restore the file, or save the {kind} again")
