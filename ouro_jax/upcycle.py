"""Upcycling (SPEC 6): an N-layer checkpoint becomes a k*N-layer one by repeating the whole stack.

The released Ouro-2.6B (48 layers) was upcycled from the 24-layer model after stage 1a; the
mapping is unspecified, and repeating the stack [1..N, 1..N] is the natural choice. Everything
else (embedding, final norm, exit gate, head) is kept as it is.

    ouro-upcycle SRC DST [--repeats 2]     # SRC: ours or an HF directory; DST: ours
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ouro_jax import validate
from ouro_jax.config import OuroConfig
from ouro_jax.params_io import CONFIG_FILE, load_model, save_params
from ouro_jax.paths import check_output


def upcycle_params(cfg: OuroConfig, params: dict[str, Any], repeats: int = 2) -> tuple[OuroConfig, dict[str, Any]]:
    """(config, params) with the layer stack repeated `repeats` times: layer i of the result is
    layer i mod N of the source."""
    repeats = validate.positive("repeats", repeats)
    layers = params["decoder"]["layers"]
    repeated = {k: v for k, v in params.items() if k != "decoder"}
    repeated["decoder"] = {"layers": jax.tree.map(lambda x: jnp.concatenate([x] * repeats, axis=0), layers)}
    return cfg.replace(num_hidden_layers=cfg.num_hidden_layers * repeats), repeated


def upcycle_checkpoint(source: str, destination: str, repeats: int = 2, *, overwrite: bool = False) -> OuroConfig:
    """Reads a checkpoint (ours or HF), writes the upcycled params checkpoint; returns its config.
    An existing params checkpoint at `destination` is refused unless `overwrite`."""
    check_output(destination, kind="a params checkpoint", marker=CONFIG_FILE, sources=(source,), overwrite=overwrite)
    cfg, params = load_model(source)
    cfg, params = upcycle_params(cfg, params, repeats)
    save_params(destination, cfg, params)
    return cfg
