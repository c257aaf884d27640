"""What a model's weights will take in a worker, read from its files before it loads.

The registry budgets a model it has not loaded yet by its size on disk. That
is right for weights that load as they are stored, but a worker on the CPU
widens a quantized model's weights to float32 (worker/float_weights.py):
4-bit weights then take about six times their size on disk, so a budget that
counted the files would admit a model that does not fit. Here the widened
size is worked out from the checkpoint's safetensors headers (shapes and byte
ranges, no tensor data) and its config's quantization, or a GGUF file's
tensor infos, layer by layer as the worker widens them: quantized linear and
embedding weights (two dimensions); a mixture of experts' stacked weights
stay quantized.
"""

from __future__ import annotations

import json
import logging
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from worker import gguf
from worker.protocol import FLOAT_WEIGHTS_AUTO_MAX_BYTES

log = logging.getLogger("gateway.weights")

HEADER_MAX = 100 << 20  # a safetensors header past this is not one
# What a damaged or foreign checkpoint raises while its headers are read.
UNREADABLE = (
    OSError, ValueError, KeyError, TypeError, AttributeError, ArithmeticError, struct.error
)  # fmt: skip


@dataclass(frozen=True)
class Quantized:
    """A checkpoint's quantized layers: their bytes on disk (weights, scales
    and biases) and what their weights take once widened to float32."""

    disk_bytes: int = 0
    float32_bytes: int = 0

    def in_memory(self, disk_bytes: int, *, mode: str, backend: dict | None) -> int:
        """What the model's weights (`disk_bytes` on disk) take in one worker:
        their size on disk, with these layers at float32 if the worker widens
        them (see `widens`)."""
        if not widens(mode, float32_bytes=self.float32_bytes, backend=backend):
            return disk_bytes
        return disk_bytes - self.disk_bytes + self.float32_bytes


def safetensors_header(path: Path) -> dict:
    """The JSON header of a .safetensors file: {name: {dtype, shape, data_offsets}}."""
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        if size > HEADER_MAX:
            raise ValueError(f"{path.name}: header of {size} bytes")
        return json.loads(f.read(size))


def quantized_layers(model_dir: Path) -> Quantized:
    """Sizes of `model_dir`'s quantized layers; empty for a float checkpoint
    (or one whose files cannot be read: the disk size stands then)."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
        quant = config.get("quantization") or config.get("quantization_config")
        if not isinstance(quant, dict) or "bits" not in quant:
            return Quantized()
        tensors: dict[str, dict] = {}
        for file in sorted(model_dir.glob("*.safetensors")):
            tensors.update(safetensors_header(file))
        return _sizes(tensors, quant)
    except UNREADABLE as exc:
        log.debug("%s: cannot read the checkpoint's headers: %s", model_dir, exc)
        return Quantized()


def _sizes(tensors: dict[str, dict], quant: dict) -> Quantized:
    disk = wide = 0
    for name, info in tensors.items():
        layer = name.removesuffix(".weight")
        if layer == name or f"{layer}.scales" not in tensors or len(info["shape"]) != 2:
            continue
        bits = _bits(quant, layer)
        rows, packed = info["shape"]
        wide += 4 * rows * (packed * 32 // bits)
        for part in ("weight", "scales", "biases"):
            entry = tensors.get(f"{layer}.{part}")
            if entry is not None:
                start, end = entry["data_offsets"]
                disk += end - start
    return Quantized(disk, wide)


def gguf_quantized_layers(path: Path) -> Quantized:
    """The same for a GGUF file, from its tensor infos: the worker converts it
    to MLX's quantization (worker/gguf.py), so its quantized matrices widen
    like any checkpoint's."""
    try:
        infos = gguf.tensor_infos(path)
    except UNREADABLE as exc:
        log.debug("%s: cannot read the GGUF header: %s", path, exc)
        return Quantized()
    disk = wide = 0
    for info in infos:
        if len(info.dims) == 2 and info.ggml_type not in gguf.FLOAT_TENSOR_TYPES:
            disk += info.nbytes
            wide += 4 * info.dims[0] * info.dims[1]
    return Quantized(disk, wide)


def _bits(quant: dict, layer: str) -> int:
    """A layer's bits: its own entry in the config's quantization, or the default.
    mlx-lm names a layer by its module path, without the `model.` of a
    wrapper in some checkpoints; both are looked up."""
    for key in (layer, layer.removeprefix("model.")):
        own = quant.get(key)
        if isinstance(own, dict) and "bits" in own:
            return int(own["bits"])
    return int(quant["bits"])


def widens(mode: str, *, float32_bytes: int, backend: dict | None) -> bool:
    """Whether a worker widens `float32_bytes` of weights under --float-weights
    `mode`, on the backend its workers report ({"device", "blas"}), or, before
    any has, the one this machine most likely has: Apple silicon's GPU on
    macOS, the CPU with an optimized BLAS elsewhere."""
    if float32_bytes == 0 or mode == "never":
        return False
    if mode == "always":
        return True
    if backend and backend.get("device"):
        on_cpu = backend["device"] == "cpu"
        fast_blas = backend.get("blas") not in (None, "bundled")
    else:
        on_cpu = fast_blas = sys.platform != "darwin"
    return on_cpu and fast_blas and float32_bytes <= FLOAT_WEIGHTS_AUTO_MAX_BYTES
