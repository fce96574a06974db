"""jraph-based graph parts: learnable communication graphs and GNNs.

jraph is used only through this package (two of its helpers call the removed
``jax.tree_map``; we never call them).
"""
