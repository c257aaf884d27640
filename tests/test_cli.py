"""The command line: flags, environment variables and model sources."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from gateway import checkpoints, cli

from .conftest import ROOT


def parse(*argv: str, env: dict | None = None):
    old = dict(os.environ)
    try:
        os.environ.update(env or {})
        return cli.build_parser().parse_args(["serve", *argv])
    finally:
        os.environ.clear()
        os.environ.update(old)


def serve_actions():
    parser = cli.build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]
    return [a for a in serve._actions if a.option_strings and a.dest != "help"]


# Flags whose values are checked by a type of their own: a valid sample each.
TYPED_SAMPLES = {
    "--log-format": ("json", "json"),
    "--keep-alive": ("90s", 90.0),
    "--blas-threads": ("3", 3),
}


def test_every_serve_flag_has_an_environment_variable():
    """Each flag, set through its documented variable (named here by the
    README's rule, not by the code under test), takes the variable's value."""
    for action in serve_actions():
        flag = action.option_strings[0]
        var = "MLX_GATEWAY_" + flag.removeprefix("--").upper().replace("-", "_")
        if isinstance(action, argparse.BooleanOptionalAction):
            raw, attr, expected = "true", action.dest, True
        elif action.nargs is None and isinstance(action, argparse._AppendAction):
            raw, attr, expected = "a,b", action.dest + "_env", ["a", "b"]
        elif action.type is int:
            raw, attr, expected = "7", action.dest, 7
        elif action.type is float:
            raw, attr, expected = "7.5", action.dest, 7.5
        elif flag in TYPED_SAMPLES:
            raw, expected = TYPED_SAMPLES[flag]
            attr = action.dest
        else:
            raw, attr, expected = "some-value", action.dest, "some-value"
        args = parse(env={var: raw})
        assert getattr(args, attr) == expected, (flag, var)


def test_every_serve_flag_is_in_the_readme_configuration_table():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Configuration") : readme.index("## How it works")]
    for action in serve_actions():
        assert f"`{action.option_strings[0]}`" in table, action.option_strings[0]


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("MLX_GATEWAY_LOG_FORMAT", "xml", "--log-format must be one of text, json"),
        (
            "MLX_GATEWAY_FLOAT_WEIGHTS",
            "fast",
            "--float-weights must be one of auto, always, never, not 'fast'",
        ),
    ],
)
def test_a_bad_choice_from_the_environment_is_a_clear_error(var, value, message):
    """argparse checks choices on the command line only; serve checks the
    environment's before it starts anything."""
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--model", "demo:tiny"],
        cwd=ROOT,
        env={**os.environ, var: value},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_environment_sets_defaults_and_flags_win():
    args = parse(
        env={
            "MLX_GATEWAY_WORKERS": "3",
            "MLX_GATEWAY_PORT": "9001",
            "MLX_GATEWAY_MODEL": "a=/x,b=/y",
            "MLX_GATEWAY_ACCESS_LOG": "true",
        }
    )
    assert args.workers == 3 and args.port == 9001 and args.access_log is True
    assert args.model is None and args.model_env == ["a=/x", "b=/y"]
    args = parse("--workers", "5", "--model", "/z", env={"MLX_GATEWAY_WORKERS": "3"})
    assert args.workers == 5 and args.model == ["/z"]


def test_a_bad_environment_value_exits_2_naming_the_variable(capsys):
    with pytest.raises(SystemExit) as exit:
        parse(env={"MLX_GATEWAY_PORT": "eighty"})
    assert exit.value.code == 2
    assert "MLX_GATEWAY_PORT='eighty' is not valid" in capsys.readouterr().err


def test_defaults():
    args = parse()
    assert (args.host, args.port, args.workers, args.log_level) == ("127.0.0.1", 8000, 1, "info")


def test_resolve_local_directory_and_names(tiny_model):
    spec = checkpoints.resolve(str(tiny_model))
    assert spec.name == tiny_model.name and spec.path == str(tiny_model)
    named = checkpoints.resolve(f"chat={tiny_model}")
    assert named.name == "chat" and named.path == str(tiny_model)


def test_resolve_errors_are_clear(tmp_path):
    with pytest.raises(checkpoints.ModelSourceError, match=r"no config\.json"):
        checkpoints.resolve(str(tmp_path))
    with pytest.raises(checkpoints.ModelSourceError, match="neither an existing directory"):
        checkpoints.resolve("./no/such/dir")
    with pytest.raises(checkpoints.ModelSourceError, match="unknown demo preset"):
        checkpoints.resolve("demo:huge")


def test_hugging_face_id_without_network_fails_with_a_clear_message(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--model", "mlx-community/not-downloaded-4bit"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert (
        "could not fetch 'mlx-community/not-downloaded-4bit' from the Hugging Face Hub"
        in out.stderr
    )
    assert "Traceback" not in out.stderr


def test_missing_model_directory_exits_2(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--model", str(tmp_path / "nope")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "error:" in out.stderr


def test_console_script_and_module_share_the_cli():
    for cmd in (
        [sys.executable, "-m", "gateway", "--help"],
        [os.path.join(os.path.dirname(sys.executable), "mlx-gateway"), "serve", "--help"],
    ):
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0
        assert "serve" in out.stdout


def test_serve_help_lists_every_model_form_and_its_served_id():
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0
    forms = out.stdout.partition("model forms")[2]
    for form, served in [
        ("smollm2", "-> smollm2"),
        ("demo[:PRESET]", "-> mlx-gateway-demo"),
        ("PATH.gguf", "-> the file's stem"),
        ("ollama:NAME[:TAG]", "-> NAME[:TAG]"),
        ("DIR", "-> the directory's name"),
        ("OWNER/NAME", "-> OWNER/NAME"),
        ("NAME=", "choose another"),
    ]:
        assert form in forms and served in forms, form
    assert "tiny-endless" in forms  # the demo presets are named
