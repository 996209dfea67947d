"""Memory-mapped reading and streaming writing of `.safetensors` files, bfloat16 included.

The format: an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}}, then the raw little-endian tensor bytes. Reading maps a local file and returns views,
so a checkpoint is never copied whole into host memory; a file on an object store is read into memory once.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable

import ml_dtypes
import numpy as np

from ouro_jax.errors import CheckpointError
from ouro_jax.paths import as_path, is_local

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_HEADER = 100 * 2**20


class SafetensorsFile:
    """Read-only view of one `.safetensors` file; `get(name)` returns a memory-mapped array."""

    def __init__(self, path: str | os.PathLike):
        self.path = as_path(path)
        size = self.path.stat().length
        with self.path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: corrupt safetensors file (shorter than its 8-byte header length)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(size - 8, _MAX_HEADER):
                raise CheckpointError(f"{self.path}: corrupt safetensors file (header length {header_len} "
                                      f"exceeds the file size {size})")
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        data_size = size - self._data_start
        self._entries = {}
        for name, entry in header.items():
            try:
                dtype, shape, (begin, end) = DTYPES[entry["dtype"]], tuple(entry["shape"]), entry["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(
                    f"{self.path}: corrupt or unsupported header entry for {name!r}: {entry}") from None
            if not 0 <= begin <= end <= data_size or end - begin != int(np.prod(shape)) * dtype.itemsize:
                raise CheckpointError(f"{self.path}: tensor {name!r} lies outside the file or has the wrong byte size "
                                      f"(offsets {begin}..{end}, shape {shape}, {entry['dtype']}; "
                                      f"data has {data_size} bytes)")
            self._entries[name] = (dtype, shape, begin, end)
        if not size:
            self._map = None
        elif is_local(self.path):
            self._map = np.memmap(os.fspath(self.path), dtype=np.uint8, mode="r")
        else:
            self._map = np.frombuffer(self.path.read_bytes(), np.uint8)

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def get(self, name: str) -> np.ndarray:
        dtype, shape, begin, end = self._entries[name]
        start = self._data_start
        return self._map[start + begin:start + end].view(dtype).reshape(shape)


def write_safetensors(path: str | os.PathLike, tensors: Iterable[tuple[str, np.ndarray]],
                      metadata: dict[str, str] | None = None) -> None:
    """Writes (name, array) pairs, one tensor at a time. The arrays may come from a generator,
    but their shapes and dtypes are needed up front, so pass a list of lazily-sliced views."""
    tensors = list(tensors)
    header, offset = {}, 0
    for name, array in tensors:
        dtype = np.dtype(array.dtype)
        if dtype not in _NAMES:
            raise CheckpointError(f"cannot write tensor {name!r} of dtype {dtype} to safetensors")
        nbytes = int(np.prod(array.shape)) * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": list(array.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    try:
        with as_path(path).open("wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for _, array in tensors:
                f.write(np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
    except OSError as e:  # a full disk: name the file
        raise OSError(e.errno, e.strerror or str(e), os.fspath(path)) from None
