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


# ---- one seam per concern ------------------------------------------------------------------------------

SOURCES = ("neuron_peagle", "compile")


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for the library and the build tool."""
    modules = {}
    for package in SOURCES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _runtime_imports(name: str, path: Path, modules: dict[str, Path], text: str | None = None) -> set[str]:
    """The modules of `modules` that `name` imports, at the top or inside a function (an import done later is
    still an import), but not under `if TYPE_CHECKING:` (never run). `from package import name` imports the
    package (its __init__ runs and hands out the name), and the module `package.name` where there is one;
    `from package.module import name` counts the module only."""
    tree = ast.parse(text if text is not None else path.read_text())
    skipped = {id(node) for branch in ast.walk(tree) if isinstance(branch, ast.If)
               and "TYPE_CHECKING" in ast.unparse(branch.test) for stmt in branch.body for node in ast.walk(stmt)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            found |= {base} | ({f"{base}.{alias.name}" for alias in node.names} & set(modules))
    return (found & set(modules)) - {name}


def _import_cycles() -> list[list[str]]:
    modules = _modules()
    graph = {name: _runtime_imports(name, path, modules) for name, path in modules.items()}
    cycles, index, low, stack, on_stack = [], {}, {}, [], set()

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return cycles


def test_no_import_circles():
    assert _import_cycles() == []
    # The check sees the imports that make a circle: one inside a function, and `from package import module`
    # (which runs the package's __init__ too).
    modules = {"pkg": REPO / "__init__.py", "pkg.a": REPO / "a.py", "pkg.b": REPO / "b.py"}
    code = {"pkg.a": "def f():\n    from pkg.b import g\n", "pkg.b": "from pkg import a\n"}
    assert _runtime_imports("pkg.a", modules["pkg.a"], modules, code["pkg.a"]) == {"pkg.b"}
    assert _runtime_imports("pkg.b", modules["pkg.b"], modules, code["pkg.b"]) == {"pkg", "pkg.a"}


def test_models_import_nothing_from_graphs():
    """The model code is what the graphs are made of; it never depends on them."""
    modules = _modules()
    offenders = {name: sorted(m for m in _runtime_imports(name, path, modules) if m.startswith("neuron_peagle.graphs"))
                 for name, path in modules.items() if name.startswith("neuron_peagle.models")}
    assert {name: mods for name, mods in offenders.items() if mods} == {}


BACKEND_CLASSES = {"EagerBackend", "CompiledBackend", "XlaBackend", "NxdBackend"}


def _backend_name_uses(path: Path, text: str | None = None) -> list[str]:
    """Where a file compares something with a backend's name (or a tuple of names), or names a backend class
    (a downcast, an isinstance, an annotation)."""
    from neuron_peagle.capabilities import BACKENDS

    def is_name(node: ast.AST) -> bool:
        if isinstance(node, ast.Constant):
            return node.value in BACKENDS
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(is_name(e) for e in node.elts)
        return isinstance(node, ast.Name) and node.id.endswith("BACKENDS")

    uses = []
    for node in ast.walk(ast.parse(text if text is not None else path.read_text())):
        operands = [node.left, *node.comparators] if isinstance(node, ast.Compare) else []
        # A torch device type ("xla", "neuron") is torch's name of a device, not the name of a backend.
        device_type = any(isinstance(n, ast.Attribute) and n.attr == "type" for n in operands)
        if any(is_name(n) for n in operands) and not device_type:
            uses.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, (ast.Name, ast.Attribute)) and getattr(node, "id", getattr(node, "attr", "")) \
                in BACKEND_CLASSES:
            uses.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
    return uses


def test_backend_differences_live_in_the_backends():
    """Outside neuron_peagle/backends/ nothing asks which backend it is: it asks the backend (its
    capabilities and methods). Scripts may name backends to run; the library and the build tool may not."""
    files = [p for package in SOURCES for p in (REPO / package).rglob("*.py")
             if (REPO / "neuron_peagle" / "backends") not in p.parents]
    assert [use for path in files for use in _backend_name_uses(path)] == []
    # The check sees a comparison, a membership test and a downcast where there are some.
    text = 'x = b.name == "xla"\ny = name in ("eager", "inductor")\nz: XlaBackend = e.backend\n'
    assert len(_backend_name_uses(REPO / "scratch.py", text)) == 3


def test_the_package_installs_on_3_11_to_3_14_and_the_neuron_extra_only_where_torchneuron_runs():
    """TorchNeuron (torch-neuronx 2.14) runs on Python 3.12-3.14; the package installs on 3.11 (tested here)
    to 3.14, and the installed metadata makes the `neuron` extra ask for what only 3.12-3.14 can install."""
    import importlib.metadata

    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    meta = importlib.metadata.metadata("neuron_peagle")
    supported = SpecifierSet(meta["Requires-Python"])
    assert [v in supported for v in ("3.10", "3.11", "3.12", "3.13", "3.14", "3.15")] == [False, True, True, True, True,
                                                                                          False]
    extras: dict[str, list[Requirement]] = {}
    for line in importlib.metadata.requires("neuron_peagle"):
        requirement = Requirement(line)
        for extra in ("neuron", "neuron-trn1"):
            if requirement.marker is not None and requirement.marker.evaluate(
                    {"extra": extra, "python_version": "3.13", "python_full_version": "3.13.0"}):
                extras.setdefault(extra, []).append(requirement)
    assert {r.name for r in extras["neuron"]} == {"torch-neuronx", "neuronx-cc", "nki"}
    for requirement in extras["neuron"]:
        asks = [requirement.marker.evaluate({"extra": "neuron", "python_version": v, "python_full_version": v + ".0"})
                for v in ("3.11", "3.12", "3.13", "3.14")]
        assert asks == [False, True, True, True], requirement
        assert requirement.specifier.contains("2.14.3.0") if requirement.name == "torch-neuronx" else True
    assert {r.name for r in extras["neuron-trn1"]} == {"torch-neuronx", "neuronx-cc", "neuronx-distributed", "nki"}


def test_the_model_code_knows_nothing_of_ranks():
    """The parallel plan is applied after construction (neuron_peagle/parallel.py): no function or class of
    models/ takes a `tp` argument, and none imports the plan."""
    found = []
    for path in sorted((REPO / "neuron_peagle" / "models").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = [a.arg for a in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]]
                found += [f"{path.name}:{node.lineno} {node.name}(tp)" for a in args if a == "tp"]
            if isinstance(node, ast.ImportFrom) and node.module == "neuron_peagle.parallel":
                found.append(f"{path.name}:{node.lineno} imports neuron_peagle.parallel")
    assert found == []
