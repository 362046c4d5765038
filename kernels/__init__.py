"""Triton kernels of helios, installed as `helios.kernels` (the PyPI name `kernels` belongs to another project).

Kernels live here; their dispatch and torch references live in `helios.ops`.
"""
