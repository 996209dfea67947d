"""Hugging Face interop: the key table, import of HF Ouro directories, export with our remote code."""

from ouro_jax.hf.export import export_hf
from ouro_jax.hf.keys import hf_tensors, key_table
from ouro_jax.hf.load import load_hf

__all__ = ["export_hf", "hf_tensors", "key_table", "load_hf"]
