"""`make trn-check` (scripts/trn_check.py) on a machine without Neuron: one line and exit 2, its plan with
--dry-run; what it detects and plans per instance family; its report holds only what ran."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from scripts import trn_check

REPO = Path(__file__).resolve().parent.parent


def test_without_neuron_it_says_why_in_one_line_and_exits_2():
    result = subprocess.run([sys.executable, "-m", "scripts.trn_check", "--out", "unused"], capture_output=True,
                            text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("trn-check: ") and "nothing run" in lines[0]
    assert not (REPO / "unused").exists()  # nothing written


def test_make_trn_check_here_is_the_same_one_line_and_exit_2():
    result = subprocess.run(["make", "-s", "trn-check"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2  # make passes the script's 2 on
    assert result.stdout.splitlines() == [result.stdout.strip()] and "nothing run" in result.stdout


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "scripts.trn_check", "--dry-run", "--out", str(out)],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0
    text = result.stdout
    assert "neuron tests:" in text and "-m neuron" in text
    assert "benchmark:" in text and "--ks 1,3,5,7" in text and "--batch-sizes 1,8" in text and "--backends neuron" in text
    assert "profiler session:" in text and "profile" in text
    assert not out.exists()


def _machine(tmp_path, monkeypatch, product: str, devices: int, torch_neuronx: str | None):
    name = tmp_path / "product_name"
    name.write_text(product + "\n")
    monkeypatch.setattr(trn_check, "PRODUCT_NAME", name)
    machine = trn_check.detect()
    machine.devices = [f"/dev/neuron{i}" for i in range(devices)]
    machine.versions["torch-neuronx"] = torch_neuronx
    return machine


def test_it_detects_the_family_and_plans_for_its_stack(tmp_path, monkeypatch):
    monkeypatch.delenv("NEURON_LOGICAL_NC_CONFIG", raising=False)
    trn2 = _machine(tmp_path, monkeypatch, "trn2.48xlarge", 16, "2.14.3.0")
    assert (trn2.family, trn2.lnc, trn2.refusal()) == ("trn2", "2", None)
    assert [s.name for s in trn_check.plan(trn2, tmp_path)] == ["neuron tests", "benchmark", "profiler session"]
    trn1 = _machine(tmp_path, monkeypatch, "trn1.32xlarge", 16, "2.9.0.2.15")
    assert (trn1.family, trn1.lnc) == ("trn1", "1")
    steps = trn_check.plan(trn1, tmp_path)
    assert [s.name for s in steps] == ["neuron tests"] and ".venv-xla" in steps[0].argv[0]
    assert "no Neuron device" in _machine(tmp_path, monkeypatch, "trn2.3xlarge", 0, "2.14.3.0").refusal()
    assert "torch-neuronx is not installed" in _machine(tmp_path, monkeypatch, "trn3.48xlarge", 4, None).refusal()
    assert "not a Trainium instance" in _machine(tmp_path, monkeypatch, "m7i.large", 0, None).refusal()


def test_the_report_holds_only_what_ran(tmp_path, monkeypatch):
    machine = _machine(tmp_path, monkeypatch, "trn2.3xlarge", 1, "2.14.3.0")
    steps = trn_check.plan(machine, tmp_path)
    (tmp_path / "bench.json").write_text(json.dumps({"rows": [
        {"domain": "code", "batch_size": 1, "mode": "parallel", "k": 7, "tokens_per_s": 123.4,
         "speedup_vs_own_plain": 2.5, "acceptance_length": 3.1, "identical": True}]}))
    failed = trn_check.report(machine, [(steps[0], 0, 10.0), (steps[1], 1, 5.0)], tmp_path)
    assert "FAILED (exit 1)" in failed and "## Benchmark" not in failed and "123.4" not in failed
    passed = trn_check.report(machine, [(steps[0], 0, 10.0), (steps[1], 0, 5.0)], tmp_path)
    assert "| code | 1 | parallel | 7 | 123.4 | 2.50 | 3.10 | True |" in passed
    assert "Profiler session" not in passed  # it did not run
