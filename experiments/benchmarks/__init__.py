"""Micro-benchmarks of solver steps (``python -m experiments.benchmarks.X``)."""
