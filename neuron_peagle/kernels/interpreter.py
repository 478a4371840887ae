"""A small CPU interpreter for the subset of NKI that this package's kernels use.

The kernels are written against the real `nki` API (NKI 0.6: `nl.ndarray` allocations, `nisa.*`
instructions with an explicit `dst`, `nisa.dma_copy` between HBM and SBUF). Without the Neuron SDK
they still run here, unchanged: `nki_api` hands them this module's `nki`, `nl` and `nisa`.

Tiles are numpy arrays that know their memory (HBM, SBUF, PSUM) and which of their elements have
been written (the memory model, `interpreter_memory.py`); this module holds the instructions, the
language and the launch. Every instruction checks what the hardware or NKI would refuse, with a message that
names the tile: a partition dimension over 128; a PSUM tile larger than one 2 KiB bank (512 float32);
matmul operands over the Tensor Engine's limits (stationary free size 128, moving free size 512),
not in SBUF, or not contracting over matching partitions; compute engines reading HBM; DMA reading
PSUM or converting types; slices out of bounds; nested slicing; and any read of an SBUF, PSUM or
output element that was never written (a PSUM accumulator the matmuls never filled, a remainder tile
the loop forgot). It checks the logic and the tiling of our kernels; it is not a chip simulator: no
timing, no SBUF capacity beyond one tile, no engine or bank assignment, float32 arithmetic on every
engine, and bfloat16 modelled by rounding to nearest-even whenever a bfloat16 tile is written.

The kernels loop with plain `range`, which NKI compiles as a sequential loop and this interpreter runs
as Python does, in order. `nl.affine_range`, `nl.sequential_range` and `nl.static_range` are here only
as what NKI keeps them as, deprecated aliases of `range`.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

from neuron_peagle.kernels.interpreter_memory import (GEMM_MOVING_FMAX, GEMM_STATIONARY_FMAX, PMAX, PSUM_BANK_FMAX,
                                                      DType, Memory, NkiInterpreterError, Tensor, _f32,
                                                      _per_partition, _read, _same_shape, _view, _write, bfloat16,
                                                      float32, hbm, int32, psum, sbuf, shared_hbm)

# ---- operators ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """An `nl` operator: element-wise in tensor_tensor/tensor_scalar, a reduction in tensor_reduce."""

    name: str
    fn: Callable[..., np.ndarray]
    reduce: Callable[..., np.ndarray] | None = None

    def __call__(self, *args: np.ndarray) -> np.ndarray:
        return np.asarray(self.fn(*args), dtype=np.float32)

    def __repr__(self) -> str:
        return f"nl.{self.name}"


def _compare(fn: Callable) -> Callable:
    return lambda a, b: fn(a, b).astype(np.float32)


add = Op("add", np.add, np.sum)
subtract = Op("subtract", np.subtract)
multiply = Op("multiply", np.multiply, np.prod)
maximum = Op("maximum", np.maximum, np.max)
minimum = Op("minimum", np.minimum, np.min)
greater = Op("greater", _compare(np.greater))
equal = Op("equal", _compare(np.equal))
not_equal = Op("not_equal", _compare(np.not_equal))
# activation functions
copy = Op("copy", lambda x: x)
square = Op("square", np.square)
rsqrt = Op("rsqrt", lambda x: 1.0 / np.sqrt(x))
exp = Op("exp", np.exp)


# ---- nki.isa -------------------------------------------------------------------------------------


def dma_copy(dst: Any, src: Any, dge_mode: Any = None, name: str | None = None) -> None:
    s, d = _view(src, "dma_copy", "src"), _view(dst, "dma_copy", "dst")
    if s.buffer is psum or d.buffer is psum:
        raise NkiInterpreterError(
            f"dma_copy {s.label} -> {d.label}: DMA does not touch PSUM (tensor_copy PSUM into SBUF first)")
    if s.shape != d.shape:
        raise NkiInterpreterError(f"dma_copy {s.label} {s.shape} -> {d.label} {d.shape}: shapes differ")
    if s.dtype != d.dtype:
        raise NkiInterpreterError(
            f"dma_copy {s.label} -> {d.label}: DMA moves bytes and does not convert {s.dtype} to {d.dtype} "
            f"(tensor_copy into a tile of that type)")
    _write(d, _read(s, "dma_copy", "src", on_chip=False), "dma_copy", on_chip=False)


def tensor_copy(dst: Any, src: Any, engine: Any = None, name: str | None = None) -> None:
    _same_shape("tensor_copy", ("dst", dst), ("src", src))
    _write(dst, _read(src, "tensor_copy", "src"), "tensor_copy")


def memset(dst: Any, value: float | int, engine: Any = None, name: str | None = None) -> None:
    d = _view(dst, "memset", "dst")
    if not d.dtype.is_float and not isinstance(value, (int, np.integer)):
        raise NkiInterpreterError(f"memset {d.label}: an {d.dtype} tile takes an integer value, got {value!r}")
    _write(d, np.full(d.shape, value), "memset")


def iota(dst: Any, pattern: list[list[int]], offset: int = 0, channel_multiplier: int = 0,
         name: str | None = None) -> None:
    """dst[p, i1, i2, ...] = offset + channel_multiplier * p + sum(stride_j * i_j) over the free axes."""
    d = _view(dst, "iota", "dst")
    if [int(count) for _, count in pattern] != list(d.shape[1:]):
        raise NkiInterpreterError(f"iota {d.label}: pattern {pattern} does not cover the free axes {d.shape[1:]}")
    values = np.full(d.shape, offset, dtype=np.int64)
    values = values + channel_multiplier * np.arange(d.shape[0]).reshape((-1,) + (1,) * (len(d.shape) - 1))
    for axis, (stride, count) in enumerate(pattern, start=1):
        shape = [1] * len(d.shape)
        shape[axis] = int(count)
        values = values + int(stride) * np.arange(count).reshape(shape)
    _write(d, values, "iota")


def nc_matmul(dst: Any, stationary: Any, moving: Any, is_stationary_onezero: bool = False,
              is_moving_onezero: bool = False, is_transpose: bool = False, accumulate: bool | None = None,
              tile_position: tuple = (), tile_size: tuple = (), perf_mode: Any = None, name: str | None = None
              ) -> None:
    """dst = stationary.T @ moving on the Tensor Engine, accumulated in float32 PSUM.

    accumulate=None (the default): the first write to a PSUM element overwrites, later ones add."""
    op = "nc_matmul"
    st, mv, d = _view(stationary, op, "stationary"), _view(moving, op, "moving"), _view(dst, op, "dst")
    for role, v in (("stationary", st), ("moving", mv)):
        if v.buffer is not sbuf:
            raise NkiInterpreterError(f"{op}: {role} {v.label} is in {v.buffer.name}; the Tensor Engine reads SBUF")
        if len(v.shape) != 2:
            raise NkiInterpreterError(f"{op}: {role} {v.label} must be 2-D [partitions, free], got {v.shape}")
    if d.buffer is not psum or d.dtype != float32:
        raise NkiInterpreterError(f"{op}: dst {d.label} must be a float32 PSUM tile ({d.buffer.name}, {d.dtype})")
    (k_st, m), (k_mv, n) = st.shape, mv.shape
    if k_st != k_mv:
        raise NkiInterpreterError(
            f"{op}: the contraction runs over the partitions, and they differ: stationary {st.label} has "
            f"{k_st}, moving {mv.label} has {k_mv}")
    if m > GEMM_STATIONARY_FMAX:
        raise NkiInterpreterError(
            f"{op}: stationary {st.label} has free size {m}, more than {GEMM_STATIONARY_FMAX}")
    if n > GEMM_MOVING_FMAX:
        raise NkiInterpreterError(f"{op}: moving {mv.label} has free size {n}, more than {GEMM_MOVING_FMAX}")
    if st.dtype != mv.dtype:
        raise NkiInterpreterError(f"{op}: stationary is {st.dtype}, moving is {mv.dtype}")
    if d.shape != (m, n):
        raise NkiInterpreterError(f"{op}: dst {d.label} is {d.shape}, stationary.T @ moving is {(m, n)}")
    product = _f32(_read(st, op, "stationary")).T @ _f32(_read(mv, op, "moving"))
    if accumulate is None:
        product = np.where(d.written, d.values + product, product)
    elif accumulate:
        product = _read(d, op, "the accumulator") + product
    _write(d, product, op)


def nc_transpose(dst: Any, data: Any, engine: Any = None, name: str | None = None) -> None:
    """Partition <-> free transpose on the Tensor Engine: SBUF [p <= 128, f <= 128] -> PSUM [f, p]."""
    op = "nc_transpose"
    src, d = _view(data, op, "data"), _view(dst, op, "dst")
    if src.buffer is not sbuf or d.buffer is not psum:
        raise NkiInterpreterError(f"{op}: reads SBUF and writes PSUM; got {src.buffer.name} -> {d.buffer.name}")
    if len(src.shape) != 2 or src.shape[1] > PMAX:
        raise NkiInterpreterError(f"{op}: data {src.label} must be at most [{PMAX}, {PMAX}], got {src.shape}")
    if d.shape != src.shape[::-1] or d.dtype != src.dtype:
        raise NkiInterpreterError(
            f"{op}: dst {d.label} must be {src.shape[::-1]} {src.dtype}, got {d.shape} {d.dtype}")
    _write(d, _read(src, op, "data").T, op)


def activation(dst: Any, op: Op, data: Any, bias: Any = None, scale: Any = 1.0, reduce_op: Op | None = None,
               reduce_res: Any = None, reduce_cmd: Any = None, name: str | None = None) -> None:
    """dst = op(data * scale + bias); with reduce_res, also the sum of dst along the free axes."""
    x = _f32(_read(data, "activation", "data"))
    _same_shape("activation", ("dst", dst), ("data", data))
    shift = 0.0 if bias is None else _per_partition(bias, x, "activation", "bias")
    y = op(x * _per_partition(scale, x, "activation", "scale") + shift)
    _write(dst, y, "activation")
    if reduce_res is not None:
        if reduce_op is not add:
            raise NkiInterpreterError(f"activation: the Scalar Engine reduces with nl.add only, got {reduce_op}")
        _write(reduce_res, y.reshape(y.shape[0], -1).sum(axis=1, keepdims=True), "activation reduce_res")


def activation_reduce(dst: Any, op: Op, data: Any, reduce_op: Op, reduce_res: Any, bias: Any = None,
                      scale: Any = 1.0, name: str | None = None) -> None:
    activation(dst, op, data, bias=bias, scale=scale, reduce_op=reduce_op, reduce_res=reduce_res)


def tensor_reduce(dst: Any, op: Op, data: Any, axis: int | list[int], negate: bool = False,
                  keepdims: bool = False, name: str | None = None) -> None:
    x = _f32(_read(data, "tensor_reduce", "data"))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    if 0 in axes or op.reduce is None:
        raise NkiInterpreterError(f"tensor_reduce: reduces free axes (not axis 0) with add/multiply/max/min, "
                                  f"got axis={axis}, op={op}")
    result = op.reduce(x, axis=axes, keepdims=True)
    d = _view(dst, "tensor_reduce", "dst")
    if result.size != math.prod(d.shape) or d.shape[0] != x.shape[0]:
        raise NkiInterpreterError(f"tensor_reduce: dst {d.label} {d.shape} cannot hold a result of {result.shape}")
    _write(d, (-result if negate else result).reshape(d.shape), "tensor_reduce")


def tensor_tensor(dst: Any, data1: Any, data2: Any, op: Op, engine: Any = None, name: str | None = None) -> None:
    _same_shape("tensor_tensor", ("dst", dst), ("data1", data1), ("data2", data2))
    a, b = _f32(_read(data1, "tensor_tensor", "data1")), _f32(_read(data2, "tensor_tensor", "data2"))
    _write(dst, op(a, b), "tensor_tensor")


def _apply(op: Op, data: np.ndarray, operand: np.ndarray | float, reverse: bool) -> np.ndarray:
    return op(operand, data) if reverse else op(data, operand)


def tensor_scalar(dst: Any, data: Any, op0: Op, operand0: Any, reverse0: bool = False, op1: Op | None = None,
                  operand1: Any = None, reverse1: bool = False, engine: Any = None, name: str | None = None) -> None:
    """dst = (data op0 operand0) op1 operand1, operands scalars or [partitions, 1] tiles."""
    _same_shape("tensor_scalar", ("dst", dst), ("data", data))
    x = _f32(_read(data, "tensor_scalar", "data"))
    y = _apply(op0, x, _per_partition(operand0, x, "tensor_scalar", "operand0"), reverse0)
    if op1 is not None:
        y = _apply(op1, y, _per_partition(operand1, x, "tensor_scalar", "operand1"), reverse1)
    _write(dst, y, "tensor_scalar")


def scalar_tensor_tensor(dst: Any, data: Any, op0: Op, operand0: Any, op1: Op, operand1: Any,
                         reverse0: bool = False, reverse1: bool = False, name: str | None = None) -> None:
    """dst = (data op0 operand0) op1 operand1: operand0 per partition, operand1 a tile like data."""
    _same_shape("scalar_tensor_tensor", ("dst", dst), ("data", data), ("operand1", operand1))
    x = _f32(_read(data, "scalar_tensor_tensor", "data"))
    y = _apply(op0, x, _per_partition(operand0, x, "scalar_tensor_tensor", "operand0"), reverse0)
    _write(dst, _apply(op1, y, _f32(_read(operand1, "scalar_tensor_tensor", "operand1")), reverse1),
           "scalar_tensor_tensor")


# ---- nki.language ----------------------------------------------------------------------------


@dataclass
class _Launch:
    """The launch a kernel body runs in: which of `programs` physical cores (LNC) it is, and the
    nl.shared_hbm tensors the cores share (the i-th such allocation of every core is one tensor)."""

    program: int = 0
    programs: int = 1
    shared: list = None
    allocated: int = 0


_launch = _Launch()


def program_id(axis: int = 0) -> int:
    """nl.program_id: which physical core of the logical core runs this body (0 at LNC=1)."""
    if axis != 0:
        raise NkiInterpreterError(f"nl.program_id({axis}): kernels here launch on one axis (the LNC)")
    return _launch.program


def num_programs(axes: int = 0) -> int:
    """nl.num_programs: how many physical cores run the kernel (the launch's LNC)."""
    if axes != 0:
        raise NkiInterpreterError(f"nl.num_programs({axes}): kernels here launch on one axis (the LNC)")
    return _launch.programs


def ndarray(shape: tuple[int, ...], dtype: DType, buffer: Memory = sbuf, name: str | None = None,
            address: Any = None) -> Tensor:
    if name is None:
        caller = sys._getframe(1)
        name = f"{buffer.name}@{caller.f_code.co_name}:{caller.f_lineno}"
    if buffer is shared_hbm and _launch.shared is not None:  # one tensor in HBM for every core
        index = _launch.allocated
        _launch.allocated += 1
        if index < len(_launch.shared):
            tensor = _launch.shared[index]
            if tensor.shape != tuple(int(s) for s in shape) or tensor.dtype is not dtype:
                raise NkiInterpreterError(f"core {_launch.program} allocates shared tensor {index} as {shape}, "
                                          f"core 0 as {tensor.shape}")
            return tensor
        _launch.shared.append(Tensor(shape, dtype, buffer, name))
        return _launch.shared[-1]
    return Tensor(shape, dtype, buffer, name)


def deprecated_range(*args: int) -> Iterator[int]:
    """nl.affine_range / sequential_range / static_range: deprecated aliases of `range`, in order."""
    return iter(range(*args))


tile_size = SimpleNamespace(pmax=PMAX, psum_fmax=PSUM_BANK_FMAX, psum_bank_fmax=PSUM_BANK_FMAX,
                            gemm_stationary_fmax=GEMM_STATIONARY_FMAX, gemm_moving_fmax=GEMM_MOVING_FMAX)


# ---- running a kernel --------------------------------------------------------------------------


def _input(value: Any, name: str) -> Any:
    """numpy float32/int32 arrays and torch CPU tensors become HBM tensors; other values pass as is."""
    dtype = None
    if hasattr(value, "detach"):  # a torch tensor
        dtype = {"torch.float32": float32, "torch.bfloat16": bfloat16, "torch.int32": int32}.get(str(value.dtype))
        if dtype is None or value.device.type != "cpu":
            raise NkiInterpreterError(f"input {name}: the interpreter takes CPU float32/bfloat16/int32 tensors, "
                                      f"got {value.dtype} on {value.device}")
        value = value.detach().float().numpy() if dtype is bfloat16 else value.detach().numpy()
    elif isinstance(value, np.ndarray):
        dtype = {np.dtype(np.float32): float32, np.dtype(np.int32): int32}.get(value.dtype)
        if dtype is None:
            raise NkiInterpreterError(f"input {name}: the interpreter takes float32/int32 arrays, got {value.dtype}")
    if dtype is None:
        return value
    return Tensor(value.shape, dtype, hbm, name, values=value)


def _output(tensor: Any) -> np.ndarray:
    if not isinstance(tensor, Tensor) or tensor.buffer is not shared_hbm:
        raise NkiInterpreterError(f"kernel outputs must be nl.shared_hbm tensors, got {tensor!r}")
    if not tensor.written.all():
        missing = int((~tensor.written).sum())
        raise NkiInterpreterError(f"kernel output {tensor.name} was not fully written: {missing} of "
                                  f"{tensor.written.size} elements never stored")
    return tensor.values.copy()


def simulate(kernel: Callable, lnc: int = 1) -> Callable:
    """Like `nki.simulate(kernel)`: call with numpy arrays (or torch CPU tensors), get numpy arrays. With
    `lnc` 2 the body runs once per physical core (program 0, then 1), on shared inputs and outputs."""

    def launch(*args: Any) -> Any:
        global _launch
        names = list(inspect.signature(kernel).parameters)
        names += [f"arg{i}" for i in range(len(names), len(args))]
        inputs = [_input(a, n) for a, n in zip(args, names)]
        shared: list = []
        outer = _launch
        try:
            for program in range(lnc):
                _launch = _Launch(program, lnc, shared)
                outputs = kernel(*inputs)
        finally:
            _launch = outer
        if isinstance(outputs, tuple):
            return tuple(_output(t) for t in outputs)
        return _output(outputs)

    return launch


@contextlib.contextmanager
def _kernels_see_interpreter() -> Iterator[None]:
    """Point every loaded kernel module's `nki` / `nl` / `nisa` at this interpreter for a while."""
    this = sys.modules[__name__]
    here = {"nki": nki, "nl": nl, "nisa": nisa}
    saved: list[tuple[Any, str, Any]] = []
    for name, module in list(sys.modules.items()):
        if name.startswith("neuron_peagle.kernels.") and module is not this:
            for attr, value in here.items():
                if attr in vars(module):
                    saved.append((module, attr, getattr(module, attr)))
                    setattr(module, attr, value)
    try:
        yield
    finally:
        for module, attr, value in reversed(saved):
            setattr(module, attr, value)


def run(kernel: Callable, *args: Any, lnc: int = 1) -> Any:
    """Run a kernel's own source on this interpreter, even where the real `nki` is installed; `lnc`: on
    that many physical cores (each running the body as its program id)."""
    with _kernels_see_interpreter():
        return simulate(kernel, lnc)(*args)


nl = SimpleNamespace(
    ndarray=ndarray, affine_range=deprecated_range, sequential_range=deprecated_range, static_range=deprecated_range,
    tile_size=tile_size, float32=float32, bfloat16=bfloat16, int32=int32, program_id=program_id,
    num_programs=num_programs, hbm=hbm, shared_hbm=shared_hbm, sbuf=sbuf, psum=psum,
    add=add, subtract=subtract, multiply=multiply, maximum=maximum, minimum=minimum, greater=greater,
    equal=equal, not_equal=not_equal, copy=copy, square=square, rsqrt=rsqrt, exp=exp,
)
nisa = SimpleNamespace(
    dma_copy=dma_copy, tensor_copy=tensor_copy, memset=memset, iota=iota, nc_matmul=nc_matmul,
    nc_transpose=nc_transpose, activation=activation, activation_reduce=activation_reduce,
    tensor_reduce=tensor_reduce, tensor_tensor=tensor_tensor, tensor_scalar=tensor_scalar,
    scalar_tensor_tensor=scalar_tensor_tensor,
)
nki = SimpleNamespace(jit=simulate, simulate=simulate)
