"""Reading safetensors checkpoints by name, with exact checks, into our fused [in, out] layout."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from neuron_peagle.errors import ModelDirError, WeightsError


def read_safetensors_dir(model_dir: str | Path) -> dict[str, Tensor]:
    """All tensors of a directory's `*.safetensors` files (single file or sharded with an index)."""
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelDirError(f"model directory {str(path)!r} does not exist")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as err:
            raise WeightsError(f"{index}: unreadable shard index ({err})") from None
        files = [path / name for name in shard_names]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelDirError(f"model directory {str(path)!r} has no *.safetensors weight file")
    tensors: dict[str, Tensor] = {}
    for file in files:
        if not file.is_file():
            raise WeightsError(f"weight shard {file.name} named by the index is missing in {path}")
        try:
            tensors.update(load_file(str(file)))
        except (SafetensorError, OSError, ValueError) as err:
            raise WeightsError(f"{file}: cannot read safetensors file (truncated or corrupt?): {err}") from None
    return tensors


def check_names_and_shapes(tensors: dict[str, Tensor], expected: dict[str, tuple[int, ...]],
                           optional: set[str], source: str) -> None:
    """Raise one error listing every missing, unexpected and mis-shaped tensor."""
    problems = []
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected) - optional)
    if missing:
        problems.append(f"missing tensors: {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_short(unexpected)}")
    for name, shape in expected.items():
        if name in tensors and tuple(tensors[name].shape) != tuple(shape):
            problems.append(f"{name} has shape {tuple(tensors[name].shape)}, expected {tuple(shape)}")
    if problems:
        raise WeightsError(f"{source}: " + "; ".join(problems))


def _short(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def to_in_out(*weights: Tensor) -> Tensor:
    """Hugging Face [out, in] matrices -> one [in, sum(out)] matrix for `x @ w`."""
    return torch.cat(weights, dim=0).t().contiguous()
