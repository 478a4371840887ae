"""The package's seams: the library never imports the build tool, the models never import the graphs,
the public names import from the top, and the speculation settings have one set of defaults wherever
they are given."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from neuron_peagle.speculation import SpeculationConfig

REPO = Path(__file__).resolve().parents[1]


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_no_module_of_the_library_imports_compile():
    """compile/ is the build tool users run; it depends on neuron_peagle, never the other way."""
    offenders = {str(path.relative_to(REPO)): sorted(m for m in _imported_modules(path)
                                                     if m == "compile" or m.startswith("compile."))
                 for path in (REPO / "neuron_peagle").rglob("*.py")}
    assert {path: mods for path, mods in offenders.items() if mods} == {}
    # The check itself sees imports: the build tool does import the library.
    assert any(m.startswith("neuron_peagle") for m in _imported_modules(REPO / "compile" / "build.py"))


def test_the_models_import_nothing_of_the_graphs():
    """models/ are the networks; graphs/ are built on them (and write their state through
    neuron_peagle.state_writes, below both), never the other way."""
    offenders = {str(path.relative_to(REPO)): sorted(m for m in _imported_modules(path)
                                                     if m.startswith("neuron_peagle.graphs"))
                 for path in (REPO / "neuron_peagle" / "models").rglob("*.py")}
    assert {path: mods for path, mods in offenders.items() if mods} == {}
    assert "neuron_peagle.models.target" in _imported_modules(REPO / "neuron_peagle" / "graphs" / "plain.py")


def test_the_public_names_import_from_the_top():
    code = "from neuron_peagle import Engine, SamplingParams, SpeculationConfig; print(SpeculationConfig().mode)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "parallel"


def test_the_command_line_and_the_build_default_to_the_apis_speculation():
    from compile.build import build_parser as build_tool
    from neuron_peagle.cli import build_parser, speculation_of

    generate = build_parser().parse_args(["generate", "hi"])
    build = build_tool().parse_args(["--out", "x"])
    assert speculation_of(generate) == SpeculationConfig() == speculation_of(build)
    assert speculation_of(build_parser().parse_args(["generate", "hi", "--mode", "plain"])).plain
