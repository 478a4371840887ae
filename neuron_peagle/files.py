"""Files written whole or not at all: every file a build or a save writes goes through here.

A file is written under a temporary name beside its destination (`.<name>.tmp-<pid>`: same directory,
so the same file system), flushed to the disk, then renamed onto the destination with `os.replace`,
which is atomic. An interrupted write (an exception, Ctrl-C, a crash, a full disk) leaves the old file
as it was, never half a new one; on an exception the temporary is removed too.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMPORARY_MARK = ".tmp-"


def temporary_path(path: str | Path) -> Path:
    """The temporary sibling `atomic_path` writes `path` under: `.<name>.tmp-<pid>`."""
    path = Path(path)
    return path.with_name(f".{path.name}{TEMPORARY_MARK}{os.getpid()}")


def _parse_temporary(name: str) -> tuple[str, int] | None:
    """(the file name it stands for, the writer's pid) of a temporary sibling's name, else None."""
    if not name.startswith("."):
        return None
    target, mark, pid = name[1:].rpartition(TEMPORARY_MARK)
    return (target, int(pid)) if mark and target and pid.isdigit() else None


def temporary_of(name: str) -> str | None:
    """The file name a temporary sibling stands for ("manifest.json" for ".manifest.json.tmp-12"), or
    None when `name` is not one (what a directory listing shows after an interrupted write)."""
    parsed = _parse_temporary(name)
    return parsed[0] if parsed else None


def process_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, only the process's existence is checked
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete the temporaries (`.<name>.tmp-<pid>`) under `directory` whose writing process has ended:
    what a write killed outright (SIGKILL, a power cut) leaves behind. A live process's are kept, and so is
    every other file. Returns the paths removed."""
    removed = []
    for path in sorted(Path(directory).rglob(f".*{TEMPORARY_MARK}*")):
        parsed = _parse_temporary(path.name)
        if parsed is None or not path.is_file():
            continue
        if not process_is_alive(parsed[1]):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _fsync(path: Path) -> None:
    """Flush a file (or a directory's entries) to the disk; best effort for directories, which not every
    platform or file system lets one open."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():
            return
        raise
    try:
        os.fsync(descriptor)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(descriptor)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path for the block to write `path`'s new content to (with any writer
    that takes a path); when the block succeeds it becomes `path` in one rename, when it raises it is
    removed and `path` is left as it was. The block must create the file."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"nothing was written to {tmp} (the temporary of {path})")
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` whole or not at all."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` whole or not at all."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
