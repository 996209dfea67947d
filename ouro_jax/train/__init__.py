"""Training: the run config (config), the jitted step (step), checkpoints (checkpointer), the loop (loop), the CLI."""
