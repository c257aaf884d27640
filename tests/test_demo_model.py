"""The built-in demo model: deterministic, offline, and a real mlx-lm checkpoint."""

from __future__ import annotations

import hashlib
import json

from mlx_lm import load

from worker import demo


def digest(path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_build_is_deterministic(tmp_path, tiny_model):
    again = demo.build(tmp_path / "again", preset="tiny", seed=0)
    assert digest(again) == digest(tiny_model)
    other = demo.build(tmp_path / "other", preset="tiny", seed=1)
    assert digest(other) != digest(tiny_model)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (again / name).read_text() == (tiny_model / name).read_text()


def test_loads_with_mlx_lm_and_chats(tiny_model):
    _, tokenizer = load(str(tiny_model))
    config = json.loads((tiny_model / "config.json").read_text())
    assert config["model_type"] == "llama"
    ids = tokenizer.apply_chat_template(
        [
            {"role": "system", "content": "be kind"},
            {"role": "user", "content": "the river is cold"},
        ],
        add_generation_prompt=True,
    )
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[0] == "<|system|>" and tokens[-1] == "<|assistant|>"
    assert "\u2581river" in tokens
    assert (
        tokenizer.decode(tokenizer.encode("the river is cold", add_special_tokens=False))
        == "the river is cold"
    )
    assert tokenizer.eos_token_ids == {demo.vocabulary().index(demo.END_TOKEN)}


def test_vocabulary_is_words_and_characters():
    vocab = demo.vocabulary()
    assert len(vocab) == len(set(vocab))
    words = [t for t in vocab if t.startswith(demo.SPACE) and len(t) > 1]
    assert len(words) > 900
    assert all(chr(c) in vocab for c in range(33, 127))  # any JSON can be spelled


def test_ensure_caches_once(tmp_path):
    first = demo.ensure("tiny", cache_dir=tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    second = demo.ensure("tiny", cache_dir=tmp_path)
    assert first == second
    assert (second / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no staging leftovers
