"""End to end: the agent CLIs people point at a local server, unmodified.

Claude Code (`claude -p`, Anthropic's Messages API) and Codex (`codex exec`,
OpenAI's Responses API) run a prompt to completion against a real gateway
with real workers, with no network beyond loopback. Their prompts are tens of
thousands of tokens (Claude Code's first request alone is over 100 KB), so
the gateway serves the `tiny-long` demo model, whose context holds them. Its
workers run the whole model on every prompt, but the reply is scripted (the
`script` fault replaces only the sampler): a random model may end its reply
at its first token, and an agent then has nothing to show.
Each test skips when its CLI is not installed; `.ci/run` installs both.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from worker import demo

from .conftest import MODEL_NAME, Gateway
from .test_robustness import faulty_python

CLAUDE = shutil.which("claude")
CODEX = shutil.which("codex")
INSTALL = "npm i -g @anthropic-ai/claude-code @openai/codex (.ci/run does)"
TIMEOUT = 300  # generous: a 90,000-token prefill on a busy CPU


REPLY = "Hi! How can I help you today?"


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    if not (CLAUDE or CODEX):
        pytest.skip(f"neither Claude Code nor Codex is installed: {INSTALL}")
    model = demo.ensure("tiny-long")  # built once, cached across runs
    tmp = tmp_path_factory.mktemp("clis")
    gw = Gateway(
        model,
        "--alias",
        f"claude-*={MODEL_NAME}",
        "--access-log",  # what each client sent, should a run fail
        "--worker-python",
        faulty_python(tmp, "script"),
        env={"SCRIPT_TEXT": REPLY},
        log=tmp / "gateway.log",
    )
    gw.wait_ready()
    yield gw
    gw.stop()


def run(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run(
        args,
        cwd=cwd,
        env={**os.environ, **env},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, (
        f"{args[:2]} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    )
    return done


@pytest.mark.skipif(not CLAUDE, reason=f"Claude Code is not installed: {INSTALL}")
def test_claude_code_two_turns_and_the_second_reads_the_prompt_cache(gw, tmp_path):
    env = {
        "HOME": str(tmp_path),  # a fresh Claude Code profile
        "ANTHROPIC_BASE_URL": gw.url,
        "ANTHROPIC_API_KEY": "unused",
        "DISABLE_TELEMETRY": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
    }
    args = [CLAUDE, "-p", "--model", "claude-sonnet-4-5", "--output-format", "json"]
    first = json.loads(run([*args, "Say hi"], tmp_path, env).stdout.strip().splitlines()[-1])
    assert first["subtype"] == "success" and not first["is_error"], first
    assert first["result"] == REPLY, first
    second = json.loads(
        run([*args, "--continue", "Say more"], tmp_path, env).stdout.strip().splitlines()[-1]
    )
    assert second["subtype"] == "success" and not second["is_error"], second
    usage = second["usage"]
    prompt = usage["input_tokens"] + usage["cache_read_input_tokens"]
    assert prompt > 20_000, usage  # its whole system prompt and tool schemas
    # The first turn's prompt came from the worker's prompt cache.
    assert usage["cache_read_input_tokens"] > 0.9 * prompt, usage


@pytest.mark.skipif(not CODEX, reason=f"Codex is not installed: {INSTALL}")
def test_codex_exec_runs_a_prompt_to_completion(gw, tmp_path):
    home = tmp_path / "codex-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'model = "{MODEL_NAME}"\n'
        'model_provider = "gateway"\n\n'
        "[model_providers.gateway]\n"
        'name = "mlx-gateway"\n'
        f'base_url = "{gw.url}/v1"\n'
        'wire_api = "responses"\n'
        'env_key = "GATEWAY_KEY"\n'
    )
    env = {"CODEX_HOME": str(home), "GATEWAY_KEY": "unused", "HOME": str(tmp_path)}
    done = run([CODEX, "exec", "--skip-git-repo-check", "--json", "Say hi"], tmp_path, env)
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    kinds = [e["type"] for e in events]
    assert "turn.completed" in kinds and "turn.failed" not in kinds, done.stdout
    messages = [
        e["item"]["text"]
        for e in events
        if e["type"] == "item.completed" and e["item"]["type"] == "agent_message"
    ]
    assert messages and messages[-1] == REPLY, done.stdout
    usage = next(e for e in events if e["type"] == "turn.completed")["usage"]
    assert usage["input_tokens"] > 5_000, usage  # its instructions and tool schemas
