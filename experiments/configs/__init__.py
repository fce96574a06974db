"""Experiment configs: ``get_config(arg)`` modules for ``experiments.main``."""
