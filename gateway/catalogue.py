"""The catalogue: every model this gateway could serve, whether loaded or not.

Sources, scanned in order (the first of two models with one name wins):
  * each `--models-dir`: a child directory holding config.json is a model named
    after the directory; a child directory without one is looked into once
    more, so an `owner/name` layout gives ids such as `mlx-community/Qwen3-0.6B`;
    a file whose suffix `checkpoints.FILE_SUFFIXES` accepts (`.gguf`, where the
    resolver converts it) is a model named after the file without its suffix;
  * with `--models-hf-cache`, the Hugging Face hub cache: each downloaded
    repository with a config.json, named `owner/name`.

An entry's `source` is what `checkpoints.resolve` turns into a ModelSpec, the
same path a `--model` argument takes, so a catalogued file is converted (and
cached) exactly as it would be when named on the command line. Scanning only
lists directories and stats files; nothing is read or converted until a
model is loaded.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import checkpoints, weights

log = logging.getLogger("gateway.catalogue")


@dataclass(frozen=True)
class Entry:
    name: str  # the id clients send
    source: str  # handed to checkpoints.resolve at load time
    size_bytes: int  # on disk
    format: str  # "mlx" (a model directory) or the file suffix without its dot
    # Its quantized layers, which a worker on the CPU widens (weights.py).
    quantized: weights.Quantized = field(default_factory=weights.Quantized)


def size_on_disk(path: Path) -> int:
    """Bytes of the files under `path` (links followed, as the hub cache links blobs)."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _dirs, files in os.walk(path, followlinks=True):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total


def _is_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def _is_model_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in checkpoints.FILE_SUFFIXES


def _entry(name: str, path: Path) -> Entry:
    kind = "mlx" if path.is_dir() else path.suffix.lower().lstrip(".")
    size = size_on_disk(path)
    try:
        modified = path.stat().st_mtime_ns
    except OSError:
        modified = 0
    quantized = _quantized(str(path.resolve()), modified, size)
    return Entry(name, str(path.resolve()), size, kind, quantized)


def quantized_layers(path: Path) -> weights.Quantized:
    """What of a model directory or file a worker may widen (weights.py)."""
    if path.is_dir():
        return weights.quantized_layers(path)
    if path.suffix.lower() == ".gguf":
        return weights.gguf_quantized_layers(path)
    return weights.Quantized()


@functools.lru_cache(maxsize=4096)
def _quantized(path: str, modified: int, size: int) -> weights.Quantized:
    """quantized_layers, read again only for a model that changed: the
    catalogue is scanned every few seconds, and a GGUF file's header takes
    about 90 ms to walk."""
    return quantized_layers(Path(path))


def scan_dir(root: Path) -> list[Entry]:
    """The models under one --models-dir, sorted by name."""
    found: list[Entry] = []
    try:
        children = sorted(root.iterdir())
    except OSError as exc:
        log.warning("cannot list models dir %s: %s", root, exc)
        return found
    for child in children:
        if child.name.startswith("."):
            continue
        if _is_model_dir(child):
            found.append(_entry(child.name, child))
        elif _is_model_file(child):
            found.append(_entry(child.stem, child))
        elif child.is_dir():
            try:
                grandchildren = sorted(child.iterdir())
            except OSError:
                continue
            for inner in grandchildren:
                if _is_model_dir(inner):
                    found.append(_entry(f"{child.name}/{inner.name}", inner))
                elif _is_model_file(inner):
                    found.append(_entry(f"{child.name}/{inner.stem}", inner))
    return found


def hf_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def scan_hf_cache(root: Path) -> list[Entry]:
    """Repositories in a Hugging Face hub cache: models--owner--name/snapshots/REV."""
    found: list[Entry] = []
    try:
        repos = sorted(p for p in root.iterdir() if p.name.startswith("models--"))
    except OSError:
        return found
    for repo in repos:
        parts = repo.name.split("--")[1:]
        if len(parts) != 2:
            continue
        snapshot = _hf_snapshot(repo)
        if snapshot is not None and _is_model_dir(snapshot):
            found.append(_entry("/".join(parts), snapshot))
    return found


def _hf_snapshot(repo: Path) -> Path | None:
    """The snapshot `refs/main` names, else the newest one."""
    ref = repo / "refs" / "main"
    if ref.is_file():
        snapshot = repo / "snapshots" / ref.read_text(encoding="utf-8").strip()
        if snapshot.is_dir():
            return snapshot
    try:
        snapshots = [p for p in (repo / "snapshots").iterdir() if p.is_dir()]
    except OSError:
        return None
    return max(snapshots, key=lambda p: p.stat().st_mtime, default=None)


def scan(dirs: list[str], hf_cache: bool = False) -> dict[str, Entry]:
    """Every servable model by name. Blocking (it lists directories): call it
    from a thread when on the event loop."""
    entries: dict[str, Entry] = {}
    sources = [scan_dir(Path(d).expanduser()) for d in dirs]
    if hf_cache:
        sources.append(scan_hf_cache(hf_cache_dir()))
    for found in sources:
        for entry in found:
            if entry.name in entries:
                if entries[entry.name].source != entry.source:
                    log.warning(
                        "two models are named %s: serving %s, not %s",
                        entry.name,
                        entries[entry.name].source,
                        entry.source,
                    )
                continue
            entries[entry.name] = entry
    return entries
