"""Pallas kernels for biroute's hot paths.

Each ``kernels/<op>.py`` holds the Pallas body, the public op (``custom_vjp``
where it is differentiated, shape checks, tile sizes in a frozen dataclass)
and ``<op>_reference`` in plain ``jnp``. Kernels depend on nothing of ours.
"""
