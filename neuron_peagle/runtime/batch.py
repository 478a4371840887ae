"""Host-side inputs of the slots: a prompt padded to its bucket, and each slot's sampling settings."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from neuron_peagle.sampling import HostRandom, SamplingTensors


def pad_prompt(prompt: Sequence[int], bucket: int) -> tuple[Tensor, Tensor]:
    """Right-pad one prompt to the bucket -> (ids [1, bucket], length [1])."""
    ids = torch.zeros(1, bucket, dtype=torch.int64)
    ids[0, : len(prompt)] = torch.tensor(list(prompt), dtype=torch.int64)
    return ids, torch.tensor([len(prompt)], dtype=torch.int64)


class SlotSampling:
    """The sampling settings of every slot, and the seeded host RNG that feeds the graphs.

    A request's settings (temperature, top-k, top-p) and its seeded stream take over its slot when it
    enters (`admission`); a free slot keeps its last settings (its tokens are ignored)."""

    def __init__(self, batch_size: int) -> None:
        self.tensors = SamplingTensors(temperature=torch.zeros(batch_size, dtype=torch.float32),
                                       top_k=torch.zeros(batch_size, dtype=torch.int64),
                                       top_p=torch.ones(batch_size, dtype=torch.float32))
        self.random = HostRandom([0] * batch_size)

    def admission(self, slot: int, prompt: Sequence[int], params, bucket: int) -> tuple[Tensor, ...]:
        """Slot `slot` takes the request (its SamplingParams `params`); -> a prefill graph's inputs, in the
        order both prefill graphs declare them: ids [1, bucket], length [1], slot [1], temperature,
        top_k, top_p [1] and the first token's uniform [1, 1]."""
        self.tensors.temperature[slot] = params.temperature
        self.tensors.top_k[slot] = params.top_k
        self.tensors.top_p[slot] = params.top_p
        self.random.reseed(slot, params.seed)
        ids, lengths = pad_prompt(prompt, bucket)
        row = (t[slot:slot + 1].clone() for t in self.tensors)
        return (ids, lengths, torch.tensor([slot]), *row, self.random.uniform_row(slot, 1))

    def greedy(self, slots: Sequence[int]) -> bool:
        """Every one of `slots` is greedy: the greedy graphs serve them."""
        return all(float(self.tensors.temperature[s]) == 0 for s in slots)
