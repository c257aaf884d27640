"""The catalogue (what --models-dir and --models-hf-cache offer) and the flags
of models loaded on demand, without any process."""

from __future__ import annotations

import os

import pytest

from gateway import catalogue, cli
from gateway.config import parse_duration

from .test_cli import parse


def model_dir(path, weights: int = 1000):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"\0" * weights)
    return path


def test_a_models_dir_offers_model_directories_owner_name_layouts_and_gguf_files(tmp_path):
    model_dir(tmp_path / "llama", 1000)
    model_dir(tmp_path / "mlx-community" / "Qwen3-0.6B-4bit", 2000)
    (tmp_path / "smol.Q4_1.gguf").write_bytes(b"GGUF" + b"\0" * 96)
    (tmp_path / "notes").mkdir()  # no config.json: not a model
    (tmp_path / "notes" / "readme.txt").write_text("x")
    (tmp_path / "weights.bin").write_bytes(b"\0")  # not a format resolve() takes
    model_dir(tmp_path / ".hidden")
    entries = catalogue.scan([str(tmp_path)])
    assert sorted(entries) == ["llama", "mlx-community/Qwen3-0.6B-4bit", "smol.Q4_1"]
    assert entries["llama"].size_bytes == 1002 and entries["llama"].format == "mlx"
    assert entries["llama"].source == str((tmp_path / "llama").resolve())
    assert entries["mlx-community/Qwen3-0.6B-4bit"].size_bytes == 2002
    gguf = entries["smol.Q4_1"]
    assert gguf.format == "gguf" and gguf.size_bytes == 100
    assert gguf.source.endswith("smol.Q4_1.gguf")


def test_the_first_of_two_models_with_one_name_wins(tmp_path):
    model_dir(tmp_path / "one" / "m", 10)
    model_dir(tmp_path / "two" / "m", 20)
    entries = catalogue.scan([str(tmp_path / "one"), str(tmp_path / "two")])
    assert entries["m"].size_bytes == 12
    assert catalogue.scan([str(tmp_path / "missing")]) == {}


def test_the_hugging_face_cache_offers_the_snapshot_main_names(tmp_path, monkeypatch):
    repo = tmp_path / "models--mlx-community--SmolLM2-135M"
    blob = tmp_path / "blob"
    blob.write_bytes(b"\0" * 500)
    old = model_dir(repo / "snapshots" / "aaa")
    new = repo / "snapshots" / "bbb"
    new.mkdir()
    (new / "config.json").write_text("{}")
    os.symlink(blob, new / "model.safetensors")  # the hub links files to blobs
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("bbb\n")
    (tmp_path / "datasets--x--y").mkdir()
    monkeypatch.setattr(catalogue, "hf_cache_dir", lambda: tmp_path)
    entries = catalogue.scan([], hf_cache=True)
    assert list(entries) == ["mlx-community/SmolLM2-135M"]
    entry = entries["mlx-community/SmolLM2-135M"]
    assert entry.source == str(new.resolve()) != str(old.resolve())
    assert entry.size_bytes == 502


def test_durations():
    assert parse_duration(300) == 300.0
    assert parse_duration("90s") == 90.0 and parse_duration("5m") == 300.0
    assert parse_duration("1.5h") == 5400.0 and parse_duration("250ms") == 0.25
    assert parse_duration(-1) == -1.0 and parse_duration("-5m") == -1.0
    for bad in ("soon", "5 days", "", "inf", float("nan")):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_many_models_flags(tmp_path):
    args = parse(
        "--models-dir",
        str(tmp_path),
        "--keep-alive",
        "10m",
        "--max-loaded-models",
        "2",
        "--memory-budget",
        "8000",
        "--pin",
        "a",
        "--alias",
        "fast=small-model",
    )
    many = cli.many_models(args, [str(tmp_path)])
    assert many["keep_alive"] == 600.0 and many["max_loaded_models"] == 2
    assert many["memory_budget_mb"] == 8000.0 and many["pins"] == ["a"]
    assert many["aliases"] == {"fast": "small-model"}
    args = parse(env={"MLX_GATEWAY_KEEP_ALIVE": "-1", "MLX_GATEWAY_PIN": "a,b"})
    assert args.keep_alive == -1.0 and args.pin_env == ["a", "b"]
    assert parse().keep_alive == 300.0
    for argv, message in [
        (["--max-loaded-models", "0"], "at least 1"),
        (["--memory-budget", "-5"], "more than 0"),
        (["--alias", "nothing"], "ALIAS=MODEL"),
    ]:
        with pytest.raises(ValueError, match=message):
            cli.many_models(parse(*argv), [])
    with pytest.raises(ValueError, match="not a directory"):
        cli.many_models(parse(), [str(tmp_path / "missing")])
