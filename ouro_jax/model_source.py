"""Where a model comes from: the one resolver every tool uses (`resolve_model`).

A model spec is any of
- an HF Ouro directory (`config.json` + safetensors), local or `gs://`;
- an ouro_jax params checkpoint (`ouro_config.json` + `params/`), local or `gs://`;
- a training workdir (its newest finalized step under `checkpoints/`; else its exported `params/`);
- one step of a training run, `WORKDIR/checkpoints/STEP`;
- a Hugging Face hub id (`org/name`), fetched with huggingface_hub into its cache (offline,
  `HF_HUB_OFFLINE=1`, only a cached id resolves).

Anything else raises CheckpointError with one line naming what was looked for.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import huggingface_hub
import orbax.checkpoint as ocp
from huggingface_hub import constants as hub_constants

from ouro_jax.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from ouro_jax.errors import CheckpointError
from ouro_jax.paths import Path, PathLike, as_path, is_local

CONFIG_FILE = "ouro_config.json"   # a params checkpoint of ours
PARAMS_DIR = "params"
HF_CONFIG_FILE = "config.json"     # an HF directory; in a training workdir, the training config
CHECKPOINTS_DIR = "checkpoints"
STATE_ITEM = "state"               # the TrainState item of a training step
HUB_FILES = ["*.json", "*.safetensors", "*.py", "*.txt", "*.jinja", "*.model"]  # what a hub fetch downloads
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

KINDS = ("hf", "params", "train_step")


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A resolved model: `kind` (one of KINDS), the directory holding it, and for a training step the
    workdir (whose config.json holds the model fields) and the step number."""

    spec: str
    kind: str
    path: Path
    workdir: Path | None = None
    step: int | None = None

    @property
    def tokenizer_dir(self) -> Path | None:
        """The directory whose tokenizer files belong to this model, if it has any."""
        return self.path if self.kind != "train_step" and (self.path / "tokenizer.json").is_file() else None

    def describe(self) -> str:
        return f"{self.workdir} step {self.step}" if self.kind == "train_step" else os.fspath(self.path)


def training_steps(checkpoints: PathLike) -> list[int]:
    """The finalized steps of an orbax checkpoint directory, ascending (STEP.unrestorable left out)."""
    try:
        return sorted(ocp.path.step.checkpoint_steps(as_path(checkpoints)))
    except ValueError:  # a directory name orbax cannot parse
        return sorted(int(p.name) for p in as_path(checkpoints).iterdir() if p.name.isdigit())


def _step_dir_source(spec: str, path: Path) -> ModelSource | None:
    if not (path.name.isdigit() and path.parent.name == CHECKPOINTS_DIR and (path / STATE_ITEM).is_dir()):
        return None
    if int(path.name) not in training_steps(path.parent):
        raise CheckpointError(f"{path}: step {path.name} was never finalized (an interrupted save)")
    return ModelSource(spec, "train_step", path, workdir=path.parent.parent, step=int(path.name))


def _workdir_source(spec: str, path: Path) -> ModelSource | None:
    checkpoints = path / CHECKPOINTS_DIR
    if not checkpoints.is_dir():
        return None
    steps = training_steps(checkpoints)
    if steps:
        return ModelSource(spec, "train_step", checkpoints / str(steps[-1]), workdir=path, step=steps[-1])
    if (path / PARAMS_DIR / CONFIG_FILE).exists():
        return ModelSource(spec, "params", path / PARAMS_DIR)
    raise CheckpointError(f"{path}: a training workdir without a finalized step in {checkpoints} or an exported "
                          f"{PARAMS_DIR}/ (did the run save a checkpoint yet?)")


def _local_source(spec: str, path: Path) -> ModelSource:
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected an HF Ouro directory, an ouro_jax params "
                              "checkpoint or a training workdir)")
    if (path / CONFIG_FILE).exists():
        return ModelSource(spec, "params", path)
    found = _step_dir_source(spec, path) or _workdir_source(spec, path)
    if found is not None:
        return found
    if (path / HF_CONFIG_FILE).exists():
        return ModelSource(spec, "hf", path)
    raise CheckpointError(f"{path}: neither an HF Ouro directory ({HF_CONFIG_FILE}), an ouro_jax params checkpoint "
                          f"({CONFIG_FILE}), a training workdir ({CHECKPOINTS_DIR}/) nor one of its steps")


def _hub_source(spec: str) -> ModelSource:
    offline = hub_constants.HF_HUB_OFFLINE
    try:
        directory = huggingface_hub.snapshot_download(spec, allow_patterns=HUB_FILES, etag_timeout=10)
    except Exception as e:  # noqa: BLE001 -- offline, unknown repo, auth, network: all end in one line
        if offline:
            raise CheckpointError(f"{spec}: no such directory, and not in the Hugging Face cache "
                                  f"({hub_constants.HF_HUB_CACHE}) while offline (HF_HUB_OFFLINE=1)") from None
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{spec}: no such directory, and the hub download failed ({reason})") from None
    return _local_source(spec, as_path(directory))


def resolve_model(spec: str | os.PathLike) -> ModelSource:
    """The ModelSource of a local or `gs://` path or a hub id (see the module docstring)."""
    text = os.fspath(spec)
    path = as_path(text)
    if path.exists():
        return _local_source(text, path)
    if is_local(text) and _HUB_ID.fullmatch(text) and not text.startswith("."):
        return _hub_source(text)
    raise CheckpointError(f"{text}: no such directory")


def model_tokenizer(source: ModelSource, spec: str | os.PathLike | None = None) -> ByteTokenizer | HFTokenizer:
    """The tokenizer a tool uses with `source`: `spec` ('byte', a tokenizer.json or a directory holding one)
    when given, else the model's own tokenizer files, else the byte tokenizer."""
    return load_tokenizer(spec if spec is not None else source.tokenizer_dir or "byte")


def training_model_fields(workdir: PathLike) -> dict:
    """The `model` and `execution` sections of a training workdir's config.json."""
    path = as_path(workdir) / HF_CONFIG_FILE
    try:
        config = json.loads(path.read_text())
        return {"model": dict(config["model"]), "execution": dict(config.get("execution") or {})}
    except FileNotFoundError:
        raise CheckpointError(f"{workdir}: no {HF_CONFIG_FILE}; the training config of this run is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: not the training config of an ouro_jax run ({e})") from None
