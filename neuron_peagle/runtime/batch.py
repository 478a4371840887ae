"""Host-side preparation of one fixed-shape batch: padded prompts and per-row sampling inputs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from neuron_peagle.sampling import HostRandom, SamplingTensors


def pad_prompts(prompts: Sequence[Sequence[int]], batch_size: int, bucket: int) -> tuple[Tensor, Tensor]:
    """Right-pad prompts to the bucket -> (ids [B, bucket], lengths [B]); the rows a short batch
    lacks repeat the first prompt (their output is ignored)."""
    ids = torch.zeros(batch_size, bucket, dtype=torch.int64)
    lengths = torch.ones(batch_size, dtype=torch.int64)
    for i in range(batch_size):
        prompt = prompts[i] if i < len(prompts) else prompts[0]
        ids[i, : len(prompt)] = torch.tensor(prompt, dtype=torch.int64)
        lengths[i] = len(prompt)
    return ids, lengths


@dataclass
class BatchSampling:
    """Per-row sampling settings of one batch, and the seeded host RNG that feeds the graphs."""

    tensors: SamplingTensors
    greedy: bool  # every row greedy: the greedy graphs serve the batch
    random: HostRandom

    @classmethod
    def from_params(cls, params: Sequence, batch_size: int) -> "BatchSampling":
        rows = [params[i] if i < len(params) else params[0] for i in range(batch_size)]
        tensors = SamplingTensors(
            temperature=torch.tensor([p.temperature for p in rows], dtype=torch.float32),
            top_k=torch.tensor([p.top_k for p in rows], dtype=torch.int64),
            top_p=torch.tensor([p.top_p for p in rows], dtype=torch.float32),
        )
        return cls(tensors, all(p.temperature == 0 for p in rows), HostRandom([p.seed for p in rows]))
