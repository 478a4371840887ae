"""Checkpoint tensors read lazily: every safetensors file's header first (names, shapes, dtypes, so that
every check runs before any weight is read), then tensor by tensor, or only the slice a rank keeps,
straight into the build's dtype.

safetensors maps a file and hands out tensors that are views of the mapping (`safe_open`,
`get_slice`): the pages a read touches count in the process's resident set until the mapping goes. So
`read` copies what it returns into memory of its own (the model never points into a file a user may
replace), large tensors are read in row chunks, and `release` (called by the loaders after each decoder
layer) drops the mappings: a process's peak while loading is about what it keeps, plus one layer.

The conversion to the build's dtype is exact: the value a tensor has after `.float().to(dtype)` (what
the loaders did before, building in float32 and casting once loaded), without a float32 copy of more
than one chunk.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from neuron_peagle.errors import ModelDirError, WeightsError

CHUNK_BYTES = 64 * 2**20  # a tensor larger than this is read this many bytes of rows at a time
# safetensors' dtype names (header "dtype" field) -> torch's
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
          "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype


class Checkpoint(Protocol):
    """Named tensors, known by their headers before any is read."""

    source: str  # what error messages name: the directory

    def infos(self) -> Mapping[str, TensorInfo]: ...

    def read(self, name: str, rows: range | None = None, cols: range | None = None,
             dtype: torch.dtype | None = None) -> Tensor:
        """Tensor `name`, or its rows `rows` (dim 0) and columns `cols` (dim 1), in `dtype` (None: its
        own), in memory of its own; refuses NaN or inf in what it read (a corrupt checkpoint)."""
        ...

    def release(self) -> None:
        """Let go of whatever was kept to read faster (file mappings)."""
        ...


def convert(tensor: Tensor, dtype: torch.dtype | None) -> Tensor:
    """A copy of `tensor` in `dtype`, rounded as `.float().to(dtype)` rounds (exactly: float32 holds every
    value of the narrower float types, so the one rounding is the same)."""
    if dtype is None or not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor.clone(memory_format=torch.contiguous_format)
    if tensor.dtype not in (torch.float32, torch.float64):
        tensor = tensor.float()
    return tensor.to(dtype, memory_format=torch.contiguous_format)


def _index(rows: range | None, cols: range | None) -> tuple[slice, ...]:
    out = (slice(rows.start, rows.stop) if rows is not None else slice(None),)
    return out + ((slice(cols.start, cols.stop),) if cols is not None else ())


def _check_ranges(name: str, shape: tuple[int, ...], rows: range | None, cols: range | None, source: str) -> None:
    for dim, want in ((0, rows), (1, cols)):
        if want is None:
            continue
        if len(shape) <= dim or want.step != 1 or not 0 <= want.start <= want.stop <= shape[dim]:
            raise WeightsError(f"{source}: {name} {shape} has no slice [{want.start}:{want.stop}] in dim {dim}")


def put(module: nn.Module, name: str, tensor: Tensor) -> None:
    """Make `tensor` module's parameter `name` (which the model built, maybe on the meta device, with the
    shape the tensor must have)."""
    old = getattr(module, name)
    if tuple(old.shape) != tuple(tensor.shape):
        raise WeightsError(f"internal: {type(module).__name__}.{name} is {tuple(old.shape)}, the loader made "
                           f"{tuple(tensor.shape)}")
    setattr(module, name, nn.Parameter(tensor, requires_grad=False))


class SafetensorsDir:
    """The `*.safetensors` files of a directory (one file, or shards with `model.safetensors.index.json`),
    except the files named in `exclude` (a drafter directory's datastore is not weights)."""

    def __init__(self, files: dict[str, Path], infos: dict[str, TensorInfo], source: str) -> None:
        self._files = files  # tensor name -> its file
        self._infos = infos
        self.source = source
        self._open: dict[Path, object] = {}

    @classmethod
    def open(cls, model_dir: str | Path, exclude: tuple[str, ...] = ()) -> "SafetensorsDir":
        """Read every file's header (a truncated or corrupt file is refused here, naming it)."""
        path = Path(model_dir)
        if not path.is_dir():
            raise ModelDirError(f"model directory {str(path)!r} does not exist")
        index = path / "model.safetensors.index.json"
        if index.is_file():
            try:
                shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as err:
                raise WeightsError(f"{index}: unreadable shard index ({err})") from None
            files = [path / name for name in shard_names]
        else:
            files = sorted(f for f in path.glob("*.safetensors") if f.name not in exclude)
        if not files:
            raise ModelDirError(f"model directory {str(path)!r} has no *.safetensors weight file")
        names: dict[str, Path] = {}
        infos: dict[str, TensorInfo] = {}
        for file in files:
            if not file.is_file():
                raise WeightsError(f"weight shard {file.name} named by the index is missing in {path}")
            try:
                with safe_open(str(file), framework="pt") as handle:
                    for name in handle.keys():
                        part = handle.get_slice(name)
                        dtype = DTYPES.get(part.get_dtype())
                        if dtype is None:
                            raise WeightsError(f"{file}: tensor {name} has dtype {part.get_dtype()}, which "
                                               "this loader does not read")
                        names[name] = file
                        infos[name] = TensorInfo(tuple(part.get_shape()), dtype)
            except (SafetensorError, OSError, ValueError) as err:
                raise WeightsError(f"{file}: cannot read safetensors file (truncated or corrupt?): {err}") from None
        return cls(names, infos, str(path))

    def infos(self) -> Mapping[str, TensorInfo]:
        return self._infos

    def _handle(self, file: Path):
        if file not in self._open:
            try:
                self._open[file] = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError) as err:
                raise WeightsError(f"{file}: cannot read safetensors file (changed while loading?): {err}") from None
        return self._open[file]

    def read(self, name: str, rows: range | None = None, cols: range | None = None,
             dtype: torch.dtype | None = None) -> Tensor:
        info = self._infos.get(name)
        if info is None:
            raise WeightsError(f"{self.source}: no tensor {name}")
        _check_ranges(name, info.shape, rows, cols, self.source)
        file = self._files[name]
        all_rows = rows if rows is not None else range(info.shape[0] if info.shape else 0)
        row_bytes = info.dtype.itemsize * (len(cols) if cols is not None else
                                          (torch.Size(info.shape[1:]).numel() if info.shape else 1))
        step = max(1, CHUNK_BYTES // max(row_bytes, 1))
        try:
            if not info.shape or len(all_rows) <= step:
                out = convert(self._handle(file).get_slice(name)[_index(rows, cols)], dtype)
            else:  # row chunks, the file's mapping dropped after each: at most a chunk of it resident
                shape = [len(all_rows), *info.shape[1:]]
                if cols is not None:
                    shape[1] = len(cols)
                floating = dtype is not None and info.dtype.is_floating_point
                out = torch.empty(shape, dtype=dtype if floating else info.dtype)
                for start in range(all_rows.start, all_rows.stop, step):
                    chunk = range(start, min(start + step, all_rows.stop))
                    piece = self._handle(file).get_slice(name)[_index(chunk, cols)]
                    out[start - all_rows.start:chunk.stop - all_rows.start] = convert(piece, dtype)
                    del piece
                    self.release()
        except SafetensorError as err:
            raise WeightsError(f"{file}: cannot read tensor {name} (truncated or corrupt?): {err}") from None
        if not is_finite(out):
            raise WeightsError(f"{file}: tensor {name} holds NaN or inf values; the checkpoint is corrupt")
        return out

    def release(self) -> None:
        self._open.clear()

    def read_all(self) -> dict[str, Tensor]:
        """Every tensor, whole, in its own dtype (small checkpoints: drafters)."""
        try:
            return {name: self.read(name) for name in sorted(self._infos)}
        finally:
            self.release()


class TensorDict:
    """Tensors already in memory, as a Checkpoint (a drafter's, a test's)."""

    def __init__(self, tensors: dict[str, Tensor], source: str) -> None:
        self.tensors = tensors
        self.source = source

    def infos(self) -> Mapping[str, TensorInfo]:
        return {name: TensorInfo(tuple(t.shape), t.dtype) for name, t in self.tensors.items()}

    def read(self, name: str, rows: range | None = None, cols: range | None = None,
             dtype: torch.dtype | None = None) -> Tensor:
        if name not in self.tensors:
            raise WeightsError(f"{self.source}: no tensor {name}")
        tensor = self.tensors[name]
        _check_ranges(name, tuple(tensor.shape), rows, cols, self.source)
        out = convert(tensor[_index(rows, cols)], dtype)
        if not is_finite(out):
            raise WeightsError(f"{self.source}: tensor {name} holds NaN or inf values; the checkpoint is corrupt")
        return out

    def release(self) -> None:
        pass


def is_finite(tensor: Tensor) -> bool:
    """Whether a tensor holds no NaN or inf (integer and boolean tensors always do). Its least and greatest
    values are checked: aminmax propagates NaN and reads the tensor once, many times faster than the
    boolean copy `torch.isfinite` makes (milliseconds for a 135M-parameter model)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    if tensor.element_size() == 1:  # float8: no aminmax on the CPU
        tensor = tensor.float()
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))
