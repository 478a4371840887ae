"""How a graph's state is written: in place, or by rebinding the buffer to an out-of-place result.

A graph's state (KV caches, the speculative state, the lookup history) is the buffers of
`StateModule`s, and persists between graph calls. A state module writes only its own buffers, and only
through its four write methods (`assign`, `scatter`, `write_slice`, `put_rows`), in the way its `writes`
says.
The backend picks that way once, when it prepares the modules (`use_state_writes`):

- `IN_PLACE` (the default; inductor, TorchNeuron, xla): the buffer keeps its storage and is written
  by `copy_`, `scatter_`, a slice's `copy_` or `index_copy_`. torch.compile functionalizes in-place mutations itself
  and writes them back into the same buffers; torch-xla donates a buffer updated in place to its new
  value (an input-output alias), where a rebinding would copy it.
- `IN_PLACE_INT16` (eager CPU): the same, except that a scatter into a 16-bit buffer writes the same
  bits through an int16 view. On CPU, PyTorch's scatter over 16-bit floats copies the whole buffer on
  every call (1.7 ms for a [32, 3, 512, 64] bf16 KV cache against 0.013 ms in float32); the int16
  scatter does not. Only outside torch.compile: inside it the plain scatter is used.
- `REBIND` (nxd): the buffer attribute is rebound to the result of an out-of-place op
  (`torch.scatter`, `torch.slice_scatter`, `torch.index_copy`, a fresh copy), of the same shape and dtype.
  neuronx-distributed's tracer aliases a buffer to its update only in this form and documents
  in-place ops on buffers as not supported.

All three compute the same values, bit for bit (tests/test_state_updates.py). This module imports
only torch: models, graphs and backends all build on it.
"""

from __future__ import annotations

import enum

import torch
from torch import Tensor, nn


class StateWrites(enum.Enum):
    """How a `StateModule` writes its buffers (see the module docstring)."""

    IN_PLACE = "in place"
    IN_PLACE_INT16 = "in place, 16-bit scatters through an int16 view"
    REBIND = "rebound to out-of-place results"


class StateModule(nn.Module):
    """A module whose buffers are graph state, written only through its own methods.

    Each method returns the tensor that holds the buffer after the write: the same tensor in place,
    the new one under `REBIND` (read the buffer again, or use the return value, after a write)."""

    writes: StateWrites = StateWrites.IN_PLACE  # set per module by `use_state_writes`

    def assign(self, name: str, value: Tensor) -> Tensor:
        """Buffer `name` := `value`, broadcast to the buffer's shape and cast to its dtype (as `copy_`)."""
        buffer = self._state(name)
        if self.writes is StateWrites.REBIND:
            # A fresh contiguous tensor: never the caller's input, another buffer or a broadcast view.
            return self._rebind(name, value.to(buffer.dtype).expand(buffer.shape).clone(
                memory_format=torch.contiguous_format))
        return buffer.copy_(value)

    def scatter(self, name: str, dim: int, index: Tensor, src: Tensor) -> Tensor:
        """Buffer `name` with `src` (cast to its dtype) scattered at `index` along `dim` (`Tensor.scatter_`)."""
        buffer = self._state(name)
        src = src.to(buffer.dtype)
        if self.writes is StateWrites.REBIND:
            return self._rebind(name, torch.scatter(buffer, dim, index, src))
        if (self.writes is StateWrites.IN_PLACE_INT16 and buffer.element_size() == 2
                and not torch.compiler.is_compiling()):
            buffer.view(torch.int16).scatter_(dim, index, src.view(torch.int16))
            return buffer
        return buffer.scatter_(dim, index, src)

    def write_slice(self, name: str, dim: int, start: int, value: Tensor) -> Tensor:
        """Buffer `name` with positions [start, start + value.shape[dim]) of `dim` := `value`."""
        buffer = self._state(name)
        end = start + value.shape[dim]
        if self.writes is StateWrites.REBIND:
            return self._rebind(name, torch.slice_scatter(buffer, value.to(buffer.dtype), dim, start, end))
        buffer.narrow(dim, start, end - start).copy_(value)
        return buffer

    def put_rows(self, name: str, rows: Tensor, value: Tensor, dim: int | None = None, length: int = 0) -> Tensor:
        """Buffer `name`'s batch rows `rows` [R] := `value` [R, ...]; with `dim`, only positions [0, length)
        of that dimension (`value` has `length` there), the rest of those rows kept."""
        buffer = self._state(name)
        value = value.to(buffer.dtype)
        part = buffer if dim is None else buffer.narrow(dim, 0, length)
        if self.writes is StateWrites.REBIND:
            new = torch.index_copy(part, 0, rows, value)
            if dim is not None:
                new = torch.slice_scatter(buffer, new, dim, 0, length)
            return self._rebind(name, new)
        part.index_copy_(0, rows, value)
        return buffer

    def prefill_extent(self, name: str, bucket: int) -> tuple[int, int] | None:
        """What of buffer `name`'s row a prefill of `bucket` tokens leaves for later calls to read:
        (dim, length) for positions [0, length) of `dim`, or None for the whole row (the default)."""
        return None

    def take_rows(self, source: "StateModule", rows: Tensor, bucket: int) -> None:
        """Rows `rows` [R] of every buffer := what a prefill of `bucket` tokens left in `source`, a module
        of the same kind with R rows (graphs.slots: a one-sequence prefill entering its slot)."""
        for name, value in source.named_buffers(recurse=False):
            extent = self.prefill_extent(name, bucket)
            if extent is None:
                self.put_rows(name, rows, value)
            else:
                dim, length = extent
                self.put_rows(name, rows, value.narrow(dim, 0, length), dim, length)

    def _state(self, name: str) -> Tensor:
        buffer = self._buffers.get(name)
        if buffer is None:
            raise AttributeError(f"{type(self).__name__} has no buffer {name!r} to update")
        return buffer

    def _rebind(self, name: str, new: Tensor) -> Tensor:
        """self.<name> := new, which must keep the buffer's shape and dtype (NxD allows no other update)."""
        old = self._state(name)
        if new.shape != old.shape or new.dtype != old.dtype:
            raise RuntimeError(f"state update of {type(self).__name__}.{name} would change it from "
                               f"{list(old.shape)} {old.dtype} to {list(new.shape)} {new.dtype}")
        setattr(self, name, new)
        return new


def use_state_writes(module: nn.Module, writes: StateWrites) -> None:
    """Every `StateModule` in `module` (itself included) writes its buffers the way `writes` says.
    Called by each backend's `prepare`."""
    for sub in module.modules():
        if isinstance(sub, StateModule):
            sub.writes = writes
