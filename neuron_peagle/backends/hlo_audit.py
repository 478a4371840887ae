"""The HLO audit every graph passes before it is compiled, and again in the tests.

Fails a graph that neuronx-cc could not compile into one fixed NEFF, or would run with the host in
the loop:
- dynamic shapes: a bounded (`<=N`) or unknown (`?`) dimension in any HLO shape;
- host callbacks: infeed / outfeed / send / recv, or a custom-call whose target calls the host;
- data-dependent loops: `while` (graphs unroll their loops at trace time; a `while` means a
  shape or trip count was left to the data).

Records, without failing, the full-vocabulary patterns that are legal but costly on Trainium (an
argmax over a large vocabulary took NxD's decode graph from ~5 to ~22 minutes of compilation):
`sort` or `TopK` over a vocabulary-sized dimension, and argmax, which XLA lowers to a variadic
`reduce` (value and index operands) over the vocabulary dimension. Plain reductions over the
vocabulary (softmax max and sum) are not findings: sampling needs them and they stream.
Each finding kind carries a note saying why it is there and what replaces it.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from neuron_peagle.errors import ArtifactError

# `  %name = <type> opcode(operands), attributes`  (ROOT-marked or not, with or without `%`)
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<type>.+?)\s"
                          r"(?P<op>[a-z][a-z0-9\-]*)\((?P<rest>.*)$")
_SHAPE = re.compile(r"\b(?:pred|token|bf16|[fsuc]\d+|f8\w*)\[(?P<dims>[^\]]*)\]")
_DIMENSIONS = re.compile(r"\bdimensions=\{(?P<dims>[\d,]*)\}")
_CALL_TARGET = re.compile(r'custom_call_target="(?P<target>[^"]*)"')
_HOST_OPS = {"infeed", "outfeed", "send", "recv", "send-done", "recv-done"}
_HOST_TARGET = re.compile(r"host|callback", re.IGNORECASE)

NOTES = {
    "argmax": ("full-vocabulary argmax over {size} (greedy choice and greedy verify, drafter proposals, "
               "greedy rows of a sampled batch): with --kernels nki (auto on the neuron backends) greedy verify "
               "and the drafter proposals run it inside the NKI lm-head-argmax kernel instead"),
    "sort": ("full-vocabulary sort over {size} (top-k / top-p sampling works on the sorted "
             "distribution): kept until sampling pre-selects a bounded top-k"),
    "topk": "TopK over {size} (top-k sampling): kept until sampling pre-selects a bounded top-k",
}


@dataclass(frozen=True)
class Finding:
    """A legal but costly full-vocabulary pattern in one graph."""

    kind: str  # "argmax" | "sort" | "topk"
    instruction: str  # the HLO instruction's name
    shape: tuple[int, ...]  # its (first) operand's shape
    size: int  # the vocabulary-sized dimension it works over

    def to_dict(self) -> dict:
        return {"kind": self.kind, "instruction": self.instruction, "shape": list(self.shape), "size": self.size}


@dataclass(frozen=True)
class AuditResult:
    histogram: dict[str, int]  # opcode -> instructions, over every computation of the module
    findings: tuple[Finding, ...]
    violations: tuple[str, ...]  # one sentence each; any violation fails the build

    @property
    def passed(self) -> bool:
        return not self.violations

    def to_dict(self) -> dict:
        return {"passed": self.passed, "histogram": self.histogram,
                "findings": [f.to_dict() for f in self.findings], "violations": list(self.violations)}


def _dims(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.split(",") if d)


def _vocab_finding(kind: str, name: str, rest: str, vocab_sizes: set[int]) -> Finding | None:
    """A finding if the first operand's reduced / sorted dimension has a vocabulary size."""
    operand = _SHAPE.search(rest)
    if operand is None:
        return None
    shape = _dims(operand.group("dims"))
    dims = _DIMENSIONS.search(rest)
    axes = _dims(dims.group("dims")) if dims else (len(shape) - 1,)
    sizes = [shape[a] for a in axes if a < len(shape) and shape[a] in vocab_sizes]
    return Finding(kind, name, shape, sizes[0]) if sizes else None


def audit_hlo(hlo: str, vocab_sizes: Iterable[int]) -> AuditResult:
    """Audit one HLO module's text; `vocab_sizes`: the dimension sizes that count as a vocabulary."""
    vocab = set(vocab_sizes)
    histogram: Counter[str] = Counter()
    findings: list[Finding] = []
    violations: list[str] = []
    for line in hlo.splitlines():
        match = _INSTRUCTION.match(line)
        if match is None:
            continue
        name, op, rest = match.group("name"), match.group("op"), match.group("rest")
        histogram[op] += 1
        for shape in _SHAPE.finditer(match.group("type") + " " + rest):
            if "<=" in shape.group("dims") or "?" in shape.group("dims"):
                violations.append(f"dynamic shape {shape.group(0)} in instruction {name} ({op})")
                break
        if op == "while":
            violations.append(f"data-dependent loop: while instruction {name}")
        elif op in _HOST_OPS:
            violations.append(f"host transfer: {op} instruction {name}")
        elif op == "custom-call":
            target = _CALL_TARGET.search(rest)
            target_name = target.group("target") if target else ""
            if _HOST_TARGET.search(target_name):
                violations.append(f"host callback: custom-call {name} to {target_name!r}")
            elif target_name == "TopK":
                finding = _vocab_finding("topk", name, rest, vocab)
                findings.extend([finding] if finding else [])
        elif op == "sort" or (op == "reduce" and match.group("type").startswith("(")):
            finding = _vocab_finding("sort" if op == "sort" else "argmax", name, rest, vocab)
            findings.extend([finding] if finding else [])
    return AuditResult(dict(sorted(histogram.items())), tuple(findings), tuple(violations))


def check(graph: str, result: AuditResult, hlo_file: str) -> None:
    """Raise ArtifactError naming the graph, every violation, and the HLO file to read."""
    if not result.passed:
        raise ArtifactError(f"graph {graph} fails the HLO audit ({hlo_file}): " + "; ".join(result.violations))


def notes(findings: dict[str, tuple[Finding, ...]]) -> list[str]:
    """One justification per (kind, size) found, naming the graphs that have it."""
    graphs_by_pattern: dict[tuple[str, int], list[str]] = {}
    for graph, graph_findings in findings.items():
        for pattern in dict.fromkeys((f.kind, f.size) for f in graph_findings):
            graphs_by_pattern.setdefault(pattern, []).append(graph)
    return [f"{NOTES[kind].format(size=size)} [in {', '.join(graphs)}]"
            for (kind, size), graphs in sorted(graphs_by_pattern.items())]
