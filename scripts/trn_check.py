"""The first hour on a trn instance, in one command: what this machine is, the `neuron` tests, a short
benchmark and a profiler session, written into one Markdown report to paste into BENCHMARKS.md.

    make trn-check                      (= python -m scripts.trn_check)
    python -m scripts.trn_check --dry-run   what it would run here, and exit

1. Detects the instance family (trn1 / trn2 / trn3, from the machine's product name), the Neuron devices
   (/dev/neuron*), the logical NeuronCore degree and the installed Neuron release (torch-neuronx,
   neuronx-cc, nki, neuronx-distributed): trn2/trn3 use TorchNeuron in the main environment, trn1 the
   torch-xla stack in the torch-xla environment.
2. Runs the tests marked `neuron` in that environment.
3. trn2/trn3: benchmarks plain decoding and P-EAGLE at K = 1, 3, 5, 7 on the default model, batch 1 and 8
   (`scripts.benchmark --backends neuron`, which also draws its figure), and records a profiler session
   (`neuron-peagle profile --backend neuron`: step times, and the Neuron runtime's device profiles, from
   which draft / verify / accept are read). trn1 runs from artifacts only (`--backend nxd`): the benchmark
   is not run there, and the report says so.
4. Writes `report.md` in the output directory: the machine, every step's command and outcome, the
   benchmark's table and figure. Only what ran is reported; a step that failed is reported as failed.

Without a Neuron device and SDK it prints one line saying so and exits 2 (nothing is run or claimed).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PRODUCT_NAME = Path("/sys/devices/virtual/dmi/id/product_name")
NEURON_PACKAGES = ("torch-neuronx", "neuronx-cc", "nki", "neuronx-distributed", "torch")
KS = (1, 3, 5, 7)
BATCH_SIZES = (1, 8)


@dataclass
class Machine:
    instance_type: str  # e.g. "trn2.48xlarge", or what the product name says elsewhere
    family: str | None  # "trn1", "trn2", "trn3", or None: not a Trainium instance
    devices: list[str]  # /dev/neuron*
    versions: dict[str, str | None]  # the Neuron packages importable by this interpreter
    lnc: str  # NEURON_LOGICAL_NC_CONFIG, or the family's default

    @property
    def python(self) -> str:
        """The interpreter of the family's stack: TorchNeuron's environment (`make setup-neuron`) on trn2/trn3,
        the torch-xla one on trn1; this interpreter where that environment does not exist."""
        return stack_python(self.family)

    def refusal(self) -> str | None:
        """Why nothing can run here, in one line; None where it can."""
        if self.family is None:
            return (f"trn-check: not a Trainium instance (product name {self.instance_type!r}): nothing run; "
                    "run it on trn1, trn2 or trn3 (--dry-run shows the plan)")
        if not self.devices:
            return f"trn-check: {self.instance_type} shows no Neuron device (/dev/neuron*): is the Neuron driver installed?"
        if not self.versions.get("torch-neuronx"):
            return (f"trn-check: torch-neuronx is not installed in {self.python}: see docs/trainium.md "
                    "(make setup-neuron on trn2/trn3; the neuron-trn1 extra in .venv-xla on trn1)")
        return None


STACK_VENVS = {"trn1": ".venv-xla", "trn2": ".venv-neuron", "trn3": ".venv-neuron"}
VERSIONS = ("import importlib.metadata as m, json, sys\n"
            "def v(n):\n    try:\n        return m.version(n)\n    except m.PackageNotFoundError:\n        return None\n"
            "print(json.dumps({n: v(n) for n in sys.argv[1:]}))")


def stack_python(family: str | None) -> str:
    venv = REPO / STACK_VENVS.get(family or "", ".venv-neuron") / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def installed_versions(python: str) -> dict[str, str | None]:
    """The Neuron packages that interpreter has (asked in a process of its own: this one may be another)."""
    result = subprocess.run([python, "-c", VERSIONS, *NEURON_PACKAGES], capture_output=True, text=True, timeout=120)
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError:
        return {name: None for name in NEURON_PACKAGES}


def detect() -> Machine:
    try:
        product = PRODUCT_NAME.read_text().strip()
    except OSError:
        product = "unknown"
    family = next((f for f in ("trn1", "trn2", "trn3") if product.startswith(f)), None)
    devices = sorted(str(p) for p in Path("/dev").glob("neuron[0-9]*"))
    versions = installed_versions(stack_python(family)) if family else {name: None for name in NEURON_PACKAGES}
    # neuron_peagle.lnc.DEFAULT_LNC, not imported: this script runs on an interpreter without torch
    default_lnc = {"trn1": "1", "trn2": "2", "trn3": "2"}.get(family or "", "-")
    return Machine(product, family, devices, versions, os.environ.get("NEURON_LOGICAL_NC_CONFIG", default_lnc))


@dataclass
class Step:
    name: str
    argv: list[str]
    produces: list[str] = field(default_factory=list)  # files in the output directory the report reads

    def command(self) -> str:
        return shlex.join(self.argv)


def plan(machine: Machine, out: Path) -> list[Step]:
    python = machine.python
    steps = [Step("neuron tests", [python, "-m", "pytest", "-q", "-m", "neuron", "-rs", "tests",
                                   f"--junitxml={out / 'tests.xml'}"], ["tests.xml"])]
    if machine.family == "trn1":
        return steps  # the nxd backend runs from artifacts only: the tests build and load them
    steps.append(Step("benchmark", [python, "-m", "scripts.benchmark", "--backends", "neuron", "--modes", "parallel",
                                    "--ks", ",".join(map(str, KS)), "--batch-sizes", ",".join(map(str, BATCH_SIZES)),
                                    "--prompts-per-domain", "4", "--max-new-tokens", "64", "--dtype", "bfloat16",
                                    "--no-hf", "--out", str(out / "bench.json")], ["bench.json", "bench.png"]))
    steps.append(Step("profiler session", [python, "-m", "neuron_peagle.cli", "profile",
                                           "Write a Python function that checks whether a number is prime.",
                                           "--backend", "neuron", "--dtype", "bfloat16", "--max-new-tokens", "64",
                                           "--out", str(out / "session")], ["session/session.json"]))
    return steps


def benchmark_table(bench: dict) -> list[str]:
    """The benchmark's rows as a Markdown table (what scripts.benchmark measured, nothing else)."""
    lines = ["| domain | batch | mode | K | tokens/s | x plain (same run) | acceptance length | same tokens as plain |",
             "|---|---|---|---|---|---|---|---|"]
    for r in bench.get("rows", []):
        lines.append(f"| {r['domain']} | {r['batch_size']} | {r['mode']} | {r['k']} | {r['tokens_per_s']:.1f} "
                     f"| {r.get('speedup_vs_own_plain', 1.0):.2f} | {r.get('acceptance_length', 1.0):.2f} "
                     f"| {r.get('identical', '-')} |")
    return lines


def report(machine: Machine, outcomes: list[tuple[Step, int, float]], out: Path) -> str:
    lines = ["# trn-check", "", f"- instance: {machine.instance_type} ({machine.family}), "
             f"{len(machine.devices)} Neuron devices, LNC {machine.lnc}",
             "- packages: " + ", ".join(f"{n} {v}" for n, v in machine.versions.items() if v),
             f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}", "", "| step | command | outcome | seconds |",
             "|---|---|---|---|"]
    for step, code, seconds in outcomes:
        lines.append(f"| {step.name} | `{step.command()}` | {'passed' if code == 0 else f'FAILED (exit {code})'} "
                     f"| {seconds:.0f} |")
    bench = out / "bench.json"
    ran = {step.name: code for step, code, _ in outcomes}
    if ran.get("benchmark") == 0 and bench.is_file():
        lines += ["", "## Benchmark", ""] + benchmark_table(json.loads(bench.read_text()))
        if (out / "bench.png").is_file():
            lines += ["", "![benchmark](bench.png)"]
    elif machine.family == "trn1":
        lines += ["", "No benchmark on trn1: the nxd backend runs from artifacts, which the neuron tests build and load."]
    session = out / "session" / "session.json"
    if ran.get("profiler session") == 0 and session.is_file():
        summary = json.loads(session.read_text()).get("summary", {})
        lines += ["", "## Profiler session (session/)", "", "```", json.dumps(summary, indent=2), "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "trn_check_out", help="where report.md and the rest go")
    parser.add_argument("--dry-run", action="store_true", help="print what would run here, run nothing")
    args = parser.parse_args(argv)
    machine = detect()
    refusal = machine.refusal()
    if args.dry_run:
        here = refusal.removeprefix("trn-check: ") if refusal else "ready"
        shown = machine if machine.family else Machine(machine.instance_type, "trn2", machine.devices,
                                                       machine.versions, machine.lnc)
        print(f"trn-check plan for {shown.family} (here: {here}):")
        for step in plan(shown, args.out):
            print(f"  {step.name}: {step.command()}")
        print(f"  report: {args.out / 'report.md'}")
        return 0
    if refusal is not None:
        print(refusal)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    outcomes = []
    for step in plan(machine, args.out):
        print(f"trn-check: {step.name}: {step.command()}", flush=True)
        start = time.perf_counter()
        code = subprocess.run(step.argv, cwd=REPO).returncode
        outcomes.append((step, code, time.perf_counter() - start))
    (args.out / "report.md").write_text(report(machine, outcomes, args.out))
    print(f"trn-check: report in {args.out / 'report.md'}")
    return 0 if all(code == 0 for _, code, _ in outcomes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
