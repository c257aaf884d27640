"""Quantized KV caches that batch: what `--kv-bits` runs on.

mlx-lm quantizes the KV cache of one sequence (`QuantizedKVCache`), but its
batch engine only batches full-precision caches (`BatchKVCache`). This module
adds the batched form, `BatchQuantizedKVCache`: the same left-padded layout
and the same operations as `BatchKVCache` (update, mask, filter, extend,
merge, extract, trim, the right-padding roll of a ragged prefill), over
mlx's affine quantization (packed values, one scale and bias per group of
`group_size` along the head dimension).

Attention reads it one of two ways. On a GPU the models' attention runs
mlx's quantized attention (quantized matmuls straight on the packed cache)
for any cache with `bits`. On the CPU backend those matmuls are tens of
times slower than plain ones at half precision (17.8 s against 0.33 s for
one 512x2048 score matrix in float16), so there the cache hands attention
its keys and values dequantized, one layer at a time, and hides `bits`:
the cache still holds only the quantized form between steps.

`SequenceQuantizedKVCache` is mlx-lm's one-sequence cache able to join a
batch: the worker hands one per layer to `BatchGenerator.insert` for every
request, so the generator merges them into a `BatchQuantizedKVCache`, and
a finished request's cache (what the prompt cache keeps) comes back in that
form. Quantization is per token and per group, so a token's quantized KV is
the same whether it was computed alone or in a batch.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from .mlxlm import KVCache, QuantizedKVCache, create_causal_mask, dynamic_roll, make_prompt_cache
from .protocol import DEFAULT_KV_GROUP_SIZE, KV_BITS, KV_GROUP_SIZES

DEFAULT_GROUP_SIZE = DEFAULT_KV_GROUP_SIZE

Quantized = tuple[mx.array, mx.array, mx.array]  # packed, scales, biases


def dequantize_for_attention() -> bool:
    """Whether attention should read the cache dequantized: on the CPU
    backend, where quantized matmuls at half precision crawl."""
    return mx.default_device().type == mx.cpu


def check_options(bits: int | None, group_size: int | None) -> None:
    """Refuse options the quantized cache cannot run with (ValueError)."""
    if bits is None:
        return
    if bits not in KV_BITS:
        raise ValueError(f"kv_bits must be one of {', '.join(map(str, KV_BITS))}, not {bits}")
    if group_size not in KV_GROUP_SIZES:
        raise ValueError(
            f"kv_group_size must be one of {', '.join(map(str, KV_GROUP_SIZES))}, not {group_size}"
        )


class SequenceQuantizedKVCache(QuantizedKVCache):
    """One sequence's quantized KV cache that `BatchGenerator` can batch."""

    def size(self) -> int:
        return self.offset

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return sum(x.nbytes for x in (*self.keys, *self.values))

    @classmethod
    def merge(cls, caches: list[Any]) -> BatchQuantizedKVCache:
        return BatchQuantizedKVCache.merge(caches)

    @classmethod
    def adopt(cls, cache: QuantizedKVCache) -> SequenceQuantizedKVCache:
        """This class over the arrays of mlx-lm's own (read back from disk)."""
        return cls.from_state(cache.state)

    def portable(self) -> QuantizedKVCache:
        """mlx-lm's own class over the same arrays: what its cache files name."""
        return QuantizedKVCache.from_state(self.state)


def fresh_cache(model: Any, *, bits: int, group_size: int) -> list[SequenceQuantizedKVCache]:
    """An empty quantized cache for one new sequence, one per layer."""
    return [
        SequenceQuantizedKVCache(group_size=group_size, bits=bits) for _ in range(len(model.layers))
    ]


def check_model(model: Any, *, bits: int, group_size: int) -> None:
    """Refuse, with a reason, a model whose KV cache cannot be quantized:
    layers with caches other than a plain KV cache (sliding windows, state
    space layers), or head dimensions the group size does not divide."""
    kinds = {type(c).__name__ for c in make_prompt_cache(model) if type(c) is not KVCache}
    if kinds:
        raise ValueError(
            "kv_bits needs a plain KV cache in every layer; this model uses "
            + ", ".join(sorted(kinds))
        )
    try:
        cache = fresh_cache(model, bits=bits, group_size=group_size)
        mx.eval(model(mx.array([[0]]), cache=cache))
    except Exception as exc:  # mlx names the dimension it cannot quantize
        raise ValueError(
            f"cannot quantize this model's KV cache with kv_bits {bits} and "
            f"kv_group_size {group_size}: {exc}"
        ) from exc


def portable(cache: list[Any]) -> list[Any]:
    """A cache as mlx-lm's save_prompt_cache can name it."""
    return [c.portable() if isinstance(c, SequenceQuantizedKVCache) else c for c in cache]


def adopt(cache: list[Any]) -> list[Any]:
    """A cache read back by load_prompt_cache, able to join a batch again."""
    return [SequenceQuantizedKVCache.adopt(c) if type(c) is QuantizedKVCache else c for c in cache]


def kv_bits_of(cache: list[Any]) -> tuple[int, int] | None:
    """(bits, group_size) of a cache, or None for full precision."""
    if cache and isinstance(cache[0], QuantizedKVCache):
        return cache[0].bits, cache[0].group_size
    return None


def _quantized_zeros(shape: tuple, dim: int, dtype: mx.Dtype, bits: int, group_size: int):
    return (
        mx.zeros((*shape, dim * bits // 32), dtype=mx.uint32),
        mx.zeros((*shape, dim // group_size), dtype=dtype),
        mx.zeros((*shape, dim // group_size), dtype=dtype),
    )


def _empty_like(x: Quantized, batch: int) -> Quantized:
    """No positions yet, `batch` rows, the other dimensions of `x`."""
    return tuple(mx.zeros((batch, a.shape[1], 0, a.shape[3]), dtype=a.dtype) for a in x)


class BatchQuantizedKVCache:
    """A left-padded batch of quantized KV caches, as `BatchKVCache` is of
    full-precision ones. `keys`/`values` are (packed, scales, biases), each
    [batch, kv heads, positions, ...]; positions [_idx:] are spare room,
    row i's first left_padding[i] positions are padding."""

    step = 256

    def __init__(
        self,
        left_padding: list[int],
        *,
        group_size: int,
        bits: int,
        dequantize: bool | None = None,
    ):
        self.keys: Quantized | None = None
        self.values: Quantized | None = None
        self.left_padding = mx.array(left_padding)
        self.offset = mx.array([-pad for pad in left_padding])
        self._idx = 0
        self._right_padding = None
        self.group_size = group_size
        self.kv_bits = bits
        self.dequantize = dequantize_for_attention() if dequantize is None else dequantize
        if not self.dequantize:
            # The attribute mlx-lm's attention looks for to run quantized.
            self.bits = bits

    # --- the model's side --------------------------------------------------------

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Any, Any]:
        """Store the new positions quantized; return the whole cache, packed,
        or dequantized where attention reads it so."""
        prev, n = self._idx, keys.shape[2]
        if self.keys is None or prev + n > self.keys[0].shape[2]:
            self._grow(keys, values)
        self.offset = self.offset + n
        self._idx += n
        for buffers, new in ((self.keys, keys), (self.values, values)):
            quantized = mx.quantize(new, group_size=self.group_size, bits=self.kv_bits)
            for buffer, part in zip(buffers, quantized, strict=True):
                buffer[..., prev : self._idx, :] = part
        keys, values = self.keys_and_values()
        if self.dequantize:
            options = {"group_size": self.group_size, "bits": self.kv_bits}
            return mx.dequantize(*keys, **options), mx.dequantize(*values, **options)
        return keys, values

    def _grow(self, keys: mx.array, values: mx.array) -> None:
        """Room for the new positions, in whole steps, as BatchKVCache grows."""
        B, H, n, _ = keys.shape
        shape = (B, H, (self.step + n - 1) // self.step * self.step)
        new_k = _quantized_zeros(shape, keys.shape[3], keys.dtype, self.kv_bits, self.group_size)
        new_v = _quantized_zeros(shape, values.shape[3], keys.dtype, self.kv_bits, self.group_size)
        if self.keys is None:
            self.keys, self.values = new_k, new_v
            return
        prev = self._idx
        self.keys = tuple(
            mx.concatenate([a[..., :prev, :], b], axis=2)
            for a, b in zip(self.keys, new_k, strict=True)
        )
        self.values = tuple(
            mx.concatenate([a[..., :prev, :], b], axis=2)
            for a, b in zip(self.values, new_v, strict=True)
        )

    def keys_and_values(self) -> tuple[Quantized, Quantized]:
        idx = self._idx
        return (
            tuple(x[..., :idx, :] for x in self.keys),
            tuple(x[..., :idx, :] for x in self.values),
        )

    def make_mask(self, N: int, return_array: bool = False, **kwargs):
        return create_causal_mask(N, offset=self._idx, left_padding=self.left_padding, **kwargs)

    # --- a ragged prefill: right-padded while it runs, then rolled left-padded ----

    def prepare(self, *, left_padding=None, lengths=None, right_padding=None) -> None:
        if left_padding is not None:
            if self.keys is not None:
                raise ValueError("left padding can only be added to an empty cache")
            left_padding = mx.array(left_padding)
            self.left_padding += left_padding
            self.offset = self.offset - left_padding
        if right_padding is not None and max(right_padding) > 0:
            self._right_padding = mx.array(right_padding)

    def finalize(self) -> None:
        if self._right_padding is None:
            return
        shift = self._right_padding[:, None]
        self.keys = tuple(dynamic_roll(x, shift, axis=2) for x in self.keys)
        self.values = tuple(dynamic_roll(x, shift, axis=2) for x in self.values)
        self.offset = self.offset - self._right_padding
        self.left_padding += self._right_padding
        self._right_padding = None

    # --- the batch engine's side ------------------------------------------------

    @property
    def state(self):
        return self.keys, self.values, self.offset, self.left_padding

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self._idx, n)
        self._idx -= n
        self.offset = self.offset - n
        return n

    def size(self) -> int:
        return self._idx

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return sum(x.nbytes for x in (*self.keys, *self.values))

    def filter(self, batch_indices) -> None:
        """Keep these rows, in this order; drop padding every row now has."""
        if self.keys is not None:
            self.keys = tuple(x[batch_indices] for x in self.keys)
            self.values = tuple(x[batch_indices] for x in self.values)
        self.offset = self.offset[batch_indices]
        self.left_padding = self.left_padding[batch_indices]
        shift = min(self.left_padding.tolist())
        if shift > 0:
            if self.keys is not None:
                self.keys = tuple(x[..., shift:, :] for x in self.keys)
                self.values = tuple(x[..., shift:, :] for x in self.values)
            self._idx -= shift
            self.left_padding -= shift

    def extend(self, other: BatchQuantizedKVCache) -> None:
        """Append the other batch's rows, both right-aligned at one index."""
        _same_format(self, other)
        if self.keys is None and other.keys is None:
            self.left_padding = mx.concatenate([self.left_padding, other.left_padding])
            self.offset = mx.concatenate([self.offset, other.offset])
            return
        idx = max(self._idx, other._idx)
        ref = self if self.keys is not None else other
        length = max(c.keys[0].shape[2] for c in (self, other) if c.keys is not None)
        parts = [_aligned(c, ref, idx, length) for c in (self, other)]
        self.keys = tuple(
            mx.concatenate(pair, axis=0) for pair in zip(*(p[0] for p in parts), strict=True)
        )
        self.values = tuple(
            mx.concatenate(pair, axis=0) for pair in zip(*(p[1] for p in parts), strict=True)
        )
        self.offset = mx.concatenate([self.offset, other.offset])
        self.left_padding = mx.concatenate([p[2] for p in parts])
        self._idx = idx

    def extract(self, idx: int) -> SequenceQuantizedKVCache:
        """Row idx alone, without its padding: a finished request's cache."""
        cache = SequenceQuantizedKVCache(group_size=self.group_size, bits=self.kv_bits)
        if self.keys is None:
            return cache
        pad = self.left_padding.tolist()[idx]
        cache.keys = tuple(mx.contiguous(x[idx : idx + 1, :, pad : self._idx]) for x in self.keys)
        cache.values = tuple(
            mx.contiguous(x[idx : idx + 1, :, pad : self._idx]) for x in self.values
        )
        cache.offset = self._idx - pad
        return cache

    @classmethod
    def merge(cls, caches: list[Any]) -> BatchQuantizedKVCache:
        """One batch from one-sequence caches, right-aligned (left-padded)."""
        if not all(isinstance(c, QuantizedKVCache) for c in caches):
            raise ValueError("cannot batch quantized and full-precision KV caches together")
        first = caches[0]
        for c in caches[1:]:
            _same_format(first, c)
        lengths = [c.offset if c.keys is not None else 0 for c in caches]
        longest = max(lengths)
        batch = cls([longest - n for n in lengths], group_size=first.group_size, bits=first.bits)
        if longest == 0:
            return batch
        ref = next(c for c in caches if c.keys is not None)

        def zeros(x: mx.array) -> mx.array:
            return mx.zeros((len(caches), x.shape[1], longest, x.shape[3]), dtype=x.dtype)

        keys = tuple(zeros(x) for x in ref.keys)
        values = tuple(zeros(x) for x in ref.values)
        for i, (n, c) in enumerate(zip(lengths, caches, strict=True)):
            if n == 0:
                continue
            for buffers, parts in ((keys, c.keys), (values, c.values)):
                for buffer, part in zip(buffers, parts, strict=True):
                    buffer[i : i + 1, :, longest - n :] = part[..., :n, :]
        batch.keys, batch.values = keys, values
        batch.offset = batch.offset + longest
        batch._idx = longest
        return batch


def _same_format(a: Any, b: Any) -> None:
    bits_a, bits_b = _bits(a), _bits(b)
    if (bits_a, a.group_size) != (bits_b, b.group_size):
        raise ValueError(
            f"cannot batch KV caches of {bits_a} bits (groups of {a.group_size}) "
            f"with {bits_b} bits (groups of {b.group_size})"
        )


def _bits(cache: Any) -> int:
    return cache.kv_bits if isinstance(cache, BatchQuantizedKVCache) else cache.bits


def _aligned(c: BatchQuantizedKVCache, ref: BatchQuantizedKVCache, idx: int, length: int):
    """c's keys, values and left padding, shifted so its index is `idx` and
    its buffers `length` positions long (the padding added on the left)."""
    rows = c.offset.shape[0]
    keys = c.keys if c.keys is not None else _empty_like(ref.keys, rows)
    values = c.values if c.values is not None else _empty_like(ref.values, rows)
    left = idx - c._idx
    right = length - keys[0].shape[2] - left
    if right < 0:
        keys = tuple(x[..., :right, :] for x in keys)
        values = tuple(x[..., :right, :] for x in values)
        right = 0
    if left or right:
        width = [(0, 0), (0, 0), (left, right), (0, 0)]
        keys = tuple(mx.pad(x, width) for x in keys)
        values = tuple(mx.pad(x, width) for x in values)
    return keys, values, c.left_padding + left
