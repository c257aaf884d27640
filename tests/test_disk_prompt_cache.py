"""The prompt cache's disk store (worker/diskcache.py), without processes:
round trips, partitions, the byte budget, eviction, corrupt files."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache

from worker.diskcache import DiskPromptCache, model_fingerprint

LAYERS = 2


def kv(n: int, seed: int = 0) -> list:
    """A small KV cache of n tokens, as the engine keeps them."""
    mx.random.seed(seed)
    cache = []
    for _ in range(LAYERS):
        c = KVCache()
        c.keys = mx.random.normal((1, 2, n, 8))
        c.values = mx.random.normal((1, 2, n, 8))
        c.offset = n
        cache.append(c)
    return cache


def tokens(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.safetensors"))


def store(root: Path, **kw) -> DiskPromptCache:
    return DiskPromptCache(root, "m" * 32, **kw)


def load_all(root: Path, fingerprint: str = "m" * 32) -> list:
    return DiskPromptCache(root, fingerprint).load(max_bytes=1 << 40, max_entries=1000)


def test_entries_come_back_with_their_partition_tokens_and_arrays(tmp_path):
    s = store(tmp_path)
    first, second = kv(40, seed=1), kv(50, seed=2)
    s.write(_entry("alice", tokens(40), first))
    s.write(_entry("bob", tokens(50, 7), second))
    back = {e.cache_key: e for e in load_all(tmp_path)}
    assert set(back) == {"alice", "bob"}
    assert back["alice"].tokens == tokens(40) and back["bob"].tokens == tokens(50, 7)
    for got, want in zip(back["bob"].cache, second, strict=True):
        assert got.offset == 50
        assert mx.array_equal(got.keys[..., :50, :], want.keys).item()
        assert mx.array_equal(got.values[..., :50, :], want.values).item()
    # partitions are separate directories: one key's files never hold another's
    assert len({p.parent for p in files(tmp_path)}) == 2
    # another checkpoint sees none of them
    assert load_all(tmp_path, "x" * 32) == []


def test_load_stops_at_the_memory_budget_newest_first(tmp_path):
    s = store(tmp_path)
    for i in range(4):
        path = s.write(_entry("k", tokens(40, 1000 * i), kv(40, seed=i)))
        os.utime(path, (time.time() - 100 + i,) * 2)
    one = DiskPromptCache(tmp_path, "m" * 32).load(max_bytes=1 << 40, max_entries=2)
    # oldest first, so that inserting them in order leaves the newest most recent
    assert [e.tokens[0] for e in one] == [2000, 3000]
    size = one[0].nbytes
    two = DiskPromptCache(tmp_path, "m" * 32).load(max_bytes=int(size * 1.5), max_entries=9)
    assert [e.tokens[0] for e in two] == [3000]


def test_the_directory_stays_under_its_byte_budget_dropping_the_oldest(tmp_path):
    probe = store(tmp_path / "probe")
    size = probe.write(_entry("k", tokens(40), kv(40))).stat().st_size
    s = store(tmp_path / "pc", max_bytes=int(size * 2.5))
    written = []
    for i in range(5):
        path = s.write(_entry("k", tokens(40, 1000 * i), kv(40, seed=i)))
        os.utime(path, (time.time() - 100 + i,) * 2)
        written.append(path)
        assert sum(p.stat().st_size for p in files(tmp_path / "pc")) <= s.max_bytes
    assert files(tmp_path / "pc") == sorted(written[-2:])
    assert [e.tokens[0] for e in load_all(tmp_path / "pc")] == [3000, 4000]


def test_the_budget_covers_every_model_in_the_directory(tmp_path):
    old = store(tmp_path)
    path = old.write(_entry("k", tokens(40), kv(40)))
    os.utime(path, (time.time() - 100,) * 2)
    new = DiskPromptCache(tmp_path, "n" * 32, max_bytes=int(path.stat().st_size * 1.5))
    new.write(_entry("k", tokens(40, 5), kv(40, seed=3)))
    assert [p.parent.parent.name for p in files(tmp_path)] == ["n" * 32]


def test_a_longer_prompt_replaces_its_prefix_in_the_same_partition_only(tmp_path):
    s = store(tmp_path)
    s.write(_entry("k", tokens(40), kv(40)))
    s.write(_entry("other", tokens(40), kv(40)))
    s.write(_entry("k", tokens(60), kv(60)))
    back = sorted((e.cache_key, len(e.tokens)) for e in load_all(tmp_path))
    assert back == [("k", 60), ("other", 40)]


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_a_damaged_file_is_skipped_with_a_warning_and_removed(tmp_path, caplog, damage):
    s = store(tmp_path)
    s.write(_entry("good", tokens(40), kv(40)))
    bad = s.write(_entry("bad", tokens(40, 500), kv(40, seed=5)))
    data = bad.read_bytes()
    if damage == "truncate":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        middle = len(data) // 2
        bad.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :])
    else:
        bad.write_bytes(b"not a safetensors file")
    reader = DiskPromptCache(tmp_path, "m" * 32)
    with caplog.at_level(logging.WARNING, logger="worker.diskcache"):
        back = reader.load(max_bytes=1 << 40, max_entries=10)
    assert [e.cache_key for e in back] == ["good"]
    assert reader.stats.skipped == 1
    assert any("skipping prompt cache file" in r.getMessage() for r in caplog.records)
    assert not bad.exists()


def test_a_file_renamed_into_another_partition_is_not_served_there(tmp_path, caplog):
    s = store(tmp_path)
    path = s.write(_entry("alice", tokens(40), kv(40)))
    intruder = s.dir / ("0" * 32)
    intruder.mkdir()
    path.rename(intruder / path.name)
    with caplog.at_level(logging.WARNING, logger="worker.diskcache"):
        assert load_all(tmp_path) == []


def test_offering_never_blocks_and_the_queue_is_bounded(tmp_path):
    s = store(tmp_path, queue_size=3)  # its writer not started yet: nothing drains
    started = time.perf_counter()
    for i in range(6):
        s.offer("k", tokens(40, 1000 * i), kv(40, seed=i))
    assert time.perf_counter() - started < 30  # a generous bound: it never waits
    assert s.snapshot()["queued"] == 3 and s.stats.dropped == 3
    assert files(tmp_path) == []  # offer itself writes nothing
    s.start()
    assert s.flush(timeout=60)
    assert s.stats.written == 3
    assert sorted(e.tokens[0] for e in load_all(tmp_path)) == [3000, 4000, 5000]
    s.close()


def test_queued_prefixes_of_a_newer_prompt_are_not_written(tmp_path):
    s = store(tmp_path)
    s.offer("k", tokens(40), kv(40))
    s.offer("k", tokens(50), kv(50))
    s.offer("j", tokens(40), kv(40))
    s.start()
    assert s.flush(timeout=60)
    assert s.stats.written == 2
    s.close()


def test_short_and_oversized_entries_are_not_queued(tmp_path):
    s = store(tmp_path, max_bytes=10_000)
    s.offer("k", tokens(8), kv(8))  # too short to be worth reusing
    s.offer("k", tokens(200), kv(200))  # larger than the whole budget
    assert s.snapshot()["queued"] == 0 and s.stats.dropped == 1


def test_a_failing_disk_is_counted_not_raised(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the directory should be")
    s = DiskPromptCache(blocker, "m" * 32)
    s.start()
    s.offer("k", tokens(40), kv(40))
    assert s.flush(timeout=60)
    assert s.stats.failed == 1 and s.stats.written == 0
    s.close()


def test_the_fingerprint_follows_the_checkpoint_files(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"1234")
    (tmp_path / "config.json").write_text("{}")
    first = model_fingerprint(tmp_path)
    assert first == model_fingerprint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"12345")
    assert model_fingerprint(tmp_path) != first
    assert model_fingerprint(tmp_path / "missing") is None


def _entry(key: str, toks: list[int], cache: list):
    from worker.diskcache import Entry

    return Entry(key, toks, cache, sum(c.nbytes for c in cache))


def test_files_are_private_to_their_owner(tmp_path):
    path = store(tmp_path).write(_entry("k", tokens(40), kv(40)))
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
