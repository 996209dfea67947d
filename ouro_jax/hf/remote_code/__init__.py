"""The PyTorch files written into every HF export (`trust_remote_code`); ouro_jax never imports them."""
