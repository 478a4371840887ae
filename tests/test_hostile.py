"""Hostile use: output directories that are not the tool's, two builds at once, manifests that lie, values
of the wrong type. Every refusal is checked twice: for what it says (one line and exit 2 on the command
line, a NeuronPeagleError from the API, before any model loads) and for what it keeps (nothing outside
--out is written or deleted, and a directory of the user's is left as it was, byte for byte).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compile.build import main as build_main
from neuron_peagle.backends.artifacts import prune
from neuron_peagle.cli import main
from neuron_peagle.capabilities import BACKENDS, KERNEL_MODES
from neuron_peagle.config import DTYPES
from neuron_peagle.errors import ArtifactError, ConfigError, NeuronPeagleError
from neuron_peagle.output_dirs import LOCK_NAME, check_output_dir, claim_output_dir
from neuron_peagle.profiling import SESSION, profile_generation
from neuron_peagle.runtime.engine import Engine, SamplingParams
from neuron_peagle.runtime.manifest import (ARTIFACTS, HLO_DIR, MANIFEST_NAME, NEURON_DIR, XLA_CACHE_DIR, Manifest,
                                            sealed)
from neuron_peagle.speculation import MODES
from spec_helpers import fill_table, make_engine, table_engine
from test_reliability import _refused, no_model_loads  # noqa: F401  (a fixture)

REPO = Path(__file__).resolve().parent.parent
SHAPES = ["--max-length", "64", "--prefill-buckets", "16"]
TINY = [*SHAPES, "--max-new-tokens", "4", "--backend", "eager", "--no-chat-template"]
PLAIN_BUILD = ["--mode", "plain", *SHAPES]
# A build's own compiler cache goes into its --out: not into one the environment names.
ENV = {**{k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}, "OMP_NUM_THREADS": "1",
       "PJRT_DEVICE": "CPU"}
PRUNED_FOLDERS = (HLO_DIR, XLA_CACHE_DIR, NEURON_DIR)


def snapshot(root: Path) -> dict[str, tuple]:
    """Everything under `root`, itself included: kind, content and modification time, for comparing."""
    entries = {}
    for path in [root, *sorted(root.rglob("*"))]:
        name, mtime = str(path.relative_to(root)), path.lstat().st_mtime_ns
        if path.is_symlink():
            entries[name] = ("link", os.readlink(path), mtime)
        elif path.is_dir():
            entries[name] = ("dir", None, mtime)
        else:
            entries[name] = ("file", path.read_bytes(), mtime)
    return entries


def users_directory(path: Path, files: dict[str, str]) -> Path:
    """A directory of the user's: `files` (name -> text) and a web app's own files beside them."""
    (path / "assets").mkdir(parents=True)
    (path / "assets" / "app.js").write_text("console.log('mine')\n")
    (path / "index.html").write_text("<h1>mine</h1>\n")
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def build_command(model_dir: Path, out: Path, backend: str = "inductor") -> list[str]:
    return [sys.executable, "-m", "compile.build", "--backend", backend, "--model", str(model_dir), "--out", str(out),
            *PLAIN_BUILD]


def run_build(model_dir: Path, out: Path, backend: str = "inductor") -> subprocess.CompletedProcess:
    """A build in a fresh process, as builds must run."""
    return subprocess.run(build_command(model_dir, out, backend), capture_output=True, text=True, cwd=REPO, env=ENV,
                          timeout=1200)


@pytest.fixture(scope="module")
def built(tiny_llama_dir, tmp_path_factory) -> Path:
    """Real inductor artifacts of the tiny model (plain decoding, one bucket): four graphs. Tests copy them."""
    out = tmp_path_factory.mktemp("built") / "artifacts"
    result = run_build(tiny_llama_dir, out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def copy_of(artifacts: Path, dest: Path) -> Path:
    return Path(shutil.copytree(artifacts, dest, symlinks=True))


# ---- 1. a build into a directory holding a manifest.json it did not write ---------------------------

@pytest.mark.parametrize("manifest", [
    '{"name": "app", "short_name": "app", "start_url": "/"}',  # a web app's
    '[{"name": "app"}]',  # JSON, but a list
    '{"tool": "neuron_peagle", "kind": "profiler session"}',  # ours, but of another kind
    "{not json",
])
def test_a_build_refuses_a_directory_with_a_manifest_it_did_not_write(manifest, tmp_path, tiny_llama_dir, capsys,
                                                                     no_model_loads):
    out = users_directory(tmp_path / "webapp", {MANIFEST_NAME: manifest})
    before = snapshot(tmp_path)
    line = _refused(capsys, ["--model", str(tiny_llama_dir), "--out", str(out), *PLAIN_BUILD], command=build_main)
    assert f"{out} holds a manifest.json that this tool did not write" in line
    assert snapshot(tmp_path) == before  # no .lock, no compile_log.jsonl: nothing added, nothing changed
    with pytest.raises(ArtifactError, match="is not a manifest this tool wrote|not valid JSON"):
        Manifest.load(out)


@pytest.mark.parametrize("kind", [ARTIFACTS, SESSION], ids=lambda kind: kind.marker)
def test_a_marker_that_is_not_a_file_is_not_taken_for_one_of_ours(kind, tmp_path):
    """A folder of the user's named manifest.json (or session.json), alone in the directory, or a link to
    nowhere under that name: refused, not written over."""
    out = tmp_path / "out"
    (out / kind.marker).mkdir(parents=True)
    (out / kind.marker / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match=f"holds a {kind.marker} that this tool did not write"):
        check_output_dir(out, kind)
    shutil.rmtree(out / kind.marker)
    (out / kind.marker).symlink_to(tmp_path / "nowhere")
    with pytest.raises(ArtifactError, match=f"holds a {kind.marker} that this tool did not write"):
        check_output_dir(out, kind)


# ---- 2. a profile into a directory of the user's ----------------------------------------------------

USERS_SESSION_FILES = {"trace.json": '{"traceEvents": [{"name": "mine"}]}', "ops.txt": "my notes\n",
                       "steps.jsonl": '{"step": "mine"}\n'}


@pytest.mark.parametrize("session", ['{"name": "my capture"}', "[1, 2]", None])
def test_profile_refuses_a_directory_of_the_users_session_files(session, tmp_path, tiny_llama_dir, capsys,
                                                                no_model_loads):
    """The user's trace.json, ops.txt and steps.jsonl, with a session.json that is not ours or with none:
    refused before the model loads, and not one byte changes."""
    files = {**USERS_SESSION_FILES, **({"session.json": session} if session is not None else {})}
    out = users_directory(tmp_path / "traces", files)
    before = snapshot(tmp_path)
    line = _refused(capsys, ["profile", "hello", "--model", str(tiny_llama_dir), "--out", str(out), *TINY])
    if session is not None:
        assert f"{out} holds a session.json that this tool did not write" in line
    else:
        assert f"{out} holds files of its own (" in line and "no session.json" in line
    assert snapshot(tmp_path) == before


def test_profile_refuses_the_users_session_files_even_alone(tmp_path, tiny_llama_dir, capsys, no_model_loads):
    """Only files named as a session's own (no session.json, no lock: no session ever ran there)."""
    out = tmp_path / "traces"
    out.mkdir()
    for name, text in USERS_SESSION_FILES.items():
        (out / name).write_text(text)
    before = snapshot(tmp_path)
    line = _refused(capsys, ["profile", "hello", "--model", str(tiny_llama_dir), "--out", str(out), *TINY])
    assert "holds files of its own (ops.txt, steps.jsonl, trace.json) and no session.json" in line
    assert snapshot(tmp_path) == before


def test_an_empty_out_is_one_line(tmp_path, tiny_llama_dir, capsys, monkeypatch, no_model_loads):
    monkeypatch.chdir(tmp_path)  # where an empty path would have written
    for value in ("", " "):
        line = _refused(capsys, ["profile", "hello", "--model", str(tiny_llama_dir), "--out", value, *TINY])
        assert "argument --out: must name a directory, got an empty string" in line
        line = _refused(capsys, ["--model", str(tiny_llama_dir), f"--out={value}", *PLAIN_BUILD], command=build_main)
        assert "argument --out: must name a directory, got an empty string" in line
    assert list(tmp_path.iterdir()) == []


def test_profile_writes_a_new_session_and_again_into_its_own(tmp_path, tiny_llama_dir, capsys):
    out = tmp_path / "session"
    argv = ["profile", "hello there", "--model", str(tiny_llama_dir), "--out", str(out), *TINY]
    assert main(argv) == 0
    first = json.loads((out / "session.json").read_text())
    assert (first["tool"], first["kind"]) == ("neuron_peagle", SESSION.what)
    (out / "README.txt").write_text("notes the user keeps beside the session")
    trace = (out / "trace.json").read_bytes()
    assert main(argv) == 0  # its own session: accepted, its files replaced, the user's kept
    capsys.readouterr()
    assert json.loads((out / "session.json").read_text())["tool"] == "neuron_peagle"
    assert (out / "trace.json").read_bytes() != trace
    assert (out / "README.txt").read_text() == "notes the user keeps beside the session"


def test_a_session_interrupted_before_its_session_json_is_written_again(tmp_path, tiny_llama_dir, capsys):
    """What a killed session leaves (its lock, steps.jsonl, no session.json) is its own: a new session
    is written over it."""
    out = tmp_path / "session"
    out.mkdir()
    (out / LOCK_NAME).write_text("12345\n")
    (out / "steps.jsonl").write_text('{"step": 0}\n')
    assert main(["profile", "hello", "--model", str(tiny_llama_dir), "--out", str(out), *TINY]) == 0
    capsys.readouterr()
    assert json.loads((out / "session.json").read_text())["tool"] == "neuron_peagle"


@pytest.mark.parametrize("kind", ["artifacts into a session", "a session into artifacts"])
def test_a_directory_of_one_kind_is_refused_as_the_other(kind, built, tmp_path, tiny_llama_dir, capsys,
                                                         no_model_loads):
    if kind == "a session into artifacts":
        out = copy_of(built, tmp_path / "artifacts")
        argv, command, message = (["profile", "hello", "--model", str(tiny_llama_dir), "--out", str(out), *TINY],
                                  main, f"{out} holds files of its own (")
    else:
        out = tmp_path / "session"
        out.mkdir()
        (out / "session.json").write_text(json.dumps({"tool": "neuron_peagle", "kind": SESSION.what}))
        (out / "steps.jsonl").write_text("")
        argv, command, message = (["--model", str(tiny_llama_dir), "--out", str(out), *PLAIN_BUILD], build_main,
                                  f"{out} holds files of its own (session.json, steps.jsonl) and no manifest.json")
    before = snapshot(out)
    assert message in _refused(capsys, argv, command=command)
    assert snapshot(out) == before


# ---- 3. a rebuild whose manifest lists paths outside --out ------------------------------------------

def _previous_listing(*graphs: tuple[str, tuple[str, ...]]) -> SimpleNamespace:
    """What prune reads of a previous manifest: each graph's HLO file and compiled files."""
    return SimpleNamespace(graphs=[SimpleNamespace(hlo_file=hlo, files=files) for hlo, files in graphs])


@pytest.mark.parametrize("listed", ["hlo/../../victim", "<absolute victim>", "xla_cache/../../outside",
                                    "<absolute outside>", "neuron/../../outside/keep.txt"])
def test_prune_refuses_a_path_outside_out_before_deleting_anything(listed, tmp_path):
    out = tmp_path / "out"
    for folder in PRUNED_FOLDERS:
        (out / folder).mkdir(parents=True)
    removed = out / "hlo" / "removed.hlo.txt"  # a graph no longer planned: the prune would delete it
    removed.write_text("HloModule removed\n")
    victim, outside = tmp_path / "victim", tmp_path / "outside"
    victim.write_text("the user's")
    outside.mkdir()
    (outside / "keep.txt").write_text("the user's too")
    listed = {"<absolute victim>": str(victim), "<absolute outside>": str(outside)}.get(listed, listed)
    previous = _previous_listing(("hlo/removed.hlo.txt", ()), ("", (listed,)))
    before = snapshot(tmp_path)
    try:
        prune(out, previous, set(), PRUNED_FOLDERS)
        refusal = None
    except ArtifactError as err:
        refusal = str(err)
    assert victim.read_text() == "the user's" and (outside / "keep.txt").read_text() == "the user's too"
    assert refusal is not None, f"prune took a previous manifest listing {listed!r} for one of ours"
    assert f"lists {listed!r}, which lies outside {out}" in refusal and "nothing was deleted" in refusal
    assert snapshot(tmp_path) == before  # not even the file it would have deleted
    prune(out, _previous_listing(("hlo/removed.hlo.txt", ())), set(), PRUNED_FOLDERS)  # without the lie: deleted
    assert not removed.exists() and victim.exists()


@pytest.fixture(scope="module")
def xla_built(tiny_llama_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("xla_built") / "artifacts"
    result = run_build(tiny_llama_dir, out, backend="xla")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _lie_about(data: dict, where: str, victim: Path, outside: Path) -> str:
    """Edit a manifest's graphs to list a path outside the artifact directory; returns the path listed."""
    graph = data["graphs"][0]
    if where == "a graph's HLO file through ..":
        graph["hlo_file"] = listed = "hlo/../../victim"
    elif where == "a graph's HLO file, absolute":
        graph["hlo_file"] = listed = str(victim)
    elif where == "a removed graph's directory through ..":
        listed = "xla_cache/../../outside"
        data["graphs"].append({**graph, "name": "decode_removed", "files": [listed]})
    elif where == "an up-to-date graph's file through ..":
        listed = "xla_cache/../../victim"
        graph["files"] = [listed]
    else:  # an up-to-date graph's file, absolute
        graph["files"] = [listed := str(victim)]
    return listed


@pytest.mark.xla
@pytest.mark.parametrize("where", ["a graph's HLO file through ..", "a graph's HLO file, absolute",
                                   "a removed graph's directory through ..", "an up-to-date graph's file through ..",
                                   "an up-to-date graph's file, absolute"])
def test_a_rebuild_whose_manifest_lists_a_path_outside_is_refused_and_deletes_nothing(where, xla_built,
                                                                                      tiny_llama_dir, tmp_path):
    """A real manifest of ours, edited to list a path outside --out and sealed again (so it passes the
    content check): the rebuild refuses before deleting anything, naming the path."""
    out = copy_of(xla_built, tmp_path / "artifacts")
    victim, outside = tmp_path / "victim", tmp_path / "outside"
    victim.write_text("the user's")
    outside.mkdir()
    (outside / "keep.txt").write_text("the user's too")
    data = json.loads((out / MANIFEST_NAME).read_text())
    listed = _lie_about(data, where, victim, outside)
    (out / MANIFEST_NAME).write_text(json.dumps(sealed(data), indent=1) + "\n")
    Manifest.load(out)  # the build takes it for its own
    # What the rebuild keeps as it was (it appends to its log, and its lock names it).
    built_files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name not in ("compile_log.jsonl",
                                                                                                LOCK_NAME)}

    result = run_build(tiny_llama_dir, out, backend="xla")
    assert victim.read_text() == "the user's" and (outside / "keep.txt").read_text() == "the user's too"
    assert result.returncode == 2, f"the rebuild accepted a manifest listing {listed!r}: {result.stderr[-2000:]}"
    assert {p: p.read_bytes() for p in built_files} == built_files  # nothing of the artifacts changed either
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("neuron-peagle-compile: error: ") and "Traceback" not in result.stderr
    assert f"lists {listed!r}, which lies outside {out}" in last and "nothing was deleted" in last


# ---- 4. two builds into one directory at once -------------------------------------------------------

HOLD_THE_LOCK = """
import sys
from pathlib import Path
from neuron_peagle.output_dirs import claim_output_dir
from neuron_peagle.runtime.manifest import ARTIFACTS
with claim_output_dir(Path(sys.argv[1]), ARTIFACTS):
    print("held", flush=True)
    sys.stdin.read()
"""


def _locked_out(out: Path, pid: int) -> str:
    return (f"neuron-peagle-compile: error: {out} is being written by another process (pid {pid}): wait for it to "
            "finish, or choose another --out")


def test_a_build_into_a_directory_another_build_holds_is_refused_naming_its_pid(built, tmp_path, tiny_llama_dir):
    out = copy_of(built, tmp_path / "artifacts")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(out)], cwd=REPO, env=ENV, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(out)
        refused = run_build(tiny_llama_dir, out)
        assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [_locked_out(out, holder.pid)]
        assert snapshot(out) == before
    finally:
        holder.stdin.close()
        holder.wait(timeout=120)

    with claim_output_dir(out, ARTIFACTS):  # this process holds it now
        before = snapshot(out)
        refused = run_build(tiny_llama_dir, out)
        assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [_locked_out(out, os.getpid())]
        assert snapshot(out) == before
    # Released: the same build runs, and the manifest it leaves loads.
    done = run_build(tiny_llama_dir, out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [g.name for g in Manifest.load(out).graphs] == [g.name for g in Manifest.load(built).graphs]


# ---- 5. a profile counts the tokens the requests kept -----------------------------------------------

def test_a_session_counts_only_the_tokens_the_requests_kept(tiny_llama_dir, tmp_path):
    """K=3 with context lookup before an oracle drafter (the target's own continuation): steps commit up to
    four tokens, so the last step of a request of 8 commits more than the request keeps."""
    prompts = [[5, 6, 7, 8, 9], [20, 21, 22]]
    plain = make_engine(tiny_llama_dir, mode="plain", batch_size=2, max_length=64, prefill_buckets=(16,))
    greedy = [o.output_ids for o in plain.generate(prompts, SamplingParams(max_new_tokens=24, ignore_eos=True))]
    engine = table_engine(tiny_llama_dir, k=3, batch_size=2, max_length=64, buckets=(16,), lookup_ngram=2)
    fill_table(engine, prompts, greedy)
    outputs, report = profile_generation(engine, prompts, SamplingParams(max_new_tokens=8, ignore_eos=True),
                                         tmp_path / "session", trace=False)
    assert [o.output_ids for o in outputs] == [ids[:8] for ids in greedy]
    summary = json.loads((tmp_path / "session" / "session.json").read_text())["summary"]
    steps = [json.loads(line) for line in (tmp_path / "session" / "steps.jsonl").read_text().splitlines()]
    kept = sum(o.stats.num_decoded_tokens for o in outputs)
    assert kept == sum(len(o.output_ids) - 1 for o in outputs) == 14  # the first token of each is the prefill's
    assert summary["decoded_tokens"] == report.summary["decoded_tokens"] == kept
    assert sum(sum(s["counts"]) for s in steps) > kept  # the steps committed more than was kept
    assert summary["tokens_per_s"] == pytest.approx(kept / sum(s["wall_s"] for s in steps))


# ---- 6. the API's keywords are checked before any work ----------------------------------------------

@pytest.fixture(scope="module")
def engine(tiny_llama_dir) -> Engine:
    return make_engine(tiny_llama_dir, num_speculative_tokens=3, lookup_ngram=2, max_length=64, prefill_buckets=(16,))


@pytest.fixture
def no_prefill(engine, monkeypatch):
    """Make a prefill an error: a refusal must come before it."""
    monkeypatch.setattr(engine.runner, "admit", lambda *args: pytest.fail("the prefill ran before the refusal"))


@pytest.mark.parametrize("keyword, value, message", [
    ("chat_template", "no", "chat_template must be True or False, got 'no'"),
    ("chat_template", None, "chat_template must be True or False, got None"),
    ("on_tokens", 5, "on_tokens must be a function or None, got 5"),
    ("on_step", "print", "on_step must be a function or None, got 'print'"),
    ("on_output", [print], "on_output must be a function or None"),
    ("params", {"max_new_tokens": 2}, "params must be a SamplingParams or one per prompt, got dict"),
])
def test_generate_refuses_a_keyword_of_the_wrong_type_before_the_prefill(keyword, value, message, engine, no_prefill):
    kwargs = {"params": SamplingParams(max_new_tokens=2), keyword: value}
    with pytest.raises(ConfigError, match=re.escape(message)):
        engine.generate(["hello"], **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"ignore_eos": "yes"}, "ignore_eos must be True or False, got 'yes'"),
    ({"ignore_eos": 1}, "ignore_eos must be True or False, got 1"),
    ({"top_k": 10**30}, f"top_k must be <= {2**63 - 1}"),
    ({"seed": 2**64}, f"seed must be <= {2**63 - 1}"),
    ({"stop": "x\ud800"}, "not valid UTF-8"),
    ({"stop_token_ids": "2"}, "stop_token_ids must be a list"),
])
def test_sampling_params_refuse_values_of_the_wrong_type_or_range(kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        SamplingParams(**kwargs)


# ---- 7. an edited manifest --------------------------------------------------------------------------

@pytest.mark.parametrize("edit", ["num_speculative_tokens", "max_length"])
def test_an_edited_manifest_is_refused_and_nothing_is_written_into_the_artifacts(edit, built, tmp_path, capsys,
                                                                                 monkeypatch, no_model_loads):
    monkeypatch.setattr(os, "environ", dict(os.environ))  # profile sets the Neuron runtime's capture settings
    out = copy_of(built, tmp_path / "artifacts")
    data = json.loads((out / MANIFEST_NAME).read_text())
    if edit == "num_speculative_tokens":
        data["speculation"]["num_speculative_tokens"] = 3
    else:
        data["build"]["max_length"] = 128
    (out / MANIFEST_NAME).write_text(json.dumps(data, indent=1) + "\n")
    before = snapshot(out)
    with pytest.raises(ArtifactError, match=r"manifest\.json was edited since the build"):
        Engine.from_compiled(out)
    line = _refused(capsys, ["generate", "hello", "--artifacts", str(out), "--max-new-tokens", "4"])
    assert "manifest.json was edited since the build" in line and "rebuild them" in line
    line = _refused(capsys, ["profile", "hello", "--artifacts", str(out), "--out", str(tmp_path / "session")])
    assert "manifest.json was edited since the build" in line
    assert snapshot(out) == before
    assert not (tmp_path / "session").exists()


# ---- refusals that were tracebacks ------------------------------------------------------------------

def test_a_top_k_beyond_64_bits_is_refused(tiny_llama_dir, capsys, no_model_loads):
    line = _refused(capsys, ["generate", "hi", "--model", str(tiny_llama_dir), *TINY, "--top-k", str(2**63)])
    assert f"--top-k must be <= {2**63 - 1}, got {2**63}" in line
    with pytest.raises(ConfigError, match=f"top_k must be <= {2**63 - 1}"):
        SamplingParams(top_k=10**30)


@pytest.mark.parametrize("options, message", [
    (["--lookup-ngram", "100"], "--lookup-ngram 100 must be below --max-length 64"),
    (["--lookup-ngram", "64"], "--lookup-ngram 64 must be below --max-length 64"),
    (["-k", "63"], "--num-speculative-tokens 63 leaves no room in --max-length 64"),
])
def test_lookup_and_k_beyond_max_length_are_refused_before_the_model_loads(options, message, tiny_llama_dir, capsys,
                                                                           no_model_loads, tmp_path):
    for command in ("generate", "profile"):
        out = ["--out", str(tmp_path / "session")] if command == "profile" else []
        line = _refused(capsys, [command, "hi", "--model", str(tiny_llama_dir), *TINY, *out, *options])
        assert message in line
    assert list(tmp_path.iterdir()) == []


def test_a_build_with_lookup_beyond_max_length_is_refused_and_writes_nothing(tiny_llama_dir, tmp_path):
    out = tmp_path / "artifacts"  # (a process of its own: a build points the compiler's cache at its --out)
    result = subprocess.run([sys.executable, "-m", "compile.build", "--model", str(tiny_llama_dir), "--out", str(out),
                             *SHAPES, "--lookup-ngram", "100"], capture_output=True, text=True, cwd=REPO, env=ENV,
                            timeout=300)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "neuron-peagle-compile: error: --lookup-ngram 100 must be below --max-length 64: the n-gram is looked up in "
        "the sequence, which the cache holds"]
    assert list(tmp_path.iterdir()) == [], f"the refused build wrote {sorted(p.name for p in out.rglob('*'))}"


def _as_without_override(argv: list[str]) -> subprocess.CompletedProcess | None:
    """`neuron-peagle argv` in a process without the capabilities that let root write anywhere (None where
    they cannot be dropped here)."""
    setpriv = shutil.which("setpriv")
    drop = [setpriv, "--bounding-set=-dac_override,-dac_read_search"] if setpriv else None
    if drop is None or subprocess.run([*drop, "true"], capture_output=True).returncode != 0:
        return None
    return subprocess.run([*drop, sys.executable, "-m", "neuron_peagle.cli", *argv], capture_output=True, text=True,
                          cwd=REPO, env=ENV, timeout=300)


def test_profile_into_an_unwritable_directory_is_refused_before_generating(tmp_path, tiny_llama_dir, capsys,
                                                                          no_model_loads):
    parent = tmp_path / "read-only"
    parent.mkdir()
    out = parent / "session"
    argv = ["profile", "hello", "--model", str(tiny_llama_dir), "--out", str(out), *TINY]
    parent.chmod(0o555)
    try:
        if not os.access(parent, os.W_OK):
            line = _refused(capsys, argv)
        else:  # root writes into a 0o555 directory: refused only without that privilege
            result = _as_without_override(argv)
            if result is None:
                pytest.skip("running as root, for whom a 0o555 directory is writable, and the privilege cannot be "
                            "dropped here (setpriv)")
            assert result.returncode == 2 and result.stdout == "", result.stderr  # nothing generated, nothing printed
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and "Traceback" not in result.stderr
            line = lines[0]
        assert f"--out {out}: {parent} is not writable" in line
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)


def test_an_out_under_a_file_is_refused_by_build_and_profile(tmp_path, tiny_llama_dir, capsys, no_model_loads):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    out = notes / "session"
    line = _refused(capsys, ["profile", "hello", "--model", str(tiny_llama_dir), "--out", str(out), *TINY])
    assert f"--out {out} lies under {notes}, which is a file" in line
    line = _refused(capsys, ["--model", str(tiny_llama_dir), "--out", str(out), *PLAIN_BUILD], command=build_main)
    assert f"--out {out} lies under {notes}, which is a file" in line
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"] and notes.read_text() == "mine"


@pytest.mark.parametrize("source", ["/dev/zero", "a named pipe", "standard input from /dev/zero"])
def test_a_prompts_file_that_never_ends_is_refused_at_once(source, tmp_path, tiny_llama_dir):
    stdin, path = subprocess.DEVNULL, source
    if source == "a named pipe":
        path = str(tmp_path / "pipe")
        os.mkfifo(path)  # opening it would wait for a writer forever
    message = f"{path} is not a regular file: give a prompts file, or - for standard input"
    if source == "standard input from /dev/zero":
        stdin, path, message = open("/dev/zero", "rb"), "-", "<stdin>:1: longer than 16 MiB: not a prompts file"
    try:
        result = subprocess.run([sys.executable, "-m", "neuron_peagle.cli", "generate", "--prompts-file", path,
                                 "--model", str(tiny_llama_dir), *TINY], stdin=stdin, capture_output=True, text=True,
                                cwd=REPO, env=ENV, timeout=240)
    finally:
        if stdin is not subprocess.DEVNULL:
            stdin.close()
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [f"neuron-peagle: error: {message}"]


def test_a_prompt_that_starts_with_a_dash_gets_the_hint_and_runs_after_double_dash(tiny_llama_dir, capsys):
    line = _refused(capsys, ["generate", "-x", "--model", str(tiny_llama_dir), *TINY])
    assert "'-x' was read as an option: text that starts with '-' goes after the options and `--`" in line
    assert main(["generate", "--model", str(tiny_llama_dir), *TINY, "--json", "--", "-x"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt"] == "-x"


# ---- the property: any wrong keyword value of the API is a NeuronPeagleError, before any work -------

NOT_BOOL = st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=4), st.lists(st.booleans(), max_size=2))
NOT_CALLABLE = st.one_of(st.integers(), st.floats(), st.text(max_size=4), st.lists(st.integers(), max_size=2),
                         st.dictionaries(st.text(max_size=2), st.integers(), max_size=2), st.binary(max_size=4))
NOT_INT = st.one_of(st.floats(), st.booleans(), st.text(max_size=4), st.lists(st.integers(), max_size=2),
                    st.complex_numbers(), st.binary(max_size=4))  # no None: where None is allowed it means a default
NOT_REAL = st.one_of(st.none(), st.booleans(), st.text(max_size=4), st.lists(st.floats(), max_size=2),
                     st.complex_numbers())
NOT_TEXT = st.one_of(st.none(), st.integers(), st.floats(), st.booleans(), st.binary(max_size=4),
                     st.lists(st.text(max_size=3), max_size=2),
                     st.dictionaries(st.text(max_size=2), st.text(max_size=2), max_size=2))
NOT_FINITE = st.sampled_from([float("nan"), float("inf"), float("-inf")])


def _text_except(*allowed: str) -> st.SearchStrategy:
    return st.one_of(st.text(max_size=10).filter(lambda t: t not in allowed), NOT_TEXT)


SAMPLING_BAD = {
    "max_new_tokens": st.one_of(st.integers(max_value=0), NOT_INT, st.none()),
    "temperature": st.one_of(st.floats(max_value=-1e-9), NOT_FINITE, NOT_REAL),
    "top_k": st.one_of(st.integers(max_value=-1), st.integers(min_value=2**63), NOT_INT),
    "top_p": st.one_of(st.floats(max_value=0), st.floats(min_value=1, exclude_min=True), NOT_FINITE, NOT_REAL),
    "seed": st.one_of(st.integers(max_value=-1), st.integers(min_value=2**63), NOT_INT),
    "stop_token_ids": st.one_of(st.integers(max_value=-1), st.lists(st.integers(max_value=-1), min_size=1, max_size=3),
                                st.lists(NOT_INT, min_size=1, max_size=2), st.text(max_size=3), st.floats(),
                                st.frozensets(st.integers(min_value=0), max_size=2)),
    "stop": st.one_of(st.just(""), st.lists(st.just(""), min_size=1, max_size=2),
                      st.lists(st.one_of(st.integers(), st.none(), st.binary(max_size=2)), min_size=1, max_size=2),
                      st.integers(), st.none(), st.binary(max_size=4), st.just("half \ud800 pair")),
    "ignore_eos": NOT_BOOL,
}
GENERATE_BAD = {"chat_template": NOT_BOOL, "on_tokens": NOT_CALLABLE, "on_step": NOT_CALLABLE,
                "on_output": NOT_CALLABLE, "params": st.one_of(NOT_CALLABLE, st.just(SamplingParams))}
SPECULATION_BAD = {  # with the defaults for the rest: parallel, K 7, lookup 5, max_length 64
    "mode": _text_except(*MODES),
    "num_speculative_tokens": st.one_of(st.integers(max_value=0), st.integers(min_value=63), NOT_INT),
    "lookup_ngram": st.one_of(st.integers(max_value=-1), st.integers(min_value=64), NOT_INT),
    "datastore": st.one_of(st.text(max_size=6).filter(lambda t: t != "auto"), st.integers(), st.floats(),
                           st.lists(st.booleans(), max_size=1)),
    "short_draft_tokens": st.one_of(st.integers(max_value=-1), st.integers(min_value=7), NOT_INT),
    "no_such_field": st.integers(),
}
ENGINE_BAD = {  # with max_length 64 and prefill_buckets (16,) where the keyword is another
    "batch_size": st.one_of(st.integers(max_value=0), NOT_INT, st.just(10**9)),
    "max_length": st.one_of(st.integers(max_value=15), NOT_INT, st.just(10**12)),
    "prefill_buckets": st.one_of(st.integers(), st.text(max_size=4), st.none(), st.floats(), st.just(()),
                                 st.lists(NOT_INT, min_size=1, max_size=2),
                                 st.lists(st.integers(max_value=0), min_size=1, max_size=2),
                                 st.lists(st.integers(min_value=65), min_size=1, max_size=2),
                                 st.sampled_from([(16, 16), (16, 8)])),
    "dtype": _text_except(*DTYPES),
    "backend": _text_except(*BACKENDS),
    "kernels": _text_except("auto", *KERNEL_MODES),
    "tp_degree": st.one_of(st.integers(max_value=0), st.integers(min_value=2, max_value=2**40), NOT_INT),
    "speculation": st.one_of(st.integers(), st.text(max_size=4), st.lists(st.integers(), max_size=2),
                             st.sampled_from(sorted(SPECULATION_BAD)).flatmap(
                                 lambda name: SPECULATION_BAD[name].map(lambda value: {name: value}))),
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_wrong_keyword_value_of_the_api_is_refused_before_any_work(data, engine, no_prefill, tiny_llama_dir,
                                                                      no_model_loads):
    function = data.draw(st.sampled_from(["Engine.generate", "SamplingParams", "Engine.from_pretrained"]))
    bad = {"Engine.generate": GENERATE_BAD, "SamplingParams": SAMPLING_BAD, "Engine.from_pretrained": ENGINE_BAD}
    keyword = data.draw(st.sampled_from(sorted(bad[function])), label="keyword")
    value = data.draw(bad[function][keyword], label="value")
    with pytest.raises(NeuronPeagleError):
        if function == "Engine.generate":
            engine.generate(["hello"], **{"params": SamplingParams(max_new_tokens=2), keyword: value})
        elif function == "SamplingParams":
            SamplingParams(**{keyword: value})
        else:
            Engine.from_pretrained(tiny_llama_dir, **{"max_length": 64, "prefill_buckets": (16,), keyword: value})


@pytest.mark.parametrize("keyword, value", [
    ("dtype", ["float32"]),  # unhashable: the dtype lookup raised TypeError
    ("dtype", {"name": "float32"}),
    ("speculation", {"datastore": 1.0}),  # equal to True, but no bool: accepted, refused after the model loaded
    ("speculation", {"datastore": 0.0}),
])
def test_wrong_types_the_property_found_are_refused_before_the_model_loads(keyword, value, tiny_llama_dir,
                                                                          no_model_loads):
    with pytest.raises(ConfigError):
        Engine.from_pretrained(tiny_llama_dir, **{"max_length": 64, "prefill_buckets": (16,), keyword: value})


# ---- misleading messages --------------------------------------------------------------------------------

def test_a_config_count_written_as_text_is_named_not_blamed_on_the_tokenizer(tiny_llama_dir, tmp_path, capsys,
                                                                              no_model_loads):
    from conftest import edited_model_dir

    model = edited_model_dir(tiny_llama_dir, tmp_path / "model",
                             lambda config: {**config, "num_hidden_layers": str(config["num_hidden_layers"])})
    code = main(["generate", "hi", "--model", str(model), "--backend", "eager"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "num_hidden_layers must be an integer, got '4'" in err and "tokenizer" not in err


def test_a_copy_of_the_default_model_is_recognised_by_its_content(tiny_llama_dir, tmp_path, monkeypatch):
    """The default drafter goes with the default model wherever it lies: a copy is recognised by its files'
    contents, not by its path; a copy with one weight changed is another model."""
    import shutil

    from safetensors.torch import load_file, save_file

    from neuron_peagle import default_model

    monkeypatch.setattr(default_model, "default_model_dir", lambda: tiny_llama_dir)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama_dir, copy)
    assert default_model.is_default_model(tiny_llama_dir) and default_model.is_default_model(copy)
    tensors = load_file(copy / "model.safetensors")
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    assert not default_model.is_default_model(copy)
    assert not default_model.is_default_model(tmp_path)  # no config.json: not a model at all


def test_a_second_ctrl_c_while_the_command_winds_down_prints_no_traceback(tmp_path):
    """After the first Ctrl-C is heard (exit 130), a second one that arrives while the interpreter joins
    the process's threads at exit is ignored, instead of printing a traceback of the shutdown."""
    script = (
        "import os, signal, sys, threading, time\n"
        "from neuron_peagle import cli_args\n"
        "def command(args, given):\n"
        "    raise KeyboardInterrupt\n"
        "sys.argv = ['prog']\n"
        "code = cli_args.run('prog', lambda: cli_args.Parser(prog='prog'), None, command)\n"
        "def second_ctrl_c():\n"
        "    time.sleep(0.5)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(0.5)\n"
        "threading.Thread(target=second_ctrl_c).start()  # joined at exit: the signal comes then\n"
        "sys.exit(code)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip() == "prog: interrupted"
