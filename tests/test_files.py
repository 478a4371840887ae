"""Files written whole or not at all (neuron_peagle.files), and the checksum records built on them
(neuron_peagle.checksums)."""

from __future__ import annotations

import json
import os

import pytest

from neuron_peagle.output_dirs import check_output_dir, claim_output_dir, is_own_entry
from neuron_peagle.runtime.manifest import ARTIFACTS
from neuron_peagle.checksums import CHECKSUMS_FILE, file_checksums, record_checksums, verify_checksums
from neuron_peagle.errors import ArtifactError, WeightsError
from neuron_peagle.files import atomic_path, atomic_write_bytes, atomic_write_text, temporary_of, temporary_path


def test_a_write_replaces_the_content_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "model.safetensors"
    atomic_write_bytes(path, b"first")
    assert path.read_bytes() == b"first"
    atomic_write_text(path, "second \u00e9")
    assert path.read_text(encoding="utf-8") == "second \u00e9"
    with atomic_path(path) as tmp:
        assert tmp.parent == path.parent and tmp.name.startswith(".model.safetensors.tmp-")
        tmp.write_bytes(b"third")
        assert path.read_bytes() != b"third"  # not in place before the block ends
    assert path.read_bytes() == b"third"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_an_exception_inside_atomic_path_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_path(path) as tmp:
            tmp.write_text("half a new fi")
            raise RuntimeError("interrupted")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C too
        with atomic_path(tmp_path / "new.bin") as tmp:
            tmp.write_bytes(b"x")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_a_block_that_writes_nothing_is_an_error_and_leaves_the_old_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    with pytest.raises(FileNotFoundError, match="nothing was written"):
        with atomic_path(path):
            pass
    assert path.read_text() == "old"


def test_temporary_names_are_recognised_by_the_build(tmp_path):
    assert temporary_of(temporary_path(tmp_path / "manifest.json").name) == "manifest.json"
    assert temporary_of("manifest.json") is None and temporary_of(".hidden") is None
    assert temporary_of(".x.tmp-abc") is None
    assert is_own_entry(temporary_path(tmp_path / "portable_cache.bin").name, ARTIFACTS)
    assert is_own_entry("hlo", ARTIFACTS)
    assert not is_own_entry(temporary_path(tmp_path / "thesis.tex").name, ARTIFACTS)
    out = tmp_path / "out"
    out.mkdir()
    (out / ".manifest.json.tmp-123").write_text("{")  # an interrupted build's
    (out / "hlo").mkdir()
    check_output_dir(out, ARTIFACTS)
    (out / ".thesis.tex.tmp-123").write_text("mine")
    with pytest.raises(ArtifactError, match=r"holds files of its own \(\.thesis\.tex\.tmp-123\)"):
        check_output_dir(out, ARTIFACTS)


def test_a_build_removes_the_temporaries_of_killed_writes_and_nothing_else(tmp_path):
    """What a SIGKILLed write leaves (`.<name>.tmp-<pid>` of a process that has ended) is removed when a
    build accepts the directory, in subdirectories too; a live process's temporaries and every other
    file stay."""
    import subprocess
    import sys

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                           text=True, check=True)
    dead = int(ended.stdout)
    out = tmp_path / "out"
    (out / "hlo").mkdir(parents=True)
    stale = [out / f".manifest.json.tmp-{dead}", out / "hlo" / f".spec_step.hlo.pb.tmp-{dead}"]
    kept = [out / f".portable_cache.bin.tmp-{os.getpid()}", out / "hlo" / "spec_step.hlo.pb", out / "hlo" / ".notes"]
    for path in stale + kept:
        path.write_text("x")
    with claim_output_dir(out, ARTIFACTS):
        pass
    assert not any(path.exists() for path in stale)
    assert all(path.exists() for path in kept)


def test_checksum_records_verify_update_and_name_the_changed_file(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"a")
    (tmp_path / "b.bin").write_bytes(b"b")
    verify_checksums(tmp_path)  # no record: nothing to check
    record_checksums(tmp_path, ["a.bin"], create=False)
    assert not (tmp_path / CHECKSUMS_FILE).exists()  # create=False: only a directory that has a record
    record_checksums(tmp_path, ["a.bin", "b.bin"])
    assert json.loads((tmp_path / CHECKSUMS_FILE).read_text()) == file_checksums(tmp_path, ["a.bin", "b.bin"])
    verify_checksums(tmp_path)
    (tmp_path / "b.bin").write_bytes(b"B")
    with pytest.raises(WeightsError, match=r"b\.bin has sha256 [0-9a-f]{16}\.\.\., expected [0-9a-f]{16}\.\.\. "
                                           r".*modified or corrupted since it was saved"):
        verify_checksums(tmp_path)
    verify_checksums(tmp_path, names=["a.bin"])  # only the files asked for
    record_checksums(tmp_path, ["b.bin"], create=False)  # a rewrite records the new content, keeps the rest
    verify_checksums(tmp_path)
    assert set(json.loads((tmp_path / CHECKSUMS_FILE).read_text())) == {"a.bin", "b.bin"}
    (tmp_path / "a.bin").unlink()
    with pytest.raises(WeightsError, match=r"a\.bin is missing"):
        verify_checksums(tmp_path)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"a.bin": 3}', '{"a.bin": "not a digest"}',
                                     '{"../outside": "' + "0" * 64 + '"}', "\xff"])
def test_a_corrupt_checksum_record_is_refused_naming_it(tmp_path, content):
    (tmp_path / CHECKSUMS_FILE).write_bytes(content.encode("latin-1"))
    with pytest.raises(WeightsError, match=rf"{CHECKSUMS_FILE}: .*corrupt"):
        verify_checksums(tmp_path)
    record_checksums(tmp_path, [])  # a save writes a new record over a corrupt one
    assert json.loads((tmp_path / CHECKSUMS_FILE).read_text()) == {}
