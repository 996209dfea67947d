"""Export of ouro_jax parameters to a Hugging Face directory that loads with current transformers.

    export_hf(out_dir, cfg, params)   ->  config.json, generation_config.json, model.safetensors
                                          (or model-0000i-of-0000n.safetensors + index), tokenizer files,
                                          configuration_ouro.py + modeling_ouro.py (our remote code)

`AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True)` then works. Tensors are written
one at a time (fetched from device memory just before they are written). The directory appears
atomically: everything is written into a hidden temporary directory beside the target and renamed into
place at the end, so a failed or interrupted export leaves no directory behind (and, with overwrite=True,
the previous export stays until the new one is complete). Only a hard kill (SIGKILL, power loss) can
leave a hidden `.NAME.tmp-*` directory beside the target, never a half-written target; the next export
to that target removes it. Export runs on one
host: every tensor must be fetchable from this process (params loaded without cross-host sharding).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import traverse_util

from ouro_jax.config import OuroConfig
from ouro_jax.errors import CheckpointError
from ouro_jax.hf.keys import INDEX_FILE, SINGLE_FILE, hf_tensors, key_table, param_shapes
from ouro_jax.hf.safetensors_io import write_safetensors

REMOTE_CODE_FILES = ("configuration_ouro.py", "modeling_ouro.py")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")
EXPORT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
DEFAULT_MAX_SHARD_SIZE = "5GB"
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
REMOTE_CODE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "remote_code")


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as '5GB', '500MB', '2GiB'."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        value = int(size)
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(size).upper())
        if not match:
            raise ValueError(f"cannot parse size {size!r}; use bytes or e.g. '5GB', '500MB', '2GiB'")
        value = int(float(match.group(1)) * _SIZE_UNITS[match.group(2) or "B"])
    if value < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    return value


def generation_config(cfg: OuroConfig, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """`generation_config.json`: the real special ids (generation stops on <|im_end|>)."""
    return {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
            **(overrides or {})}


class _LazyTensor:
    """Shape and dtype of an HF tensor known up front; its data fetched only when written."""

    def __init__(self, key: str, shape: tuple[int, ...], dtype: np.dtype, fetch: Callable[[], np.ndarray]):
        self.key, self.shape, self.dtype, self._fetch = key, shape, dtype, fetch

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self._fetch()
        if array.shape != self.shape or array.dtype != self.dtype:
            raise CheckpointError(f"{self.key}: got {array.shape} {array.dtype}, expected {self.shape} {self.dtype}")
        return array if dtype is None else array.astype(dtype)


def _lazy_tensors(cfg: OuroConfig, params: dict[str, Any], dtype: np.dtype) -> list[_LazyTensor]:
    """Every HF tensor of the checkpoint, in the released order, after checking params against the config."""
    got = {path: tuple(np.shape(leaf)) for path, leaf in traverse_util.flatten_dict(params).items()}
    want = param_shapes(cfg)
    problems = [f"missing {'/'.join(p)}" for p in sorted(set(want) - set(got))]
    problems += [f"unexpected {'/'.join(p)}" for p in sorted(set(got) - set(want))]
    problems += [f"{'/'.join(p)}: shape {got[p]}, expected {want[p]}" for p in sorted(set(got) & set(want))
                 if got[p] != want[p]]
    if problems:
        raise CheckpointError("params do not fit the config: " + "; ".join(problems))
    tensors = []
    for mapping, (key, fetch) in zip(key_table(cfg), hf_tensors(cfg, params, dtype), strict=True):
        ours = want[mapping.path][1:] if mapping.layer is not None else want[mapping.path]
        tensors.append(_LazyTensor(key, mapping.hf_shape(ours), dtype, fetch))
    return tensors


def _shards(tensors: Sequence[_LazyTensor], max_bytes: int) -> list[list[_LazyTensor]]:
    """Consecutive groups of at most max_bytes each (a larger single tensor gets a shard of its own)."""
    shards, size = [[]], 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def _tokenizer_sources(tokenizer: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Tokenizer files to copy: the known ones inside a directory, or the given files."""
    if isinstance(tokenizer, (str, os.PathLike)):
        path = os.fspath(tokenizer)
        if os.path.isdir(path):
            found = [os.path.join(path, n) for n in TOKENIZER_FILES if os.path.isfile(os.path.join(path, n))]
            if not found:
                raise FileNotFoundError(f"{path}: no tokenizer files (looked for {', '.join(TOKENIZER_FILES)})")
            return found
        tokenizer = [path]
    files = [os.fspath(p) for p in tokenizer]
    for path in files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path}")
    return files


def _fsync_tree(directory: str) -> None:
    for name in os.listdir(directory):
        with open(os.path.join(directory, name), "rb") as f:
            os.fsync(f.fileno())


def _write_export(tmp: str, cfg: OuroConfig, params: dict[str, Any], dtype_name: str, max_bytes: int,
                  tokenizer_files: list[str], generation: dict[str, Any] | None) -> None:
    tensors = _lazy_tensors(cfg, params, EXPORT_DTYPES[dtype_name])
    metadata = {"format": "pt"}  # transformers expects this tag on safetensors files
    shards = _shards(tensors, max_bytes)
    if len(shards) == 1:
        write_safetensors(os.path.join(tmp, SINGLE_FILE), [(t.key, t) for t in tensors], metadata)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(os.path.join(tmp, name), [(t.key, t) for t in shard], metadata)
            weight_map.update({t.key: name for t in shard})
        _write_json(os.path.join(tmp, INDEX_FILE),
                    {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map})
    _write_json(os.path.join(tmp, "config.json"), cfg.to_hf_config(dtype_name))
    _write_json(os.path.join(tmp, "generation_config.json"), generation_config(cfg, generation))
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(os.path.join(REMOTE_CODE_DIR, name), os.path.join(tmp, name))
    for path in tokenizer_files:
        shutil.copyfile(path, os.path.join(tmp, os.path.basename(path)))
    _fsync_tree(tmp)


def _publish(tmp: str, out_dir: str) -> None:
    """Renames the finished temporary directory to out_dir, replacing an existing one only at the end."""
    old = None
    if os.path.lexists(out_dir):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=os.path.dirname(out_dir))
        os.rmdir(old)
        os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.rename(old, out_dir)
        raise
    if old is not None:
        if os.path.islink(old):
            os.unlink(old)
        else:
            shutil.rmtree(old, ignore_errors=True)


def remove_leftovers(out_dir: str) -> list[str]:
    """Removes the hidden `.NAME.tmp-*` / `.NAME.old-*` directories that a killed export of out_dir left."""
    parent, name = os.path.dirname(out_dir), os.path.basename(out_dir)
    found = sorted(os.path.join(parent, d) for d in os.listdir(parent)
                   if d.startswith((f".{name}.tmp-", f".{name}.old-")))
    for path in found:
        print(f"removing {path}: left by an interrupted export", flush=True)
        shutil.rmtree(path, ignore_errors=True)
    return found


def has_tokenizer(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds tokenizer files that an export would carry."""
    return any(os.path.isfile(os.path.join(directory, name)) for name in TOKENIZER_FILES)


def export_hf(out_dir: str | os.PathLike, cfg: OuroConfig, params: dict[str, Any], *, dtype: str | None = None,
              max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
              tokenizer: str | os.PathLike | Iterable[str | os.PathLike] | None = None,
              generation: dict[str, Any] | None = None, overwrite: bool = False) -> str:
    """Writes params (on device or host) as an HF Ouro directory.

    dtype: 'float32' or 'bfloat16' (default: bfloat16 when every parameter is bfloat16, else float32).
    max_shard_size: bytes or e.g. '5GB'; above it the weights are split into shards with an index.
    tokenizer: a directory (its tokenizer files are copied) or a list of files.
    generation: extra `generation_config.json` fields. An existing non-empty out_dir is refused unless
    overwrite=True. Returns the absolute path of out_dir.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    stored_bf16 = all(np.dtype(leaf.dtype) == EXPORT_DTYPES["bfloat16"] for leaf in jax.tree.leaves(params))
    dtype_name = dtype or ("bfloat16" if stored_bf16 else "float32")
    if dtype_name not in EXPORT_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(EXPORT_DTYPES)}, got {dtype!r}")
    max_bytes = parse_size(max_shard_size)
    if os.path.lexists(out_dir):
        if not os.path.isdir(out_dir):
            raise FileExistsError(f"{out_dir} exists and is not a directory")
        if os.listdir(out_dir) and not overwrite:
            raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tokenizer_files = _tokenizer_sources(tokenizer) if tokenizer is not None else []
    remove_leftovers(out_dir)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        _write_export(tmp, cfg, params, dtype_name, max_bytes, tokenizer_files, generation)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; an export is an ordinary directory
        _publish(tmp, out_dir)
    except BaseException:  # KeyboardInterrupt too: leave nothing behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
