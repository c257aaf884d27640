"""The prompt cache on disk: hot prefixes that outlive the worker.

With `--prompt-cache-dir`, every KV cache the engine keeps in its in-memory
prompt cache is also offered to this store. A writer thread saves it as a
safetensors file (mlx-lm's prompt-cache format, through worker/mlxlm.py), so
the engine thread never waits on the disk: `offer` only appends to a bounded
queue and drops the oldest waiting entry when the queue is full. A worker
that starts (after a crash, or beside another) reads the newest entries back
before it reports ready, so the turn after a restart costs a warm turn.

Layout: ROOT/<model fingerprint>/<partition digest>/<tokens digest>-<content
digest>.safetensors. The fingerprint ties entries to the exact checkpoint
(its files' names, sizes and modification times, and the mlx-lm release);
the partition is the request's `cache_key`, so entries of different API keys
never mix; the content digest (BLAKE2b of the whole file) makes a corrupt or
truncated file detectable, and such a file is skipped with a warning and
removed. Files are written under a temporary name and renamed, so readers
(other workers sharing the directory) never see half a file. The whole
directory, every model's entries together, is kept under a byte budget by
removing the least recently written files first.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from .mlxlm import can_trim_prompt_cache, load_prompt_cache, mlx_lm_version, save_prompt_cache

log = logging.getLogger("worker.diskcache")

FORMAT = "mlx-gateway-prompt-cache-1"
SUFFIX = ".safetensors"
TEMP_SUFFIX = ".tmp"
DEFAULT_DISK_BYTES = 4 << 30
DEFAULT_QUEUE_SIZE = 8
# Prompts shorter than this are not worth a file (the engine does not reuse
# them from memory either).
MIN_TOKENS = 32


def model_fingerprint(path: str | Path, *, kv_format: str | None = None) -> str | None:
    """A digest naming one exact checkpoint, or None when `path` is no local
    file or directory. Sizes and modification times, not contents: computed
    in microseconds at every load, and a copied or rewritten checkpoint only
    costs a cold cache, never a wrong one... unless a file is rewritten in
    place with the same size within the clock's resolution."""
    root = Path(path)
    if not root.exists():
        return None
    digest = hashlib.sha256(f"{FORMAT}\0{mlx_lm_version()}".encode())
    if kv_format is not None:
        # Quantized KV (--kv-bits) entries never mix with another format's.
        digest.update(f"\0kv\0{kv_format}".encode())
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for file in files:
        stat = file.stat()
        name = file.name if root.is_file() else file.relative_to(root).as_posix()
        digest.update(f"\0{name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:32]


def partition_name(cache_key: str) -> str:
    """The directory of one prompt-cache partition (the key may be any text)."""
    return hashlib.sha256(cache_key.encode()).hexdigest()[:32]


def tokens_digest(tokens: list[int]) -> str:
    return hashlib.blake2b(_pack(tokens), digest_size=12).hexdigest()


def _pack(tokens: list[int]) -> bytes:
    return struct.pack(f"<{len(tokens)}I", *tokens)


def _file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=12)).hexdigest()


@dataclass
class Entry:
    cache_key: str
    tokens: list[int]
    cache: list[Any]
    nbytes: int = 0


@dataclass
class _Stats:
    loaded: int = 0  # entries read back at start-up
    written: int = 0
    skipped: int = 0  # corrupt, truncated or foreign files passed over
    dropped: int = 0  # offered while the queue was full, or too large
    failed: int = 0  # writes that raised (a full disk, a read-only directory)


class DiskPromptCache:
    """One worker's view of a prompt-cache directory, for one model."""

    def __init__(
        self,
        root: str | Path,
        fingerprint: str,
        *,
        max_bytes: int = DEFAULT_DISK_BYTES,
        queue_size: int = DEFAULT_QUEUE_SIZE,
    ):
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.dir = self.root / fingerprint
        self.max_bytes = max_bytes
        self.queue_size = queue_size
        self._queue: deque[Entry] = deque()
        self._cond = threading.Condition()
        self._busy = False
        self._closed = False
        self._thread: threading.Thread | None = None
        # What this worker knows is on disk: tokens of each file by partition,
        # so a longer prompt of the same conversation can replace its prefix.
        self._known: dict[str, dict[str, tuple[list[int], Path]]] = {}
        self.stats = _Stats()

    # --- the engine thread ---------------------------------------------------

    def load(self, *, max_bytes: int, max_entries: int) -> list[Entry]:
        """The newest entries that fit in memory, oldest first (the order to
        insert them in an LRU). Reads files: call before serving."""
        files = sorted(self._files(self.dir), key=_mtime, reverse=True)
        entries: list[Entry] = []
        total = 0
        for path in files:
            if len(entries) >= max_entries or total >= max_bytes:
                break
            entry = self._read(path)
            if entry is None or total + entry.nbytes > max_bytes:
                continue
            entries.append(entry)
            total += entry.nbytes
            self._remember(entry.cache_key, entry.tokens, path)
        self.stats.loaded = len(entries)
        return entries[::-1]

    def offer(self, cache_key: str, tokens: list[int], cache: list[Any]) -> None:
        """Queue a cache for writing; never blocks, never touches the disk.

        The arrays are evaluated here, on the thread that owns MLX, so the
        writer only copies finished buffers to the file.
        """
        if len(tokens) < MIN_TOKENS or self._closed:
            return
        nbytes = sum(c.nbytes for c in cache)
        if nbytes > self.max_bytes:
            self.stats.dropped += 1
            return
        mx.eval([c.state for c in cache])
        entry = Entry(cache_key, list(tokens), list(cache), nbytes)
        with self._cond:
            # A queued prefix of this prompt (the previous turn of the same
            # conversation) is superseded by it.
            kept = [e for e in self._queue if not _supersedes(entry, e)]
            self._queue.clear()
            self._queue.extend(kept)
            self._queue.append(entry)
            while len(self._queue) > self.queue_size:
                self._queue.popleft()
                self.stats.dropped += 1
            self._cond.notify()

    def snapshot(self) -> dict:
        with self._cond:
            queued = len(self._queue)
        s = self.stats
        return {
            "loaded": s.loaded,
            "written": s.written,
            "skipped": s.skipped,
            "dropped": s.dropped,
            "failed": s.failed,
            "queued": queued,
        }

    # --- the writer thread ---------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="prompt-cache-writer", daemon=True)
        self._thread.start()

    def flush(self, timeout: float) -> bool:
        """Wait (at most `timeout` seconds) until everything queued is written."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float = 0.0) -> None:
        """Stop taking entries; write what is queued within `timeout`."""
        if timeout > 0:
            self.flush(timeout)
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                entry = self._queue.popleft()
                self._busy = True
            try:
                self.write(entry)
            except Exception as exc:  # a full disk must not end the worker
                self.stats.failed += 1
                log.warning("writing a prompt cache entry failed: %s", exc)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def write(self, entry: Entry) -> Path:
        """Save one entry, then keep the directory under its budget."""
        part = partition_name(entry.cache_key)
        folder = self.dir / part
        # The files hold what the prompts said: private to this user.
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        name = tokens_digest(entry.tokens)
        temp = folder / f"{name}.{os.getpid()}.{threading.get_ident()}{TEMP_SUFFIX}{SUFFIX}"
        metadata = {
            "format": FORMAT,
            "model": self.fingerprint,
            "cache_key": entry.cache_key,
            "tokens": _pack(entry.tokens).hex(),
        }
        try:
            save_prompt_cache(str(temp), entry.cache, metadata)
            os.chmod(temp, 0o600)
            path = folder / f"{name}-{_file_digest(temp)}{SUFFIX}"
            os.replace(temp, path)
        finally:
            temp.unlink(missing_ok=True)
        self.stats.written += 1
        if can_trim_prompt_cache(entry.cache):
            self._drop_prefixes(part, entry.tokens)
        self._remember(entry.cache_key, entry.tokens, path)
        self.evict()
        return path

    def evict(self) -> None:
        """Remove the least recently written files of the whole directory
        (every model's) until it fits its byte budget."""
        files = []
        for path in self._files(self.root, temp=True):
            try:
                stat = path.stat()
            except OSError:
                continue  # removed by another worker meanwhile
            if path.name.endswith(TEMP_SUFFIX + SUFFIX) and time.time() - stat.st_mtime < 3600:
                continue  # being written by someone; an hour-old one is litter
            files.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files, key=lambda f: f[0]):
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
            self._forget(path)

    # --- helpers ---------------------------------------------------------------

    def _read(self, path: Path) -> Entry | None:
        """One file as an entry, or None (with a warning) when it cannot be trusted."""
        try:
            expected = path.name.removesuffix(SUFFIX).rpartition("-")[2]
            if _file_digest(path) != expected:
                raise ValueError("its contents do not match its checksum (corrupt or truncated)")
            cache, metadata = load_prompt_cache(str(path), return_metadata=True)
            if metadata.get("format") != FORMAT or metadata.get("model") != self.fingerprint:
                raise ValueError("it belongs to another format or model")
            tokens = _unpack(metadata["tokens"])
            cache_key = metadata["cache_key"]
            if partition_name(cache_key) != path.parent.name:
                raise ValueError("it sits in another partition's directory")
            mx.eval([c.state for c in cache])
            return Entry(cache_key, tokens, cache, sum(c.nbytes for c in cache))
        except FileNotFoundError:
            return None  # evicted by another worker since the listing
        except Exception as exc:
            self.stats.skipped += 1
            log.warning("skipping prompt cache file %s: %s", path.name, exc)
            path.unlink(missing_ok=True)
            return None

    def _drop_prefixes(self, part: str, tokens: list[int]) -> None:
        """Remove files holding a strict prefix of `tokens`: the longer cache
        serves them too (mlx-lm's in-memory cache drops them the same way)."""
        known = self._known.get(part, {})
        for name, (other, path) in list(known.items()):
            if len(other) < len(tokens) and tokens[: len(other)] == other:
                path.unlink(missing_ok=True)
                del known[name]

    def _remember(self, cache_key: str, tokens: list[int], path: Path) -> None:
        known = self._known.setdefault(partition_name(cache_key), {})
        known[path.name.rpartition("-")[0]] = (tokens, path)

    def _forget(self, path: Path) -> None:
        known = self._known.get(path.parent.name)
        if known is not None:
            known.pop(path.name.rpartition("-")[0], None)

    @staticmethod
    def _files(root: Path, temp: bool = False) -> list[Path]:
        try:
            found = [p for p in root.rglob("*" + SUFFIX) if p.is_file()]
        except OSError:
            return []
        if temp:
            return found
        return [p for p in found if not p.name.endswith(TEMP_SUFFIX + SUFFIX)]


def _supersedes(new: Entry, old: Entry) -> bool:
    return (
        new.cache_key == old.cache_key
        and len(old.tokens) <= len(new.tokens)
        and new.tokens[: len(old.tokens)] == old.tokens
    )


def _unpack(text: str) -> list[int]:
    data = bytes.fromhex(text)
    if len(data) % 4:
        raise ValueError("its token list is malformed")
    return list(struct.unpack(f"<{len(data) // 4}I", data))


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
