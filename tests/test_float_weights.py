"""Quantized weights widened to float32 (worker/float_weights.py) and the BLAS
MLX's CPU backend runs them on (worker/cpublas.py).

In-process on a small quantized module, and in fresh interpreters for the
BLAS, which can only be chosen before MLX is imported. The served path is
covered by tests/test_real_model.py, whose model is quantized.
"""

from __future__ import annotations

import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import pytest

from worker import cpublas, float_weights

from .conftest import ROOT


class Small(nn.Module):
    """An embedding tied to the output, and two linear layers in a list (the
    paths a real model's layers have: `layers.0.q_proj` and the like)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 64)
        self.layers = [nn.Linear(64, 32, bias=True), nn.Linear(32, 64, bias=False)]

    def __call__(self, ids: mx.array) -> mx.array:
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        return self.embed.as_linear(h)


def quantized() -> Small:
    mx.random.seed(3)
    model = Small()
    nn.quantize(model, group_size=32, bits=4)
    mx.eval(model.parameters())
    return model


IDS = mx.array([[1, 5, 9, 63]])


def test_always_widens_every_quantized_layer_to_its_exact_float32_weights():
    model = quantized()
    want = {
        path: mx.dequantize(m.weight, m.scales, m.biases, group_size=32, bits=4)
        for path, m in float_weights.quantized_modules(model)
    }
    before = model(IDS)
    made = float_weights.apply(model, "always")
    assert made == 4 * (64 * 64 + 32 * 64 + 64 * 32)
    assert float_weights.quantized_modules(model) == []
    widened = dict(model.named_modules())
    assert set(want) == {"embed", "layers.0", "layers.1"}
    for path, weight in want.items():
        assert widened[path].weight.dtype == mx.float32
        assert mx.array_equal(widened[path].weight, weight), path
    assert "bias" in widened["layers.0"] and "bias" not in widened["layers.1"]
    # The same function of the same weights; only the order of the sums differs.
    assert mx.allclose(model(IDS), before, rtol=1e-4, atol=1e-4)


def test_never_leaves_the_model_quantized():
    model = quantized()
    assert float_weights.apply(model, "never") == 0
    assert len(float_weights.quantized_modules(model)) == 3


@pytest.mark.parametrize(
    ("mode", "nbytes", "on_cpu", "fast_blas", "expected"),
    [
        ("auto", 1 << 20, True, True, True),
        ("auto", 1 << 20, False, True, False),  # a GPU reads fewer bytes quantized
        ("auto", 1 << 20, True, False, False),  # the bundled BLAS gains nothing
        ("auto", float_weights.AUTO_MAX_BYTES + 1, True, True, False),
        ("auto", float_weights.AUTO_MAX_BYTES, True, True, True),
        ("always", 1 << 40, False, False, True),
        ("always", 0, True, True, False),  # nothing quantized to widen
        ("never", 1 << 20, True, True, False),
    ],
)
def test_auto_widens_on_the_cpu_with_a_fast_blas_when_it_fits(
    mode, nbytes, on_cpu, fast_blas, expected
):
    assert float_weights.wanted(mode, nbytes=nbytes, on_cpu=on_cpu, fast_blas=fast_blas) is expected


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="auto, always, never"):
        float_weights.wanted("fast", nbytes=1, on_cpu=True, fast_blas=True)


# A float32 product whose value depends on the order of its sums: added
# strictly in turn (the reference BLAS), the ones vanish into 1e8 and the
# result is 0; an optimized BLAS keeps partial sums in several lanes.
ORDER_PROBE = """
import sys
if sys.argv[1] == "worker-first":
    from worker import cpublas
import mlx.core as mx
if sys.argv[1] == "mlx-first":
    from worker import cpublas
column = [1e8] + [1.0] * 62 + [-1e8]
product = mx.ones((2, 64)) @ mx.array(column).reshape(64, 1)
print(cpublas.active, product[0, 0].item())
"""


def probe(order: str, blas: str | None = None) -> tuple[str, float, str]:
    """What the probe's BLAS is called, the product, and what it logged."""
    env = {"PATH": "/usr/bin:/bin"} | ({cpublas.ENV: blas} if blas else {})
    out = subprocess.run(
        [sys.executable, "-c", ORDER_PROBE, order],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    active, value = out.stdout.split()
    return active, float(value), out.stderr


@pytest.fixture(scope="module")
def openblas():
    if not sys.platform.startswith("linux"):
        pytest.skip("the BLAS is chosen on Linux only (macOS: MLX links Accelerate)")
    try:
        import ctypes

        ctypes.CDLL(cpublas.OPENBLAS_NAMES[0])
    except OSError:
        pytest.skip("OpenBLAS is not installed (Debian: apt install libopenblas0)")


def test_importing_the_worker_first_puts_mlx_on_openblas(openblas):
    active, value, _ = probe("worker-first")
    assert active == "openblas"
    assert value != 0.0  # summed in lanes: not the reference BLAS


def test_off_keeps_the_bundled_blas(openblas):
    assert probe("worker-first", blas="off")[:2] == ("bundled", 0.0)


def test_too_late_after_mlx_keeps_the_bundled_blas_and_says_so(openblas):
    active, value, logged = probe("mlx-first")
    assert (active, value) == ("bundled", 0.0)
    assert "mlx was imported first" in logged
