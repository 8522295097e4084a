"""Turning user inputs (torch, numpy incl. memory-mapped, cupy) into tensors,
and the checks every entry point applies to them."""
from __future__ import annotations

import math
import mmap
import os
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from . import ops

ArrayLike = Any  # torch.Tensor | numpy.ndarray | numpy.memmap | cupy.ndarray | RowShards

CHUNK_ROWS = 16384


class RowShards:
    """Several ``[n_i, d]`` arrays (the per-rank shards ``alphanet extract`` writes under
    torchrun) read as one ``[sum n_i, d]`` array in their order, with no merged copy.

    A row slice inside one shard is that shard's own (memory-mapped) view, so a rank
    whose rows are one shard reads only that file; a slice across shards is another
    ``RowShards``. Rows are read through :func:`_read_rows` where a shard is file-backed."""

    ndim = 2

    def __init__(self, parts: list):
        if not parts:
            raise ValueError("RowShards needs at least one array")
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [int(p.shape[0]) for p in self.parts])
        self.shape = (int(self.starts[-1]),) + tuple(self.parts[0].shape[1:])
        self.dtype = self.parts[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def _slice(self, begin: int, end: int) -> ArrayLike:
        if end <= begin:
            return self.parts[0][:0]
        first = int(np.searchsorted(self.starts, begin, side="right")) - 1
        last = int(np.searchsorted(self.starts, end, side="left")) - 1
        pieces = [self.parts[i][max(begin, self.starts[i]) - self.starts[i]:min(end, self.starts[i + 1]) - self.starts[i]]
                  for i in range(first, last + 1)]
        return pieces[0] if len(pieces) == 1 else RowShards(pieces)

    def __getitem__(self, key: Any) -> ArrayLike:
        if isinstance(key, slice):
            begin, end, step = key.indices(self.shape[0])
            if step == 1:
                return self._slice(begin, end)
        if isinstance(key, (int, np.integer)):
            return self.take(np.array([key + self.shape[0] if key < 0 else key], dtype=np.int64))[0]
        if isinstance(key, slice):
            return self.take(np.arange(self.shape[0])[key])
        return self.take(np.asarray(key, dtype=np.int64))

    def take(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``self[rows]`` (rows in any order) as one array, into ``out`` if given."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise IndexError(f"row {int(rows.max()) if rows.max() >= self.shape[0] else int(rows.min())} "
                             f"is outside the {self.shape[0]} rows")
        if out is None:
            out = np.empty((len(rows),) + self.shape[1:], dtype=self.dtype)
        shard = np.searchsorted(self.starts, rows, side="right") - 1
        for index in np.unique(shard).tolist():
            where = np.flatnonzero(shard == index)
            local = rows[where] - self.starts[index]
            order = np.argsort(local, kind="stable")
            part = self.parts[index]
            picked = _read_rows(part, local[order]) if _backing_file(part) else np.asarray(part[local[order]])
            out[where[order]] = picked
        return out

    def read(self, begin: int, end: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``begin:end`` as one array (into ``out`` if given)."""
        return self.take(np.arange(begin, end), out)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self.read(0, self.shape[0])
        return whole if dtype is None else whole.astype(dtype)


def as_tensor(array: ArrayLike, name: str, device: torch.device | None = None) -> Tensor:
    """A tensor view of ``array`` (no copy for torch, numpy and cupy via DLPack), on ``device`` if given;
    detached, so a classifier's parameters can be passed as they are. :class:`RowShards` are read
    into memory (callers pass their row chunks)."""
    if isinstance(array, RowShards):
        tensor = torch.from_numpy(np.asarray(array))
        return tensor if device is None else tensor.to(device)
    if isinstance(array, Tensor):
        tensor = array.detach()
    elif isinstance(array, np.ndarray):
        tensor = torch.from_numpy(np.asarray(array)) if array.flags.writeable else torch.from_numpy(np.array(array))
    elif hasattr(array, "__dlpack__"):
        tensor = torch.from_dlpack(array)
    else:
        try:
            tensor = torch.as_tensor(array)
        except Exception as error:  # noqa: BLE001
            raise TypeError(f"{name}: expected a torch tensor, numpy array or cupy array, got {type(array).__name__}") from error
    return tensor if device is None else tensor.to(device)


def _backing_file(array: ArrayLike) -> tuple[str, int] | None:
    """``(path, byte offset of row 0)`` for a C-ordered array memory-mapped
    straight from a file (``np.load(mmap_mode="r")``, ``np.memmap``); None otherwise."""
    if not (isinstance(array, np.memmap) and array.flags.c_contiguous):
        return None
    root = array  # a row slice is a view of the memmap that owns the mapping
    while isinstance(root.base, np.memmap):
        root = root.base
    if not (isinstance(root.base, mmap.mmap) and isinstance(root.filename, (str, os.PathLike))):
        return None
    # np.load(pathlib.Path) keeps the Path; a view's `offset` is its root's, so count from the root's start
    return os.fspath(root.filename), root.offset + (array.ctypes.data - root.ctypes.data)


def _read_rows(array: np.memmap, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``array[rows]`` through file reads rather than the mapping, into ``out`` if
    given. Reading through a mapping maps whole runs of pages around each row into
    this process (0.7 GB resident for 2,000 scattered rows of a 2.9 GB file); a
    read copies just the rows. Runs of consecutive rows are read in one call."""
    path, offset = _backing_file(array)
    if out is None:
        out = np.empty((len(rows),) + tuple(array.shape[1:]), dtype=array.dtype)
    if out.size == 0:
        return out
    row_bytes = out[:1].nbytes
    buffer = memoryview(out.reshape(-1).view(np.uint8))
    run_starts = np.flatnonzero(np.diff(rows) != 1) + 1
    with open(path, "rb", buffering=0) as stream:
        for begin, end in zip([0, *run_starts.tolist()], [*run_starts.tolist(), len(rows)]):
            wanted = buffer[begin * row_bytes:end * row_bytes]
            got = os.preadv(stream.fileno(), [wanted], offset + int(rows[begin]) * row_bytes)
            if got != len(wanted):
                raise OSError(f"{path}: file ended early (truncated?) while reading row {int(rows[begin])}")
    return out


def num_rows(array: ArrayLike) -> int:
    return int(array.shape[0])


def iter_row_chunks(array: ArrayLike, name: str, device: torch.device,
                    chunk_rows: int | None = None) -> Iterator[tuple[int, Tensor]]:
    """Yields ``(first_row, rows)`` chunks (of ``CHUNK_ROWS`` rows unless given) as
    tensors on ``device``; memory-mapped arrays are read from their file chunk by chunk."""
    chunk_rows = chunk_rows or CHUNK_ROWS
    empty = as_tensor(array[:0], name)
    if device.type == "cuda" and not empty.is_cuda:
        yield from _uploaded_row_chunks(array, name, device, chunk_rows, empty.dtype)
        return
    file_backed = _backing_file(array) is not None
    for begin in range(0, num_rows(array), chunk_rows):
        if file_backed:
            chunk = _read_rows(array, np.arange(begin, min(begin + chunk_rows, num_rows(array))))
        elif isinstance(array, RowShards):
            chunk = array.read(begin, min(begin + chunk_rows, num_rows(array)))
        else:
            chunk = array[begin:begin + chunk_rows]
        yield begin, as_tensor(chunk, name, device)


def _uploaded_row_chunks(array: ArrayLike, name: str, device: torch.device, chunk_rows: int,
                         dtype: torch.dtype) -> Iterator[tuple[int, Tensor]]:
    """:func:`iter_row_chunks` for host rows bound for a GPU. Each chunk is read
    (from its file, for a memory map) into one pinned buffer and uploaded from
    there asynchronously: a copy from pageable memory goes through the driver's
    own staging copy first (benchmarks/RESULTS.md has both rates)."""
    total = num_rows(array)
    staging = _host_rows((min(chunk_rows, total),) + tuple(array.shape[1:]), dtype, device)
    file_backed = _backing_file(array) is not None
    uploaded = None
    for begin in range(0, total, chunk_rows):
        end = min(begin + chunk_rows, total)
        buffer = staging[:end - begin]
        if uploaded is not None:
            uploaded.synchronize()  # the previous chunk's upload still reads the buffer
        if file_backed:
            _read_rows(array, np.arange(begin, end), out=buffer.numpy())
        elif isinstance(array, RowShards):
            array.read(begin, end, out=buffer.numpy())
        else:  # torch's copy runs on all its threads
            buffer.copy_(as_tensor(array[begin:end], name))
        chunk = buffer.to(device, non_blocking=True)
        uploaded = torch.cuda.Event()
        uploaded.record(torch.cuda.current_stream(device))
        yield begin, chunk


def streamed_class_means(x: ArrayLike, labels: Tensor, num_classes: int, name: str, device: torch.device,
                         dtype: torch.dtype = torch.float32,
                         each_chunk: Callable[[int, Tensor], None] | None = None) -> tuple[Tensor, Tensor]:
    """``(means, counts)`` of the rows of ``x``, read a chunk at a time (a memory-mapped
    file once, in order) and summed in ``dtype``; ``each_chunk(first_row, rows)`` sees
    every chunk first. A NaN or inf is reported by its row."""
    return streamed_class_sums(x, labels, num_classes, name, device, dtype, each_chunk).means()


def streamed_class_sums(x: ArrayLike, labels: Tensor, num_classes: int, name: str, device: torch.device,
                        dtype: torch.dtype = torch.float32, each_chunk: Callable[[int, Tensor], None] | None = None,
                        classes: tuple[int, int] | None = None) -> "ops.ClassMeanAccumulator":
    """:func:`streamed_class_means`'s accumulator (``sums``, ``counts``), to be combined
    with other processes' before dividing. With ``classes=(first, end)`` only rows
    labelled in that range are summed, into ``end - first`` classes."""
    first, end = classes if classes is not None else (0, num_classes)
    accumulator = ops.ClassMeanAccumulator(end - first, x.shape[1], device=device, dtype=dtype)
    for begin, chunk in iter_row_chunks(x, name, device):
        if each_chunk is not None:
            each_chunk(begin, chunk)
        rows, chunk_labels = chunk, labels[begin:begin + chunk.shape[0]]
        if classes is not None:
            inside = (chunk_labels >= first) & (chunk_labels < end)
            rows, chunk_labels = chunk[inside], chunk_labels[inside] - first
        try:
            accumulator.add(rows, chunk_labels)
        except RuntimeError as error:
            if "NaN or inf" in str(error):
                raise non_finite_error(name, chunk, begin) from None
            raise
    return accumulator


def _host_rows(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An empty host tensor for rows bound for ``device``: pinned for a GPU, so that
    the upload need not go through the driver's staging copy of pageable memory."""
    return torch.empty(shape, dtype=dtype, pin_memory=device.type == "cuda")


def gather_rows(array: ArrayLike, rows: Tensor, name: str, device: torch.device) -> Tensor:
    """``array[rows]`` on ``device``; a memory-mapped array is read from its file in ascending row order."""
    shape = (rows.numel(),) + tuple(array.shape[1:])
    if isinstance(array, Tensor) and array.device.type == "cpu":
        gathered = _host_rows(shape, array.dtype, device)
        return torch.index_select(array.detach(), 0, rows.cpu(), out=gathered).to(device, non_blocking=True)
    if isinstance(array, RowShards):
        gathered = _host_rows(shape, as_tensor(array[:0], name).dtype, device)
        array.take(rows.cpu().numpy(), out=gathered.numpy())
        return gathered.to(device, non_blocking=True)
    if isinstance(array, np.ndarray):
        rows_np = rows.cpu().numpy()
        order = np.argsort(rows_np, kind="stable")
        gathered = _host_rows(shape, as_tensor(array[:0], name).dtype, device)
        rows_read = _read_rows(array, rows_np[order]) if _backing_file(array) else array[rows_np[order]]
        gathered.numpy()[order] = rows_read
        return gathered.to(device, non_blocking=True)
    return as_tensor(array, name)[rows.to(as_tensor(array, name).device)].to(device)


def inputs_device(*arrays: ArrayLike) -> torch.device | None:
    """The GPU the first GPU-resident input lives on (a torch tensor, or a cupy
    array through its DLPack device), or None when every input is on the host:
    CUDA tensors on ``cuda:1`` make a fit run on ``cuda:1``, not the current device."""
    for array in arrays:
        if isinstance(array, Tensor):
            if array.is_cuda:
                return array.device
        elif hasattr(array, "__dlpack_device__"):
            kind, index = array.__dlpack_device__()
            if int(kind) in (2, 13):  # kDLCUDA, kDLCUDAManaged
                return torch.device("cuda", int(index))
    return None


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``device``, checked to be usable here, or CUDA when available (and built), else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() and ops.compiled_with_cuda() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device {device!r} is not a device: use 'cpu', 'cuda' or 'cuda:N'") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: CUDA is not available (torch {torch.__version__}, "
                             f"{torch.cuda.device_count()} GPU(s) visible)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: only {torch.cuda.device_count()} GPU(s) are visible")
        if ops.HAS_EXTENSION and not ops.compiled_with_cuda():
            raise ValueError(f"device {str(device)!r}: alphanet_ext was built without its CUDA kernels "
                             "(reinstall with ALPHANET_CUDA=1)")
    elif device.type != "cpu":
        raise ValueError(f"device {str(device)!r}: alphanet_ext runs on 'cpu' or 'cuda'")
    return device


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device``: free GPU memory (with what
    torch's allocator holds unused), or the host's ``MemAvailable`` (page cache
    included); None where unknown."""
    if device.type == "cuda":
        unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + unused
    try:
        with open("/proc/meminfo") as stream:
            for line in stream:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


_LIBC: list = []  # glibc, once looked up (an empty tuple inside where there is none)


def release_freed_host_memory() -> None:
    """Hands the pages the C allocator holds free back to the system (glibc's
    ``malloc_trim``); nothing elsewhere. Blocks of a few MB freed mid-heap stay the
    process's memory otherwise, and a later, larger temporary is mapped anew on top of
    them: several ranks sharing a host each pay that (benchmarks/RESULTS.md)."""
    if not _LIBC:
        import ctypes
        try:
            _LIBC.append(ctypes.CDLL("libc.so.6").malloc_trim)
        except (OSError, AttributeError):
            _LIBC.append(None)
    if _LIBC[0] is not None:
        _LIBC[0](0)


def cache_budget(device: torch.device) -> float:
    """Bytes that caches kept for a whole computation may take on ``device``:
    half of what is available (inf when unknown)."""
    available = available_memory(device)
    return math.inf if available is None else available / 2


def check_features(x: ArrayLike, name: str, dim: int | None = None) -> None:
    if not hasattr(x, "shape"):  # features are read in row chunks, as arrays
        raise TypeError(f"{name}: expected a torch tensor, numpy array or cupy array, got {type(x).__name__}")
    if len(x.shape) != 2:
        raise ValueError(f"{name} must be a 2-D array [samples, features], got shape {tuple(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} has {x.shape[1]} features but the classifier expects {dim}")
    dtype = as_tensor(x[:0], name).dtype
    if not dtype.is_floating_point:
        raise ValueError(f"{name} must hold floating-point features, got {dtype}")


def check_labels(y: ArrayLike, name: str, rows: int, num_classes: int, device: torch.device) -> Tensor:
    labels = as_tensor(y, name)
    if labels.dim() != 1 or labels.shape[0] != rows:
        raise ValueError(f"{name} must be 1-D with one label per sample ({rows}), got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"{name} must hold integer class ids, got {labels.dtype}")
    labels = labels.to(device=device, dtype=torch.long)
    if labels.numel():
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            raise ValueError(f"{name} has label {bad} outside the classifier's {num_classes} classes [0, {num_classes})")
    return labels


def check_classifier(weight: ArrayLike, bias: ArrayLike | None, device: torch.device) -> tuple[Tensor, Tensor]:
    w = as_tensor(weight, "weight")
    if w.dim() != 2 or not w.dtype.is_floating_point:
        raise ValueError(f"weight must be a floating-point [classes, features] matrix, got {w.dtype} {tuple(w.shape)}")
    if bias is None:
        b = torch.zeros(w.shape[0], dtype=w.dtype)
    else:
        b = as_tensor(bias, "bias")
        if b.shape != (w.shape[0],):
            raise ValueError(f"bias must have shape [{w.shape[0]}] to match weight, got {tuple(b.shape)}")
    w = w.to(device=device, dtype=torch.float32)
    b = b.to(device=device, dtype=torch.float32)
    for name, values in (("weight", w), ("bias", b)):
        if not all_finite(values):
            raise non_finite_error(f"the classifier's {name}", values.view(values.shape[0], -1), 0)
    return w, b


def non_finite_error(name: str, rows: Tensor, begin: int) -> ValueError:
    """Names the first NaN or inf of ``rows`` (a chunk starting at row ``begin``; known to hold one)."""
    bad = torch.nonzero(~torch.isfinite(rows))
    row, column = bad[0].tolist()
    where = f"row {begin + row}" + (f", column {column}" if rows.shape[1] > 1 else "")
    others = bad.shape[0] - 1
    return ValueError(f"{name} contains NaN or inf: {rows[row, column].item()} at {where}"
                      + (f" ({others} more values in rows {begin}..{begin + rows.shape[0] - 1})" if others else ""))


def all_finite(tensor: Tensor) -> bool:
    """True if no NaN or inf: one vectorised sum answers for nearly all data; only
    a non-finite sum (NaN/inf present, or an overflowing sum) pays for the exact test."""
    accumulate = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    return tensor.numel() == 0 or math.isfinite(float(tensor.sum(dtype=accumulate))) or \
        bool(torch.isfinite(tensor).all())


def logits(x: ArrayLike, weight: Tensor, name: str, device: torch.device, start: int = 0,
           stop: int | None = None) -> Tensor:
    """``x[start:stop] @ weight.T`` (no bias) in float32, computed chunk by chunk; checks the rows are finite."""
    rows = x[start:stop]
    out = torch.empty(num_rows(rows), weight.shape[0], dtype=torch.float32, device=device)
    for begin, chunk in iter_row_chunks(rows, name, device, chunk_rows=16384):
        chunk = chunk.float()
        if not all_finite(chunk):
            raise non_finite_error(name, chunk, start + begin)
        torch.mm(chunk, weight.T, out=out[begin:begin + chunk.shape[0]])
    return out
