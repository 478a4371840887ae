"""How graphs update their state: in place, or by rebinding the buffer to an out-of-place result.

A graph's state (KV caches, speculative state, lookup history: the buffers of
graphs/interface.py's STATE_MODULES) persists between calls. Every update of it goes through this
module, which writes it in one of two ways:

- in place (the default): the buffer keeps its storage and is written (`copy_`, `scatter_`, a
  slice's `copy_`). Eager CPU needs this for speed (an out-of-place scatter copies the whole KV cache
  on every step); torch.compile (inductor, TorchNeuron) functionalizes in-place mutations itself; and
  torch-xla donates a buffer updated in place to its new value (an input-output alias), where a
  rebinding copies it, so the xla backend keeps this mode too.
- functional (inside `functional_state`): the buffer attribute is rebound to the result of an
  out-of-place op (`owner.cache = torch.scatter(owner.cache, ...)`), of the same shape and dtype.
  neuronx-distributed's tracer (ModelBuilderV2's `trace`) aliases a buffer to its update only in
  this form and documents in-place ops on buffers as not supported, so the nxd backend traces its
  graphs in this mode (backends/nxd.py `trace_graph`).

Both ways compute the same values, bit for bit (tests/test_state_updates.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

# The modules whose state is being updated functionally (the graphs being traced); empty: in place.
# A plain global rather than a ContextVar: torch.compile reads it as a guarded constant.
_functional_roots: tuple[nn.Module, ...] = ()


@contextmanager
def functional_state(*roots: nn.Module) -> Iterator[None]:
    """Inside this block every state update rebinds its buffer to an out-of-place result.

    `roots`: the graph modules that run in the block; a KV-cache write (`models.layers.write_slots`),
    which sees only the cache tensor, finds the buffer that holds it among their submodules."""
    global _functional_roots
    if not roots:
        raise ValueError("functional_state needs the graph modules whose state it updates")
    saved = _functional_roots
    _functional_roots = saved + roots
    try:
        yield
    finally:
        _functional_roots = saved


def is_functional() -> bool:
    """True inside `functional_state`: state updates rebind their buffers."""
    return bool(_functional_roots)


def assign_state(owner: nn.Module, name: str, value: Tensor) -> Tensor:
    """Buffer `name` of `owner` := `value`, broadcast to the buffer's shape and cast to its dtype (as
    `copy_` does). Returns the tensor that now holds the state."""
    buffer = _buffer(owner, name)
    if not _functional_roots:
        return buffer.copy_(value)
    # A fresh contiguous tensor: never the caller's input, another buffer or a broadcast view.
    fresh = value.to(buffer.dtype).expand(buffer.shape).clone(memory_format=torch.contiguous_format)
    return _rebind(owner, name, fresh)


def scatter_state(owner: nn.Module, name: str, dim: int, index: Tensor, src: Tensor) -> Tensor:
    """Buffer `name` of `owner` with `src` scattered at `index` along `dim` (`Tensor.scatter_`)."""
    buffer = _buffer(owner, name)
    if not _functional_roots:
        return buffer.scatter_(dim, index, src.to(buffer.dtype))
    return _rebind(owner, name, torch.scatter(buffer, dim, index, src.to(buffer.dtype)))


def write_state_slice(owner: nn.Module, name: str, dim: int, start: int, value: Tensor) -> Tensor:
    """Buffer `name` of `owner` with positions [start, start + value.shape[dim]) of `dim` := `value`."""
    buffer = _buffer(owner, name)
    end = start + value.shape[dim]
    if not _functional_roots:
        buffer.narrow(dim, start, end - start).copy_(value)
        return buffer
    return _rebind(owner, name, torch.slice_scatter(buffer, value.to(buffer.dtype), dim, start, end))


def assign_buffer(buffer: Tensor, value: Tensor) -> Tensor:
    """`assign_state` for a caller that holds the buffer tensor, not its owner (a KV cache layer):
    := value of the same shape, in place, or rebound to a fresh copy in functional mode."""
    if not _functional_roots:
        return buffer.copy_(value)
    return replace_state(buffer, value.clone(memory_format=torch.contiguous_format))


def replace_state(current: Tensor, new: Tensor) -> Tensor:
    """Functional mode only: the buffer that holds `current` (a submodule's of the roots given to
    `functional_state`) now holds `new`, an out-of-place update of it. Returns `new`."""
    owner, name = _owner_of(current)
    return _rebind(owner, name, new)


def _buffer(owner: nn.Module, name: str) -> Tensor:
    buffer = owner._buffers.get(name)
    if buffer is None:
        raise AttributeError(f"{type(owner).__name__} has no buffer {name!r} to update")
    return buffer


def _rebind(owner: nn.Module, name: str, new: Tensor) -> Tensor:
    """owner.<name> := new, which must keep the buffer's shape and dtype (NxD allows no other update)."""
    old = _buffer(owner, name)
    if new.shape != old.shape or new.dtype != old.dtype:
        raise RuntimeError(f"state update of {type(owner).__name__}.{name} would change it from "
                           f"{list(old.shape)} {old.dtype} to {list(new.shape)} {new.dtype}")
    setattr(owner, name, new)
    return new


def _owner_of(tensor: Tensor) -> tuple[nn.Module, str]:
    """(module, buffer name) of the buffer that is `tensor`, among the functional roots' submodules."""
    for root in _functional_roots:
        for module in root.modules():
            for name, buffer in module._buffers.items():
                if buffer is tensor:
                    return module, name
    raise RuntimeError("a state write outside functional_state, or to a tensor that is no buffer of the "
                       f"modules given to it ({[type(r).__name__ for r in _functional_roots]}): only a buffer "
                       "can be rebound to its update")
