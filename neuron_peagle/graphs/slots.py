"""Slots: a batch of B sequences that come and go one at a time.

The decode and step graphs run all B rows (slots) of the batch at once. A request enters a free slot
through a prefill graph of ONE sequence (`[1, bucket]`), which leaves every other slot's state as it
was: at batch 1 it writes the batch's own state; at B > 1 it runs on a one-row twin of every state
module (the prefill state, built like the batch's) and then copies that row into slot `slot` of the
batch's state (`StateModule.take_rows`: only the positions a later call reads, e.g. the prompt's
cache slots). The slot is a graph input, so one graph per bucket serves every slot.
"""

from __future__ import annotations

from torch import Tensor, nn

from neuron_peagle.state_writes import StateModule


def state_modules(module: nn.Module) -> dict[str, StateModule]:
    """Every `StateModule` reachable from `module`, by dotted name."""
    return {name: sub for name, sub in module.named_modules() if isinstance(sub, StateModule)}


class SlotEntry:
    """Pairs the batch's state modules with the prefill's one-row twins (the same modules at batch 1)."""

    def __init__(self, batch: nn.Module, prefill: nn.Module) -> None:
        batch_states, prefill_states = state_modules(batch), state_modules(prefill)
        if batch_states.keys() != prefill_states.keys():
            raise ValueError(f"the prefill state {sorted(prefill_states)} is not built like the batch's "
                             f"{sorted(batch_states)}")
        self.pairs = [(batch_states[name], prefill_states[name]) for name in batch_states
                      if batch_states[name] is not prefill_states[name]]

    def enter(self, slot: Tensor, bucket: int) -> None:
        """slot [1] int64: the batch row the prefilled sequence takes."""
        for batch_state, prefill_state in self.pairs:
            batch_state.take_rows(prefill_state, slot, bucket)
