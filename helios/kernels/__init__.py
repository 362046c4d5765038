"""Triton kernels of helios (`helios.kernels`). They live inside the package, not in a top-level `kernels/`
folder: run from the repository root, that folder shadowed the PyPI package `kernels`, which transformers >= 5.25
imports.

Kernels live here; their dispatch and torch references live in `helios.ops`.
"""
