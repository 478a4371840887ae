"""Profiler sessions (neuron_peagle.profiling, `neuron-peagle profile`): what a session writes agrees
with the generation it profiled, on eager and xla; the Neuron capture is set up before the runtime."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from neuron_peagle.backends.profilers import NeuronCapture
from neuron_peagle.capabilities import backends_that
from neuron_peagle.cli import main
from neuron_peagle.profiling import neuron_capture_env, profile_generation, runs_torch_profiler
from neuron_peagle.runtime.engine import SamplingParams
from spec_helpers import make_engine

SHAPES = dict(batch_size=2, max_length=96, prefill_buckets=(32,))
PROMPTS = [[1, 2, 3, 4, 1, 2, 3], [5, 6, 5, 6, 5, 6, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 9], [7, 8, 9]]


def trace_names(path: Path) -> set[str]:
    trace = json.loads(path.read_text())
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return {e.get("name", "") for e in events}


def test_eager_session_agrees_with_the_generation_it_profiled(tiny_llama_dir, tmp_path):
    engine = make_engine(tiny_llama_dir, num_speculative_tokens=3, lookup_ngram=2, short_draft_tokens=1,
                                    **SHAPES)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    outputs, report = profile_generation(engine, PROMPTS, params, tmp_path / "session")
    out = tmp_path / "session"
    session = json.loads((out / "session.json").read_text())
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    # Three prompts on two slots: every step counts once for each request it held.
    assert sum(sum(i is not None for i in s["requests"]) for s in steps) == sum(o.stats.num_steps for o in outputs)
    assert sum(sum(s["counts"]) for s in steps) == sum(o.stats.committed_by_steps for o in outputs)
    assert {s["num_speculative_tokens"] for s in steps} <= {3, 1}
    # K is chosen per step by measured cost; each step records the choice and what it was made from.
    assert all(s["choice"]["k"] == s["num_speculative_tokens"] and set(s["choice"]["step_seconds"]) == {"3", "1"}
               for s in steps)
    summary = session["summary"]
    assert summary == report.summary and summary["num_steps"] == len(steps)
    assert summary["decoded_tokens"] == sum(o.stats.committed_by_steps for o in outputs)
    assert sum(int(n) for n in summary["steps_per_k"].values()) == len(steps)
    assert sum(n for ks in summary["k_by_occupancy"].values() for n in ks.values()) == len(steps)
    assert set(summary["step_seconds"]) == {"3", "1"}
    parts = summary["part_ms_mean"]
    assert set(parts) == {"draft", "verify", "accept", "host"} and all(v > 0 for v in parts.values())
    assert abs(sum(parts.values()) - summary["step_ms_mean"]) < 1e-6
    assert session["engine"]["speculation"]["short_draft_tokens"] == 1
    assert {"peagle::prefill", "peagle::step", "peagle::draft", "peagle::verify", "peagle::accept"} <= trace_names(
        out / "trace.json")
    assert "aten::" in (out / "ops.txt").read_text()
    assert set(session["files"]) == {"session.json", "steps.jsonl", "trace.json", "ops.txt"}
    # The profile changes no token.
    assert [o.output_ids for o in outputs] == [o.output_ids for o in engine.generate(PROMPTS, params)]


@pytest.mark.xla
def test_xla_session_writes_the_metrics_report_and_compiles_nothing_while_profiled(tiny_llama_dir, tmp_path):
    engine = make_engine(tiny_llama_dir, mode="plain", backend="xla", **SHAPES)
    profile_generation(engine, PROMPTS[:2], SamplingParams(max_new_tokens=6, ignore_eos=True), tmp_path)
    assert "CompileTime" in (tmp_path / "xla_metrics.txt").read_text()
    steps = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 5 and all(s["num_speculative_tokens"] == 0 and s["parts_s"] == {} for s in steps)
    assert "peagle::step" in trace_names(tmp_path / "trace.json")
    assert json.loads((tmp_path / "session.json").read_text())["summary"]["part_ms_mean"] == {}


def test_cli_profile_writes_a_session_and_refuses_a_file_as_out(tiny_llama_dir, tmp_path, capsys):
    common = ["profile", "hello there", "--model", str(tiny_llama_dir), "--max-length", "64", "--prefill-buckets", "16,32",
              "--max-new-tokens", "6", "--backend", "eager"]
    assert main([*common, "--out", str(tmp_path / "s")]) == 0
    printed = capsys.readouterr().out
    assert "decode steps" in printed and "acceptance length" in printed
    assert (tmp_path / "s" / "session.json").is_file() and (tmp_path / "s" / "trace.json").is_file()
    assert main([*common, "--out", str(tmp_path / "untraced"), "--no-trace"]) == 0
    session = json.loads((tmp_path / "untraced" / "session.json").read_text())
    assert set(session["files"]) == {"session.json", "steps.jsonl"} and not session["traced"]
    assert session["summary"]["part_ms_mean"]["verify"] > 0  # the step's own timers still run
    assert "NEURON_RT_INSPECT_ENABLE" not in os.environ  # only set for the neuron backend
    (tmp_path / "file").write_text("x")
    assert main([*common, "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_neuron_capture_records_the_session_into_it(tmp_path):
    # Session mode: one device trace of everything the runtime runs. Mode 1 would record only the first
    # run of each NEFF, which a profile session spends on its warm-up.
    assert neuron_capture_env(tmp_path) == {"NEURON_RT_INSPECT_ENABLE": "1",
                                            "NEURON_RT_INSPECT_DEVICE_PROFILE": "session",
                                            "NEURON_RT_INSPECT_OUTPUT_DIR": str(tmp_path / "neuron")}
    # torch.profiler where asked, except on the Neuron backends (not to be combined with the inspect capture).
    assert runs_torch_profiler("eager", True) and runs_torch_profiler("xla", True)
    assert not runs_torch_profiler("eager", False)
    assert not any(runs_torch_profiler(backend, True) for backend in backends_that("on_neuron_cores"))


@pytest.mark.parametrize("backend", backends_that("on_neuron_cores"))
def test_neuron_backend_sessions_start_no_torch_profiler(tiny_llama_dir, tmp_path, monkeypatch, backend):
    """What a session records is the backend's choice (`Backend.profiler`), so an eager engine given the
    Neuron backends' profiler shows it without hardware: torch.profiler is never started, and the session
    says why."""
    engine = make_engine(tiny_llama_dir, mode="plain", **SHAPES)
    engine.build = dataclasses.replace(engine.build, backend=backend)
    monkeypatch.setattr(engine.backend, "profiler", lambda out_dir, trace: NeuronCapture(out_dir, trace))

    def refuse(*args, **kwargs):
        raise AssertionError("torch.profiler started on a Neuron backend")

    monkeypatch.setattr(torch.profiler, "profile", refuse)
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    profile_generation(engine, PROMPTS[:2], params, tmp_path, trace=True)
    session = json.loads((tmp_path / "session.json").read_text())
    assert not session["traced"] and set(session["files"]) == {"session.json", "steps.jsonl"}
    assert not (tmp_path / "trace.json").exists() and not (tmp_path / "ops.txt").exists()
    assert any("no torch.profiler trace" in note for note in session["notes"])
    # No runtime ran here, so no device profile either, and the session says so instead of pretending.
    assert any("wrote no device profile" in note for note in session["notes"])


@pytest.mark.skipif(importlib.util.find_spec("torch_neuronx") is not None, reason="the Neuron SDK is installed")
@pytest.mark.parametrize("backend", ["neuron", "nxd"])  # TorchNeuron (trn2/trn3) and NxD's NEFFs (trn1)
def test_cli_profile_on_neuron_without_the_sdk_is_a_clear_error(tiny_llama_dir, tmp_path, capsys, monkeypatch,
                                                                 backend):
    monkeypatch.setattr(os, "environ", dict(os.environ))  # what the command sets stays in this test
    code = main(["profile", "hi", "--model", str(tiny_llama_dir), "--backend", backend, "--out", str(tmp_path)])
    assert code == 2 and "neuron" in capsys.readouterr().err.lower()


@pytest.mark.neuron
@pytest.mark.xla
def test_nxd_session_holds_device_profiles(default_model_dir, tmp_path):
    """On a trn1 instance (the torch-xla environment with the Neuron SDK): the runtime writes a device
    profile per graph of the nxd artifacts it ran into the session."""
    import subprocess
    import sys

    pytest.importorskip("torch_neuronx")
    pytest.importorskip("neuronx_distributed")

    artifacts = tmp_path / "artifacts"
    subprocess.run([sys.executable, "-m", "compile.build", "--backend", "nxd", "--out", str(artifacts),
                    "--max-length", "256", "--prefill-buckets", "128"], check=True, timeout=7200)
    session = tmp_path / "session"
    subprocess.run([sys.executable, "-m", "neuron_peagle.cli", "profile", "Write a haiku.", "--artifacts",
                    str(artifacts), "--out", str(session), "--max-new-tokens", "16"], check=True, timeout=1800)
    files = json.loads((session / "session.json").read_text())["files"]
    assert any(f.startswith("neuron/") and f.endswith(".ntff") for f in files), files
