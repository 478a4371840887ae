"""Training data: prompts answered by the target itself, then the target's features on them.

Step 1 (`generate_responses`): the target regenerates a response to every prompt with the project's
own batched decoding (greedy, or the n-th sampled answer: `sample` n >= 1); results are appended to a
JSONL file as they come, and an answer the file already holds (same prompt tokens, same `sample`) is
not written again, so an interrupted run resumes where it stopped and a longer prompt list only adds
what is new. Step 2 (`compute_features`): one target forward over each
prompt + response gives, per position, the drafter's input features (3 layers) and the last hidden
state (from which the target's distribution is recomputed during training); cached as safetensors
shards.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from neuron_peagle.files import atomic_path
from neuron_peagle.models.target import TargetModel
from neuron_peagle.training.prompt_sets import Prompt


@dataclass
class Example:
    domain: str
    prompt_ids: list[int]
    response_ids: list[int]
    sample: int = 0  # 0: the greedy answer; n >= 1: the n-th sampled answer (seed n)

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    @property
    def key(self) -> tuple[int, ...]:
        """One answer of one prompt: (sample, *prompt ids)."""
        return (self.sample, *self.prompt_ids)

    @classmethod
    def from_record(cls, record: dict) -> "Example":
        return cls(record["domain"], record["prompt_ids"], record["response_ids"], int(record.get("sample", 0)))

    def record(self) -> dict:
        record = {"domain": self.domain, "prompt_ids": self.prompt_ids, "response_ids": self.response_ids}
        if self.sample:  # greedy lines stay as they were written before sampled answers existed
            record["sample"] = self.sample
        return record


def read_examples(path: Path) -> list[Example]:
    """The whole lines of a responses file (a last line cut short by a stop is not an example)."""
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.split("\n")[:-1]  # the piece after the last newline is unfinished (or empty)
    return [Example.from_record(json.loads(line)) for line in lines if line.strip()]


def drop_unfinished_line(path: Path) -> None:
    """Cut a last line that a stopped run left without its newline, so appending starts clean."""
    if path.is_file():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(path, "r+b") as handle:
                handle.truncate(data.rfind(b"\n") + 1)


def append_examples(path: Path, examples: Sequence[Example]) -> None:
    """Add `examples` as whole lines at the end of a responses file (after cutting an unfinished one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    drop_unfinished_line(path)
    with open(path, "a") as handle:
        handle.writelines(json.dumps(example.record()) + "\n" for example in examples)


def generate_responses(engine, prompts: Sequence[Prompt], out_path: Path, max_new_tokens: int = 128,
                       sample: int = 0, temperature: float = 0.8, top_p: float = 0.95) -> list[Example]:
    """Answer every prompt with the engine, greedy (`sample` 0) or sampled (`sample` n >= 1: seed n, at
    `temperature` and `top_p`); resumable through `out_path`."""
    from neuron_peagle.runtime.engine import SamplingParams

    if sample < 0:
        raise ValueError(f"sample must be >= 0 (0 = greedy), got {sample}")
    done = {e.key for e in read_examples(out_path)}
    # Prompts longer than the largest bucket, or with no room to answer, are skipped; so are repeats.
    room = min(engine.build.prefill_buckets[-1], engine.build.max_length - max_new_tokens)
    todo = []
    for prompt in prompts:
        ids = engine.encode(prompt.text)
        key = Example(prompt.domain, ids, [], sample).key
        if 0 < len(ids) <= room and key not in done:
            done.add(key)
            todo.append((prompt.domain, ids))
    params = SamplingParams(max_new_tokens=max_new_tokens) if sample == 0 else SamplingParams(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=sample)
    batch = engine.build.batch_size
    with tqdm(total=len(todo), desc="responses", unit="prompt") as bar:
        for first in range(0, len(todo), batch):
            group = todo[first:first + batch]
            outputs = engine.generate([ids for _, ids in group], params)
            append_examples(out_path, [Example(domain, ids, out.output_ids, sample)
                                       for (domain, ids), out in zip(group, outputs)])
            bar.update(len(group))
    return read_examples(out_path)


@torch.no_grad()
def compute_features(target: TargetModel, examples: Sequence[Example], out_dir: Path, shard_size: int = 32,
                     dtype: torch.dtype = torch.bfloat16) -> list[Path]:
    """Per example: ids [T], features [T, 3H] and last hidden [T, H]; resumable shard by shard.

    A shard on disk is kept when it holds as many examples as its place in `examples` asks for (a
    last shard written before more examples were added is redone).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = []
    for shard_index, first in enumerate(tqdm(range(0, len(examples), shard_size), desc="features", unit="shard")):
        path = out_dir / f"shard_{shard_index:05d}.safetensors"
        shards.append(path)
        if path.is_file() and _count(path) == len(examples[first:first + shard_size]):
            continue
        tensors = {}
        for offset, example in enumerate(examples[first:first + shard_size]):
            ids = torch.tensor([example.ids])
            positions = torch.arange(ids.shape[1]).unsqueeze(0)
            features, hidden = target.features_and_hidden(ids, positions, target.new_cache(1))
            tensors[f"{offset}.ids"] = ids[0]
            tensors[f"{offset}.features"] = features[0].to(dtype)
            tensors[f"{offset}.hidden"] = hidden[0].to(dtype)
            tensors[f"{offset}.prompt_length"] = torch.tensor(len(example.prompt_ids))
        with atomic_path(path) as tmp:  # a shard is whole or absent: the count above trusts what is there
            save_file(tensors, str(tmp))
    return shards


def _count(path: Path) -> int:
    with safe_open(str(path), "pt") as handle:
        return sum(1 for name in handle.keys() if name.endswith(".ids"))


def load_shards(paths: Sequence[Path]) -> list[dict[str, torch.Tensor]]:
    """All examples of the shards: dicts with ids, features, hidden, prompt_length."""
    examples = []
    for path in paths:
        tensors = load_file(str(path))
        count = len({name.split(".")[0] for name in tensors})
        for i in range(count):
            examples.append({key: tensors[f"{i}.{key}"] for key in ("ids", "features", "hidden", "prompt_length")})
    return examples
