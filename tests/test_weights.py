"""What a quantized model's weights take once a worker widens them, read from
its files before it loads (gateway/weights.py), against the worker's own
widening (worker/float_weights.py) of real mlx-lm checkpoints."""

from __future__ import annotations

import struct
import sys

import pytest

from gateway import weights
from gateway.catalogue import size_on_disk


def quantize(source, out, predicate=None):
    from mlx_lm import convert

    convert(str(source), mlx_path=str(out), quantize=True, q_bits=4, q_group_size=32,
            quant_predicate=predicate)  # fmt: skip
    return out


def widened_by_the_worker(path) -> int:
    from mlx_lm import load

    from worker import float_weights

    model, _ = load(str(path))
    return float_weights.float_bytes(float_weights.quantized_modules(model))


def eight_bit_embeddings(path, module):
    # A layer of its own width, as the built-in SmolLM2's 8-bit embeddings.
    return {"bits": 8, "group_size": 32} if "embed_tokens" in path else True


@pytest.mark.parametrize("predicate", [None, eight_bit_embeddings], ids=["4-bit", "mixed"])
def test_the_widened_size_is_what_the_worker_widens(tiny_model, tmp_path, predicate):
    path = quantize(tiny_model, tmp_path / "q", predicate)
    quantized = weights.quantized_layers(path)
    assert quantized.float32_bytes == widened_by_the_worker(path)
    disk = size_on_disk(path)
    assert 0 < quantized.disk_bytes < disk
    cpu = {"device": "cpu", "blas": "openblas"}
    held = quantized.in_memory(disk, mode="auto", backend=cpu)
    assert held == disk - quantized.disk_bytes + quantized.float32_bytes
    assert held > 3 * disk  # 4-bit weights (and their scales) widened to float32


def test_a_float_checkpoint_has_nothing_to_widen(tiny_model):
    quantized = weights.quantized_layers(tiny_model)
    assert quantized == weights.Quantized()
    assert quantized.in_memory(123, mode="always", backend=None) == 123


def safetensors(path, header: bytes) -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header)


@pytest.mark.parametrize(
    "header",
    [
        b"\xff" * 8,  # says 18 EB follow
        b"{not json",
        b'{"a.weight": {"dtype": "U32"}, "a.scales": {}}',  # no shape
        b'{"a.weight": {"shape": [4, 4], "data_offsets": "?"}, "a.scales": {}}',
        b"[]",
    ],
    ids=["huge", "not-json", "no-shape", "bad-offsets", "a-list"],
)
def test_a_damaged_checkpoint_leaves_the_disk_size(tmp_path, header):
    (tmp_path / "config.json").write_text('{"quantization": {"bits": 4, "group_size": 32}}')
    if header.startswith(b"\xff"):
        (tmp_path / "model.safetensors").write_bytes(header)
    else:
        safetensors(tmp_path / "model.safetensors", header)
    assert weights.quantized_layers(tmp_path) == weights.Quantized()


@pytest.mark.timeout(20)
def test_a_damaged_gguf_file_is_read_at_once_and_leaves_the_disk_size(tmp_path):
    # One metadata entry: an array of 2**60 bytes, in a file of 50. Read item by
    # item, that header would keep the catalogue's scan busy for good.
    entry = struct.pack("<Q", 3) + b"key" + struct.pack("<IIQ", 9, 0, 2**60)
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + entry)
    assert weights.gguf_quantized_layers(path) == weights.Quantized()
    path.write_bytes(b"GGUF\0")  # cut short
    assert weights.gguf_quantized_layers(path) == weights.Quantized()


@pytest.mark.parametrize(
    ("mode", "backend", "platform", "widened"),
    [
        ("never", {"device": "cpu", "blas": "openblas"}, "linux", False),
        ("always", {"device": "gpu", "blas": None}, "darwin", True),
        ("auto", {"device": "cpu", "blas": "openblas"}, "darwin", True),
        ("auto", {"device": "cpu", "blas": "bundled"}, "linux", False),
        ("auto", {"device": "gpu", "blas": None}, "linux", False),
        # Before any worker has said: the machine's likely backend.
        ("auto", None, "linux", True),
        ("auto", None, "darwin", False),
    ],
)
def test_which_workers_widen(monkeypatch, mode, backend, platform, widened):
    monkeypatch.setattr(sys, "platform", platform)
    assert weights.widens(mode, float32_bytes=10, backend=backend) is widened
    # Past what "auto" widens (a model over 500M parameters), only "always" does.
    huge = weights.FLOAT_WEIGHTS_AUTO_MAX_BYTES + 1
    assert weights.widens(mode, float32_bytes=huge, backend=backend) is (mode == "always")
