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
to that target removes it. On object stores (`gs://`), where a rename is a copy, `config.json` is written,
copied and moved last (`paths.move_tree`): a directory without it is an incomplete export. Export runs on one
host: every tensor must be fetchable from this process (params loaded without cross-host sharding).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import traverse_util

from ouro_jax.config import OuroConfig
from ouro_jax.errors import CheckpointError
from ouro_jax.hf.keys import CHECKSUMS_FILE, INDEX_FILE, SINGLE_FILE, hf_tensors, key_table, param_shapes
from ouro_jax.hf.safetensors_io import write_safetensors
from ouro_jax.paths import (
    Path,
    as_path,
    check_bucket,
    check_output,
    is_local,
    make_temp_dir,
    remove_leftovers,
    replace_tree,
    sha256_file,
)

REMOTE_CODE_FILES = ("configuration_ouro.py", "modeling_ouro.py")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")
EXPORT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
DEFAULT_MAX_SHARD_SIZE = "5GB"
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
REMOTE_CODE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "remote_code")
COMMIT_FILE = "config.json"  # written last and moved last: an export directory without it is incomplete


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


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _tokenizer_sources(tokenizer: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Tokenizer files to copy: the known ones inside a directory, or the given files."""
    if isinstance(tokenizer, (str, os.PathLike)):
        path = as_path(tokenizer)
        if path.is_dir():
            found = [path / n for n in TOKENIZER_FILES if (path / n).is_file()]
            if not found:
                raise FileNotFoundError(f"{path}: no tokenizer files (looked for {', '.join(TOKENIZER_FILES)})")
            return found
        tokenizer = [path]
    files = [as_path(p) for p in tokenizer]
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
    return files


def _fsync_tree(directory: Path) -> None:
    if is_local(directory):
        for path in directory.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _write_export(tmp: Path, cfg: OuroConfig, params: dict[str, Any], dtype_name: str, max_bytes: int,
                  tokenizer_files: list[Path], generation: dict[str, Any] | None) -> None:
    tensors = _lazy_tensors(cfg, params, EXPORT_DTYPES[dtype_name])
    metadata = {"format": "pt"}  # transformers expects this tag on safetensors files
    shards = _shards(tensors, max_bytes)
    if len(shards) == 1:
        write_safetensors(tmp / SINGLE_FILE, [(t.key, t) for t in tensors], metadata)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(tmp / name, [(t.key, t) for t in shard], metadata)
            weight_map.update({t.key: name for t in shard})
        _write_json(tmp / INDEX_FILE,
                    {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map})
    _write_json(tmp / CHECKSUMS_FILE, {p.name: sha256_file(p) for p in sorted(tmp.glob("*.safetensors"))})
    _write_json(tmp / "generation_config.json", generation_config(cfg, generation))
    for name in REMOTE_CODE_FILES:
        (tmp / name).write_bytes((as_path(REMOTE_CODE_DIR) / name).read_bytes())
    for path in tokenizer_files:
        (tmp / path.name).write_bytes(path.read_bytes())
    _write_json(tmp / COMMIT_FILE, cfg.to_hf_config(dtype_name))  # last: what marks the export complete
    _fsync_tree(tmp)


def has_tokenizer(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds tokenizer files that an export would carry."""
    directory = as_path(directory)
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


def export_hf(out_dir: str | os.PathLike, cfg: OuroConfig, params: dict[str, Any], *, dtype: str | None = None,
              max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
              tokenizer: str | os.PathLike | Iterable[str | os.PathLike] | None = None,
              generation: dict[str, Any] | None = None, overwrite: bool = False,
              sources: tuple[str | os.PathLike, ...] = ()) -> str:
    """Writes params (on device or host) as an HF Ouro directory.

    dtype: 'float32' or 'bfloat16' (default: bfloat16 when every parameter is bfloat16, else float32).
    max_shard_size: bytes or e.g. '5GB'; above it the weights are split into shards with an index.
    tokenizer: a directory (its tokenizer files are copied) or a list of files.
    generation: extra `generation_config.json` fields. `paths.check_output` decides what out_dir may be
    (an earlier export is replaced only with overwrite=True; never one of `sources`, the data it was read
    from). Returns the absolute path (or URI) of out_dir.
    """
    out_dir = as_path(out_dir)
    check_bucket(out_dir)
    stored_bf16 = all(np.dtype(leaf.dtype) == EXPORT_DTYPES["bfloat16"] for leaf in jax.tree.leaves(params))
    dtype_name = dtype or ("bfloat16" if stored_bf16 else "float32")
    if dtype_name not in EXPORT_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(EXPORT_DTYPES)}, got {dtype!r}")
    max_bytes = parse_size(max_shard_size)
    check_output(out_dir, kind="an HF export", marker=COMMIT_FILE, sources=sources, overwrite=overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tokenizer_files = _tokenizer_sources(tokenizer) if tokenizer is not None else []
    remove_leftovers(out_dir, COMMIT_FILE, "export")
    tmp = make_temp_dir(out_dir.parent, f".{out_dir.name}.tmp-")
    try:
        _write_export(tmp, cfg, params, dtype_name, max_bytes, tokenizer_files, generation)
        if is_local(tmp):
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; an export is an ordinary directory
        replace_tree(tmp, out_dir, COMMIT_FILE)
    except BaseException:  # KeyboardInterrupt too: leave nothing behind
        tmp.rmtree(missing_ok=True)
        raise
    return os.fspath(out_dir)
