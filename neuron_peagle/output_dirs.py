"""Output directories the tool owns: a build's artifact directory, a profiler session's directory.

A command writes only into a new or empty directory, or into one the same kind of command made (its
marker file, manifest.json or session.json, is a JSON object naming this tool and the kind). Everything
else is refused before anything is written, with the reason: an output that is a file, lies under a file
or cannot be written, a directory holding files of its own (without a marker, files named as the command's
are its own too, unless the command's lock shows a run of it was interrupted there), a marker file this tool
did not write (or anything else by that name). While a
command writes, it holds an exclusive lock on the directory (`.lock`, `flock`): a second writer is refused
at once, naming the holder's process id, so two builds never interleave their files. In a directory it
accepts, the temporaries a killed write left behind are removed (neuron_peagle.files).
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from neuron_peagle.errors import ArtifactError
from neuron_peagle.files import remove_stale_temporaries, temporary_of

TOOL = "neuron_peagle"
LOCK_NAME = ".lock"


@dataclass(frozen=True)
class OutputKind:
    what: str  # what the directory is, for messages: "artifact directory"
    marker: str  # the file that says the directory is one of ours: a JSON object with "tool" and "kind"
    entries: frozenset[str]  # every name the command writes at the top of the directory (the marker too)
    flag: str = "--out"


def marker_fields(kind: OutputKind) -> dict[str, str]:
    """The fields a marker file carries, besides its own content."""
    return {"tool": TOOL, "kind": kind.what}


def _marker_says_ours(directory: Path, kind: OutputKind) -> bool | None:
    """True: the marker file is one this tool wrote for `kind`; False: there is one, and it is not; None: none."""
    path = directory / kind.marker
    if not path.exists() and not path.is_symlink():
        return None
    if not path.is_file():  # a folder of that name, a link to nowhere: not a marker, and not to be written over
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get("tool") == TOOL and data.get("kind") == kind.what


def is_own_entry(name: str, kind: OutputKind) -> bool:
    """Whether an entry of an output directory is one the command writes, or the temporary of one."""
    return name == LOCK_NAME or name in kind.entries or temporary_of(name) in kind.entries


def check_output_dir(out: Path, kind: OutputKind) -> None:
    """Refuse, naming the reason, an output the command may not write into (see the module docstring)."""
    if str(out) == "":
        raise ArtifactError(f"{kind.flag} is empty: name the {kind.what}")
    for parent in [out, *out.parents]:
        if parent.exists() and not parent.is_dir():
            where = "is a file" if parent == out else f"lies under {parent}, which is a file"
            raise ArtifactError(f"{kind.flag} {out} {where}, not a {kind.what}")
    if out.is_dir():
        ours = _marker_says_ours(out, kind)
        if ours is False:
            raise ArtifactError(f"{out} holds a {kind.marker} that this tool did not write: it is not a {kind.what} "
                                f"of neuron_peagle, and nothing in it was changed; choose a new or empty directory")
        # Without a marker, a file named as one the command writes is what an interrupted run left only where
        # its lock is (a command makes the lock before it writes anything); elsewhere it is the user's.
        ran_here = (out / LOCK_NAME).is_file()
        foreign = sorted(p.name for p in out.iterdir() if not is_own_entry(p.name, kind)
                         or (not ran_here and p.name in kind.entries and p.is_file()))
        if ours is None and foreign:
            raise ArtifactError(f"{out} holds files of its own ({', '.join(foreign[:5])}"
                                f"{', ...' if len(foreign) > 5 else ''}) and no {kind.marker}: it is not a {kind.what}, "
                                f"and this tool writes only into a new or empty directory or a {kind.what} it made")
    existing = next(p for p in [out, *out.parents] if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ArtifactError(f"{kind.flag} {out}: {existing} is not writable")


@contextmanager
def claim_output_dir(out: Path, kind: OutputKind) -> Iterator[Path]:
    """The output directory, checked, created and locked for the block (see the module docstring)."""
    check_output_dir(out, kind)
    try:
        created = [p for p in [out, *out.parents] if not p.exists()]  # what a refused run leaves as it found
        out.mkdir(parents=True, exist_ok=True)
        handle = open(out / LOCK_NAME, "a+")
    except OSError as err:
        raise ArtifactError(f"{kind.flag} {out}: cannot write there ({err.strerror})") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise ArtifactError(f"{out} is being written by another process (pid {holder}): wait for it to finish, "
                                f"or choose another {kind.flag}") from None
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            check_output_dir(out, kind)  # again, now that no other writer can change it
            remove_stale_temporaries(out)
            yield out
        finally:
            if [p.name for p in out.iterdir()] == [LOCK_NAME]:  # nothing written: leave no trace
                (out / LOCK_NAME).unlink()
                for directory in created:
                    if directory.is_dir() and not any(directory.iterdir()):
                        directory.rmdir()
            fcntl.flock(handle, fcntl.LOCK_UN)
