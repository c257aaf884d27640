"""mlx-gateway: an OpenAI-compatible HTTP gateway in front of supervised mlx-lm workers."""

__version__ = "0.1.0"
