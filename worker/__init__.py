"""The mlx-gateway worker: one process that runs mlx-lm and speaks JSON-RPC on stdio."""
