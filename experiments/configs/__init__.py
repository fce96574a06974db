"""Experiment configs: ``get_config(arg)`` modules for ``experiments.main``.

Every config parses its ``arg`` (comma-separated variants) with
:func:`parse_variants`.
"""

from experiments.configs._variants import parse_variants

__all__ = ("parse_variants",)
