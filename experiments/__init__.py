"""Binaries, configs, train/eval loops, data, checkpointing and metrics."""
