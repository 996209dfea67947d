"""Hugging Face interop: the checkpoint key table, import, and export."""

from ouro_jax.hf.checkpoint import hf_tensors, key_table, load_hf
from ouro_jax.hf.export import export_checkpoint, export_hf
from ouro_jax.hf.safetensors_io import CheckpointError

__all__ = ["CheckpointError", "export_checkpoint", "export_hf", "hf_tensors", "key_table", "load_hf"]
