"""The model registry without processes: the real registry and the real pool
queue, with a stand-in for the supervisor, so loads, unloads and evictions
can be counted and timed by the test itself."""

from __future__ import annotations

import asyncio
import json
import struct
from pathlib import Path

import pytest

from gateway import pool as pool_module
from gateway.config import Settings
from gateway.metrics import Metrics
from gateway.pool import Overloaded, Pool
from gateway.registry import MB, ModelLoadFailed, ModelTooLarge, NoRoom, Registry, Status
from gateway.supervisor import State


class FakeSupervisor:
    """A worker that loads when the test says so (or at once), and never runs a process."""

    starts: list[str] = []  # model names, in start order
    gate: dict[str, asyncio.Event] = {}  # a model's loads wait for its event
    fail: set[str] = set()  # models whose load crashes
    backend: dict | None = None  # what a loaded worker says it runs on

    def __init__(self, worker_id, spec, settings, metrics, on_change=lambda: None, **_kw):
        self.id = worker_id
        self.spec = spec
        self._on_change = on_change
        self.state = State.STOPPED
        self.in_flight = 0
        self.loaded: dict = {}
        self.health: dict = {}
        self.pid = None
        self.last_exit = None
        self.last_words = None
        self.probing = False
        self.failure = None
        self.client = None
        self._task = None

    @property
    def ready(self) -> bool:
        return self.state is State.READY

    def start(self) -> None:
        FakeSupervisor.starts.append(self.spec.name)
        self._set(State.LOADING)
        self._task = asyncio.create_task(self._load())

    async def _load(self) -> None:
        gate = FakeSupervisor.gate.get(self.spec.name)
        if gate is not None:
            await gate.wait()
        else:
            await asyncio.sleep(0.01)
        if self.spec.name in FakeSupervisor.fail:
            self.last_exit = "killed by SIGSEGV"
            self.last_words = "Segmentation fault"
            self._set(State.BACKOFF)
            return
        self.pid = 4242
        self.loaded = {"memory": {"active_memory_mb": 1.0}}
        if FakeSupervisor.backend is not None:
            self.health = {"backend": FakeSupervisor.backend}
        self._set(State.READY)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.pid = None
        self._set(State.STOPPED)

    def describe(self) -> dict:
        return {"id": self.id, "state": self.state.value}

    def _set(self, state: State) -> None:
        self.state = state
        self._on_change()


@pytest.fixture
def models_dir(tmp_path) -> Path:
    for name in ("a", "b", "c", "big"):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text("{}")
        (d / "model.safetensors").write_bytes(b"\0" * (8 * MB if name == "big" else MB))
    return tmp_path


@pytest.fixture(autouse=True)
def fake_supervisors(monkeypatch):
    monkeypatch.setattr(pool_module, "Supervisor", FakeSupervisor)
    FakeSupervisor.starts = []
    FakeSupervisor.gate = {}
    FakeSupervisor.fail = set()
    FakeSupervisor.backend = None


def registry(models_dir: Path, **kw) -> Registry:
    settings = Settings(
        models_dirs=[str(models_dir)], prompt_cache_bytes=MB, queue_timeout=5.0, **kw
    )
    metrics = Metrics()
    return Registry(settings, metrics, Pool(settings, metrics))


async def use(reg: Registry, name: str):
    """Take a slot on the model (loading it if need be), as a request does,
    and let the registry finish its bookkeeping of the load."""
    pool = reg.resolve(name)
    worker = await pool.acquire()
    await settle(reg)
    return pool, worker


async def settle(reg: Registry) -> None:
    for model in list(reg.models.values()):
        if model.task is not None and model.status is Status.LOADING:
            await asyncio.shield(model.task)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_twenty_concurrent_first_requests_make_one_load(models_dir):
    async def go():
        reg = registry(models_dir)
        reg.start()
        FakeSupervisor.gate["a"] = gate = asyncio.Event()
        tasks = [asyncio.create_task(use(reg, "a")) for _ in range(20)]
        await asyncio.sleep(0.05)
        assert reg.models["a"].status is Status.LOADING
        assert reg.models["a"].pool.waiting == 20
        gate.set()
        slots = await asyncio.gather(*tasks)
        assert FakeSupervisor.starts == ["a"]
        assert all(worker.ready for _, worker in slots)
        assert reg.models["a"].status is Status.LOADED and reg.models["a"].loads == 1
        await reg.stop()

    run(go())


def test_lru_idle_model_is_evicted_under_the_count_limit(models_dir):
    async def go():
        reg = registry(models_dir, max_loaded_models=2, keep_alive=-1)
        reg.start()
        for name in ("a", "b", "c"):
            pool, worker = await use(reg, name)
            pool.release(worker)
        assert reg.models["a"].status is Status.UNLOADED
        assert reg.models["a"].unloads == {"evicted": 1}
        assert {n for n, m in reg.models.items() if m.status is Status.LOADED} == {"b", "c"}
        await reg.stop()

    run(go())


def test_busy_model_is_not_evicted_and_the_new_one_waits_for_it(models_dir):
    async def go():
        reg = registry(models_dir, max_loaded_models=2, keep_alive=-1)
        reg.start()
        pool_a, slot_a = await use(reg, "a")  # a request in flight on a, the oldest
        pool_b, slot_b = await use(reg, "b")  # and one on b
        c = asyncio.create_task(use(reg, "c"))
        await asyncio.sleep(0.2)
        assert not c.done() and reg.models["c"].status is Status.LOADING
        assert "busy" in reg.models["c"].pool.blocked
        assert reg.models["a"].status is Status.LOADED and reg.models["b"].status is Status.LOADED
        pool_b.release(slot_b)  # b goes idle first: b is the one evicted, not the older a
        await c
        assert reg.models["b"].status is Status.UNLOADED
        assert reg.models["a"].status is Status.LOADED and slot_a.ready
        pool_a.release(slot_a)
        await reg.stop()

    run(go())


def test_no_room_in_time_fails_the_waiters_with_the_numbers(models_dir):
    async def go():
        reg = registry(models_dir, memory_budget_mb=4.5, keep_alive=-1)
        reg.settings.queue_timeout = 0.3
        reg.start()
        await use(reg, "a")  # a and b each count 1 MB of weights + 1 MB of KV budget
        await use(reg, "b")
        with pytest.raises((NoRoom, Overloaded)) as info:
            await use(reg, "c")
        message = str(info.value)
        assert "the memory budget is 4.5 MB and busy, pinned or loading models hold 4 MB" in message
        assert "a (2 MB, busy), b (2 MB, busy)" in message
        await asyncio.sleep(0.1)
        assert reg.models["c"].status is Status.UNLOADED
        assert FakeSupervisor.starts == ["a", "b"]
        await reg.stop()

    run(go())


def test_too_large_model_is_refused_at_once(models_dir):
    async def go():
        reg = registry(models_dir, memory_budget_mb=5)
        reg.start()
        with pytest.raises(ModelTooLarge) as info:
            # Bounded: a waiter the failure never reaches would wait forever
            # (the model is loaded again for it, and fails again).
            await asyncio.wait_for(use(reg, "big"), 10)
        assert "needs about 9 MB, more than the whole memory budget of 5 MB" in str(info.value)
        with pytest.raises(ModelTooLarge):
            await reg.load("big")
        assert FakeSupervisor.starts == []
        await reg.stop()

    run(go())


def test_a_crash_during_load_reaches_every_waiter_and_the_model_stays_unloaded(models_dir):
    async def go():
        reg = registry(models_dir)
        reg.start()
        FakeSupervisor.fail.add("a")
        results = await asyncio.gather(*(use(reg, "a") for _ in range(5)), return_exceptions=True)
        assert all(isinstance(r, ModelLoadFailed) for r in results), results
        assert "SIGSEGV" in str(results[0]) and "Segmentation fault" in str(results[0])
        await reg.models["a"].task
        assert reg.models["a"].status is Status.UNLOADED
        assert FakeSupervisor.starts == ["a"]
        # For a while, requests get that failure at once, without a new worker.
        with pytest.raises(ModelLoadFailed, match="next load is tried in 1s"):
            await use(reg, "a")
        assert FakeSupervisor.starts == ["a"]
        FakeSupervisor.fail.clear()
        reg.models["a"].retry_at = 0.0  # that while is over: the next request tries again
        _, worker = await use(reg, "a")
        assert worker.ready and FakeSupervisor.starts == ["a", "a"]
        await reg.stop()

    run(go())


def test_keep_alive_unloads_an_idle_model_and_a_request_can_extend_it(models_dir):
    async def go():
        reg = registry(models_dir, keep_alive=0.2)
        reg.start()
        pool, worker = await use(reg, "a")
        await asyncio.sleep(0.4)
        assert reg.models["a"].status is Status.LOADED, "busy: never unloaded"
        pool.release(worker)
        await asyncio.sleep(0.5)
        assert reg.models["a"].status is Status.UNLOADED
        assert reg.models["a"].unloads == {"keep_alive": 1}
        # keep_alive on a request extends the model's stay.
        pool = reg.resolve("a", keep_alive=60)
        pool.release(await pool.acquire())
        await asyncio.sleep(0.5)
        assert reg.models["a"].status is Status.LOADED
        assert reg.idle_deadline(reg.models["a"]) is not None
        await reg.stop()

    run(go())


def test_pinned_model_stays_loaded_when_idle_and_is_not_evicted(models_dir):
    async def go():
        reg = registry(models_dir, keep_alive=0, max_loaded_models=2, pins=["a"])
        reg.start()
        for name in ("a", "b", "c"):
            pool, worker = await use(reg, name)
            pool.release(worker)
        await asyncio.sleep(0.2)
        assert reg.models["a"].status is Status.LOADED
        assert reg.models["b"].status is Status.UNLOADED
        await reg.stop()

    run(go())


def test_request_arriving_while_unloading_loads_the_model_again(models_dir):
    async def go():
        reg = registry(models_dir, keep_alive=-1)
        reg.start()
        pool, worker = await use(reg, "a")
        pool.release(worker)
        unloading = asyncio.create_task(reg.unload("a"))
        await asyncio.sleep(0)
        assert reg.models["a"].status is Status.UNLOADING
        again = asyncio.create_task(use(reg, "a"))
        await unloading
        _, worker = await again
        assert worker.ready and FakeSupervisor.starts == ["a", "a"]
        await reg.stop()

    run(go())


def test_an_alias_resolves_to_its_model_and_unknown_names_to_nothing(models_dir):
    async def go():
        reg = registry(models_dir, aliases={"fast": "a"})
        reg.start()
        pool, worker = await use(reg, "fast")
        assert pool is reg.models["a"].pool and worker.ready
        assert reg.canonical("fast") == "a" and reg.resolve("nope") is None
        await reg.stop()

    run(go())


def test_a_model_added_to_the_directory_is_found_after_a_miss(models_dir, monkeypatch):
    from gateway import registry as registry_module

    monkeypatch.setattr(registry_module, "RESCAN_INTERVAL", 0.0)

    async def go():
        reg = registry(models_dir)
        reg.start()
        assert reg.resolve("new") is None
        await reg._rescan  # the miss started a scan; nothing new yet
        d = models_dir / "new"
        d.mkdir()
        (d / "config.json").write_text("{}")
        assert reg.resolve("new") is None
        await reg._rescan
        _, worker = await use(reg, "new")
        assert worker.ready and reg.models["new"].size_bytes == 2
        await reg.stop()

    run(go())


def quantized_checkpoint(path: Path, rows: int = 1024, columns: int = 1024) -> Path:
    """A 4-bit checkpoint of one layer (groups of 64) whose weights take 4 MB
    as float32: its header says so, its data is zeros."""
    packed, groups = columns * 4 // 32, columns // 64
    tensors, offset = {}, 0
    for part, dtype, shape, size in (
        ("weight", "U32", [rows, packed], 4 * rows * packed),
        ("scales", "F16", [rows, groups], 2 * rows * groups),
        ("biases", "F16", [rows, groups], 2 * rows * groups),
    ):
        end = offset + size
        tensors[f"model.layers.0.mlp.up_proj.{part}"] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [offset, end],
        }
        offset = end
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"quantization": {"bits": 4, "group_size": 64}}))
    header = json.dumps(tensors).encode()
    data = struct.pack("<Q", len(header)) + header + bytes(offset)
    (path / "model.safetensors").write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("float_weights", "backend", "fits"),
    [
        ("always", None, False),
        ("never", None, True),
        ("auto", {"device": "cpu", "blas": "openblas"}, False),
        ("auto", {"device": "gpu", "blas": None}, True),
    ],
)
def test_a_quantized_model_is_budgeted_as_its_workers_will_hold_it(
    models_dir, float_weights, backend, fits
):
    """Under 0.6 MB on disk, 4 MB once a worker on the CPU widens it to
    float32: a 3 MB budget (1 MB of it each worker's prompt cache) has room
    for it only where it stays quantized."""
    quantized_checkpoint(models_dir / "q4")
    FakeSupervisor.backend = backend

    async def go():
        reg = registry(models_dir, memory_budget_mb=3, float_weights=float_weights)
        reg.start()
        pool, worker = await use(reg, "a")  # a worker loaded a model, and said what it runs on
        pool.release(worker)
        if fits:
            await use(reg, "q4")
            assert reg.models["q4"].status is Status.LOADED
        else:
            with pytest.raises(ModelTooLarge) as info:
                await asyncio.wait_for(use(reg, "q4"), 10)
            assert "needs about 5 MB" in str(info.value)
            assert "q4" not in FakeSupervisor.starts
        await reg.stop()

    run(go())
