"""The NKI interpreter's memory model (kernels/interpreter.py runs the instructions): data types, the
memories (HBM, SBUF, PSUM), tiles as numpy arrays that know their memory and which of their elements have
been written, and the checked reads and writes every instruction goes through (partition dimension,
PSUM bank size, slices in bounds, no nested slicing, no read of an element never written; bfloat16
rounded to nearest-even whenever a bfloat16 tile is written).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

PMAX = 128  # partitions of SBUF and PSUM
PSUM_BANK_BYTES = 2048  # one PSUM bank per partition; a matmul output tile must fit in one
PSUM_BANK_FMAX = PSUM_BANK_BYTES // 4  # = 512 float32
GEMM_STATIONARY_FMAX = 128
GEMM_MOVING_FMAX = 512
SBUF_PARTITION_BYTES = 24 * 2**20 // PMAX  # trn1's 24 MiB SBUF (trn2: 28 MiB); one tile must fit


class NkiInterpreterError(RuntimeError):
    """A kernel did something the NeuronCore (or the NKI compiler) would refuse."""


# ---- data types and memories -----------------------------------------------------------------


def _round_bf16(values: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even), kept in float32 storage."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)


@dataclass(frozen=True)
class DType:
    name: str
    storage: type  # the numpy type holding the values
    itemsize: int  # bytes per element on the device

    @property
    def is_float(self) -> bool:
        return np.issubdtype(self.storage, np.floating)

    def cast(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values)
        if self.name == "bfloat16":
            return _round_bf16(values.astype(np.float32))
        if not self.is_float and np.issubdtype(values.dtype, np.floating):
            values = np.rint(values)
        return values.astype(self.storage)

    def __repr__(self) -> str:
        return self.name


float32 = DType("float32", np.float32, 4)
bfloat16 = DType("bfloat16", np.float32, 2)
int32 = DType("int32", np.int32, 4)


@dataclass(frozen=True)
class Memory:
    name: str
    on_chip: bool

    def __repr__(self) -> str:
        return self.name


hbm = Memory("hbm", False)
shared_hbm = Memory("shared_hbm", False)  # where kernel outputs live
sbuf = Memory("sbuf", True)
psum = Memory("psum", True)


# ---- tensors and the regions instructions read and write ------------------------------------


def _check_tile(shape: tuple[int, ...], dtype: DType, buffer: Memory, name: str) -> None:
    if not shape or shape[0] > PMAX:
        raise NkiInterpreterError(
            f"{buffer.name} tile {name} of shape {shape}: the partition dimension (first axis) must be "
            f"1..{PMAX}")
    free_bytes = math.prod(shape[1:]) * dtype.itemsize
    if buffer is psum and free_bytes > PSUM_BANK_BYTES:
        raise NkiInterpreterError(
            f"PSUM tile {name} of shape {shape} ({dtype}) needs {free_bytes} bytes per partition, more "
            f"than one {PSUM_BANK_BYTES}-byte bank (PSUM free size <= {PSUM_BANK_FMAX} float32)")
    if buffer is sbuf and free_bytes > SBUF_PARTITION_BYTES:
        raise NkiInterpreterError(
            f"SBUF tile {name} of shape {shape} ({dtype}) needs {free_bytes} bytes per partition, more "
            f"than the {SBUF_PARTITION_BYTES} a partition has")


def _format_key(key: tuple) -> str:
    def one(k: Any) -> str:
        if isinstance(k, slice):
            return f"{'' if k.start is None else k.start}:{'' if k.stop is None else k.stop}"
        return "..." if k is Ellipsis else str(k)

    return ", ".join(one(k) for k in key)


class Tensor:
    """`nl.ndarray`: one allocation in one memory, its values and which of them were written."""

    def __init__(self, shape: tuple[int, ...], dtype: DType, buffer: Memory, name: str,
                 values: np.ndarray | None = None) -> None:
        shape = tuple(int(s) for s in shape)
        if not isinstance(dtype, DType) or not isinstance(buffer, Memory):
            raise NkiInterpreterError(f"tensor {name}: dtype and buffer must be nl types, got {dtype!r}, {buffer!r}")
        if buffer.on_chip:
            _check_tile(shape, dtype, buffer, name)
        self.shape, self.dtype, self.buffer, self.name = shape, dtype, buffer, name
        self.values = np.zeros(shape, dtype.storage) if values is None else dtype.cast(values).reshape(shape)
        self.written = np.full(shape, values is not None)

    def __getitem__(self, key: Any) -> View:
        key = key if isinstance(key, tuple) else (key,)
        if sum(k is Ellipsis for k in key) > 1:
            raise NkiInterpreterError(f"{self.name}[{_format_key(key)}]: at most one ...")
        explicit = [k for k in key if k is not Ellipsis]
        if len(explicit) > len(self.shape):
            raise NkiInterpreterError(f"{self.name}[{_format_key(key)}]: too many indices for shape {self.shape}")
        dims = iter(range(len(self.shape)))
        for k in key:
            if k is Ellipsis:
                for _ in range(len(self.shape) - len(explicit)):
                    next(dims)
                continue
            size = self.shape[next(dims)]
            if isinstance(k, slice):
                start, stop = (0 if k.start is None else k.start), (size if k.stop is None else k.stop)
                if k.step not in (None, 1) or not 0 <= start < stop <= size:
                    raise NkiInterpreterError(
                        f"{self.name}[{_format_key(key)}]: slice {start}:{stop} is empty or out of bounds "
                        f"for an axis of size {size}")
            elif isinstance(k, (int, np.integer)):
                if not 0 <= k < size:
                    raise NkiInterpreterError(f"{self.name}[{_format_key(key)}]: index {k} out of bounds ({size})")
            else:
                raise NkiInterpreterError(f"{self.name}: index with ints and slices, got {type(k).__name__}")
        return View(self, self.values[key], self.written[key], f"{self.name}[{_format_key(key)}]")

    def ap(self, pattern: list[list[int]], offset: int = 0, vector_offset: Any = None,
           indirect_dim: int = 0) -> View:
        """An access pattern over the flattened tensor: [[stride, count], ...], partition axis first.

        With `vector_offset` (an SBUF tile of row indices, one per partition of the pattern) row w of
        the result starts at vector_offset[w] * (elements per row of this tensor): a gather."""
        if self.buffer.on_chip:
            raise NkiInterpreterError(f"{self.name}.ap(): the interpreter models access patterns on HBM only")
        counts = [int(count) for _, count in pattern]
        index = np.full(counts, int(offset), dtype=np.int64)
        for axis, (stride, count) in enumerate(pattern):
            shape = [1] * len(counts)
            shape[axis] = int(count)
            index = index + int(stride) * np.arange(count).reshape(shape)
        if vector_offset is not None:
            if indirect_dim != 0:
                raise NkiInterpreterError(f"{self.name}.ap(): vector offsets index axis 0 only")
            rows = _read(vector_offset, ".ap vector_offset", "vector_offset")
            if rows.size != counts[0] or not np.issubdtype(rows.dtype, np.integer):
                raise NkiInterpreterError(
                    f"{self.name}.ap(): vector_offset must hold {counts[0]} integer row indices, got {rows.size} "
                    f"of {rows.dtype}")
            shape = [counts[0]] + [1] * (len(counts) - 1)
            own = int(pattern[0][0]) * np.arange(counts[0]).reshape(shape)  # ignored, as on the device
            index = index - own + rows.reshape(shape).astype(np.int64) * math.prod(self.shape[1:])
        size = math.prod(self.shape)
        if index.min() < 0 or index.max() >= size:
            raise NkiInterpreterError(
                f"{self.name}.ap({pattern}, offset={offset}): reaches element {int(index.max())} or "
                f"{int(index.min())} of a tensor with {size}")
        label = f"{self.name}.ap({pattern}, offset={offset}{', gathered' if vector_offset is not None else ''})"
        return View(self, self.values.reshape(-1)[index], self.written.reshape(-1)[index], label, writable=False)


class View:
    """A region of a tensor, as an instruction names it (`t[0:rows, k0:k0 + kc]` or `t.ap(...)`)."""

    def __init__(self, tensor: Tensor, values: np.ndarray, written: np.ndarray, label: str,
                 writable: bool = True) -> None:
        self.tensor, self.values, self.written, self.label, self.writable = tensor, values, written, label, writable

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    @property
    def dtype(self) -> DType:
        return self.tensor.dtype

    @property
    def buffer(self) -> Memory:
        return self.tensor.buffer

    def __getitem__(self, key: Any) -> View:
        raise NkiInterpreterError(f"{self.label}[...]: NKI has no nested slicing; index the tensor once")


def _view(x: Any, op: str, role: str) -> View:
    if isinstance(x, Tensor):
        return x[...]
    if isinstance(x, View):
        return x
    raise NkiInterpreterError(f"{op}: {role} must be a tile, got {type(x).__name__}")


def _read(x: Any, op: str, role: str, on_chip: bool = True) -> np.ndarray:
    v = _view(x, op, role)
    if on_chip and not v.buffer.on_chip:
        raise NkiInterpreterError(
            f"{op} reads {role} {v.label} from {v.buffer.name}: compute engines see only SBUF and PSUM "
            f"(dma_copy it into SBUF first)")
    if not v.written.all():
        first = tuple(int(i) for i in np.argwhere(~v.written)[0])
        raise NkiInterpreterError(
            f"{op} reads {role} {v.label} ({v.buffer.name}) where it was never written "
            f"({int((~v.written).sum())} of {v.written.size} elements, the first at {first})")
    return v.values


def _write(x: Any, values: np.ndarray, op: str, on_chip: bool = True) -> None:
    v = _view(x, op, "dst")
    if not v.writable:
        raise NkiInterpreterError(f"{op} writes {v.label}: the interpreter reads through .ap() patterns only")
    if on_chip and not v.buffer.on_chip:
        raise NkiInterpreterError(f"{op} writes dst {v.label} in {v.buffer.name}: compute engines write SBUF/PSUM")
    values = np.asarray(values)
    if values.shape != v.shape:
        raise NkiInterpreterError(f"{op}: the result has shape {values.shape}, dst {v.label} has {v.shape}")
    v.values[...] = v.dtype.cast(values)
    v.written[...] = True


def _f32(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float32)


def _same_shape(op: str, *pairs: tuple[str, Any]) -> None:
    shapes = {role: _view(x, op, role).shape for role, x in pairs}
    if len(set(shapes.values())) > 1:
        raise NkiInterpreterError(f"{op}: operand shapes differ: {shapes}")


def _per_partition(x: Any, data: np.ndarray, op: str, role: str) -> np.ndarray | float:
    """A scalar, or a [partitions, 1] tile broadcast along the free axes of `data`."""
    if isinstance(x, (int, float)):
        return float(x)
    values = _f32(_read(x, op, role))
    if values.shape != (data.shape[0], 1):
        raise NkiInterpreterError(f"{op}: {role} must be a scalar or a ({data.shape[0]}, 1) tile, got {values.shape}")
    return values.reshape((data.shape[0],) + (1,) * (data.ndim - 1))
