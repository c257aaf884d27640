"""Turning a `--model` argument into a local checkpoint directory.

Accepted forms: nothing or `demo[:preset]` (the built-in demo model), a local
MLX model directory, or a Hugging Face id such as `mlx-community/Qwen3-0.6B-4bit`.
Any of them may be prefixed with `NAME=` to choose the id clients send.
Downloads happen here, once, before any worker starts.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

from worker import demo

from .config import ModelSpec

HF_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
HF_PATTERNS = [
    "*.json",
    "model*.safetensors",
    "*.py",
    "tokenizer.model",
    "*.tiktoken",
    "tiktoken.model",
    "*.txt",
    "*.jsonl",
    "*.jinja",
]


# Suffixes of single-file checkpoints that resolve() accepts (and converts);
# the catalogue offers such files from --models-dir. None yet: a model is a
# directory.
FILE_SUFFIXES: frozenset[str] = frozenset()


class ModelSourceError(Exception):
    pass


def resolve(arg: str | None, python: str = sys.executable) -> ModelSpec:
    arg = (arg or "demo").strip()
    name = None
    if "=" in arg and not arg.startswith(("/", ".")):
        name, arg = arg.split("=", 1)
    if arg == "demo" or arg.startswith("demo:"):
        preset = arg.partition(":")[2] or "small"
        if preset not in demo.PRESETS:
            raise ModelSourceError(
                f"unknown demo preset {preset!r}; choose from {sorted(demo.PRESETS)}"
            )
        return ModelSpec(name or demo.DEMO_MODEL_NAME, build_demo(preset, python))
    path = Path(arg).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelSourceError(
                f"{path} has no config.json, so it is not an MLX model directory"
            )
        return ModelSpec(name or path.name, str(path.resolve()))
    if path.exists():
        raise ModelSourceError(f"{path} is a file; --model needs a model directory")
    if HF_ID.match(arg) and not arg.startswith((".", "~")):
        return ModelSpec(name or arg, download(arg))
    raise ModelSourceError(
        f"--model {arg!r} is neither an existing directory nor a Hugging Face id (owner/name)"
    )


def build_demo(preset: str, python: str = sys.executable) -> str:
    """The cached demo checkpoint, built on first use in a child process of
    the workers' interpreter, so the gateway itself never loads MLX (and
    stays small)."""
    cached = demo.cached(preset)
    if cached is not None:
        return str(cached)
    logging.getLogger("gateway").info("building the %s demo model (once; it is cached)", preset)
    out = subprocess.run(
        [python, "-m", "worker.demo", "--preset", preset],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise ModelSourceError(f"building the demo model failed:\n{out.stderr[-2000:]}")
    return out.stdout.strip().splitlines()[-1]


def download(repo_id: str) -> str:
    """Fetch a checkpoint from the Hugging Face Hub (or its local cache)."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo_id, allow_patterns=HF_PATTERNS)
    except Exception as exc:
        raise ModelSourceError(
            f"could not fetch {repo_id!r} from the Hugging Face Hub "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            "Check the network and the id, or pass a local model directory with --model PATH."
        ) from None
    if not (Path(path) / "config.json").exists():
        raise ModelSourceError(f"{repo_id!r} has no config.json; it is not an MLX model repository")
    return path
