"""The mlx-gateway worker: one process that runs mlx-lm and speaks JSON-RPC on stdio."""

from . import cpublas

# Before anything imports mlx (cpublas.py says why).
cpublas.preload()
