"""A quantized model's weights run as float32 where that is faster: the CPU.

MLX's CPU kernels for quantized matmuls cost the same for every row they
multiply, so a prompt of 45 tokens costs about 45 decode steps and a batch
of eight rows eight times one. A float32 matmul on an optimized BLAS
(cpublas.py) costs little more for eight rows than for one. On the built-in
SmolLM2-135M (4-bit, 8-bit embeddings) on two cores, one decode step went
from 150-240 ms to 80-135 ms, eight rows from 0.9-1.4 s to 0.17-0.22 s and a
45-token prefill from 5.2-6.2 s to 0.43-0.67 s with its weights dequantized
to float32 under OpenBLAS (float16 and bfloat16 were slower than float32).

So a worker on the CPU with a fast BLAS dequantizes a quantized model once,
at load, when its float32 weights fit in AUTO_MAX_BYTES ("auto"); "always"
and "never" force the choice. The weights are the quantized ones, exactly,
widened; only the order of the arithmetic changes, so greedy output can
differ from the quantized kernels' where two tokens nearly tie. On a GPU
quantized kernels read fewer bytes, which is what decoding waits for there,
so "auto" leaves the weights alone.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from . import cpublas, protocol

MODES = protocol.FLOAT_WEIGHTS
AUTO_MAX_BYTES = protocol.FLOAT_WEIGHTS_AUTO_MAX_BYTES


def quantized_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers this module can widen: quantized linear and embedding ones
    (others, such as a mixture of experts' switch layers, stay as they are)."""
    kinds = (nn.QuantizedLinear, nn.QuantizedEmbedding)
    return [(path, m) for path, m in model.named_modules() if isinstance(m, kinds)]


def float_bytes(modules: list[tuple[str, nn.Module]]) -> int:
    """Bytes those layers' weights take as float32."""
    return sum(4 * _shape(m)[0] * _shape(m)[1] for _, m in modules)


def wanted(mode: str, *, nbytes: int, on_cpu: bool, fast_blas: bool) -> bool:
    """Whether to widen nbytes of float32 weights, as `mode` asks."""
    if mode not in MODES:
        raise ValueError(f"float_weights must be one of {', '.join(MODES)}, not {mode!r}")
    if mode != "auto" or nbytes == 0:
        return mode == "always" and nbytes > 0
    return on_cpu and fast_blas and nbytes <= AUTO_MAX_BYTES


def apply(model: nn.Module, mode: str = "auto") -> int:
    """Widen the model's quantized layers to float32 when `mode` (MODES)
    wants it; returns the float32 bytes made (0: left as they were)."""
    modules = quantized_modules(model)
    nbytes = float_bytes(modules)
    on_cpu = mx.default_device() == mx.cpu
    if not wanted(mode, nbytes=nbytes, on_cpu=on_cpu, fast_blas=cpublas.fast()):
        return 0
    # One layer at a time, so at most one layer's float copy is ever extra.
    for path, module in modules:
        widened = _widen(module)
        mx.eval(widened.parameters())
        model.update_modules(tree_unflatten([(path, widened)]))
    return nbytes


def _shape(module: nn.Module) -> tuple[int, int]:
    """(rows, columns) of a quantized layer's weight, unpacked."""
    rows, packed = module.weight.shape
    return rows, packed * 32 // module.bits


def _widen(module: Any) -> nn.Module:
    weight = mx.dequantize(
        module.weight,
        module.scales,
        module.get("biases"),
        group_size=module.group_size,
        bits=module.bits,
        mode=getattr(module, "mode", "affine"),
        dtype=mx.float32,
    )
    if isinstance(module, nn.QuantizedEmbedding):
        layer = nn.Embedding(*weight.shape)
        layer.weight = weight
        return layer
    rows, columns = weight.shape
    layer = nn.Linear(columns, rows, bias=False)
    layer.weight = weight
    if "bias" in module:
        layer.bias = module.bias
    return layer
