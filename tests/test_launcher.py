"""How workers are placed and started (gateway/launcher.py), without starting any."""

from __future__ import annotations

import logging

import pytest

from gateway.cli import build_parser
from gateway.launcher import (
    GroupLauncher,
    Host,
    LocalLauncher,
    SpawnOptions,
    SshLauncher,
    make_launchers,
    parse_host,
    ssh_argv,
)

OPTIONS = SpawnOptions(
    python="/venv/bin/python",
    remote_python="env A=1 /opt/venv/bin/python",
    ssh_command="ssh -i /k/id -p 2222",
    log_level="info",
)


def test_hosts_parse_with_an_optional_ring_address():
    assert parse_host("local") == Host("local")
    assert parse_host(" me@mini.lan=10.0.0.2 ") == Host("me@mini.lan", "10.0.0.2")
    assert parse_host("127.0.0.1").local and not parse_host("me@127.0.0.1").local
    assert Host("local", "10.0.0.1").ring_address() == "10.0.0.1"
    assert Host("me@127.0.0.1").ring_address() == "127.0.0.1"
    with pytest.raises(ValueError, match="IP"):
        Host("nobody@no-such-host.invalid").ring_address()
    with pytest.raises(ValueError):
        parse_host(" ")


def test_the_ssh_command_keeps_the_users_options_first_and_execs_the_remote_python():
    argv = ssh_argv(Host("me@mini"), OPTIONS, ["-m", "worker", "--log-level", "info"])
    assert argv[:5] == ["ssh", "-i", "/k/id", "-p", "2222"]
    assert "-T" in argv and "BatchMode=yes" in argv
    assert argv[-2] == "me@mini"
    assert (
        argv[-1]
        == "PYTHONUNBUFFERED=1 exec env A=1 /opt/venv/bin/python -m worker --log-level info"
    )


def test_workers_per_host_and_groups_of_ranks():
    launchers = make_launchers(OPTIONS, hosts=[Host("local"), Host("me@mini")], workers=2)
    assert [type(x) for x in launchers] == [LocalLauncher] * 2 + [SshLauncher] * 2
    assert [x.host.label for x in launchers] == ["local", "local", "me@mini", "me@mini"]

    groups = make_launchers(OPTIONS, hosts=[], workers=2, shard=2)
    assert all(isinstance(g, GroupLauncher) and g.ranks == 2 for g in groups)
    assert all(g.port == 0 for g in groups)  # all local: free ports at each start
    ring, schedule = groups[0]._ring()
    assert len(ring) == 2 and all(r[0].startswith("127.0.0.1:") for r in ring)
    assert schedule.startswith("127.0.0.1:") and [schedule] not in ring

    remote = make_launchers(
        OPTIONS,
        hosts=[],
        workers=2,
        shard=2,
        shard_hosts=[Host("local", "10.0.0.1"), Host("me@mini", "10.0.0.2")],
    )
    # Each group gets its own run of ports, so two groups never collide.
    assert [g._ring() for g in remote] == [
        ([["10.0.0.1:32323"], ["10.0.0.2:32324"]], "10.0.0.1:32325"),
        ([["10.0.0.1:32326"], ["10.0.0.2:32327"]], "10.0.0.1:32328"),
    ]
    with pytest.raises(ValueError, match="needs 2"):
        make_launchers(OPTIONS, hosts=[], workers=1, shard=2, shard_hosts=[Host("local")])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--shard", "2", "--shard-hosts", "local"], "needs 2 --shard-hosts"),
        (["--shard", "0"], "--shard must be 1 or more"),
        (["--shard", "2", "--worker-host", "me@mini"], "use --shard-hosts"),
        (["--shard-backend", "jaccl"], "only ring"),
    ],
)
def test_bad_placement_flags_exit_2_with_a_clear_message(
    tiny_model, flags, message, capsys, monkeypatch
):
    # serve() points the root logger at the captured stderr; the next tests'
    # records must not go to that closed stream.
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    args = build_parser().parse_args(["serve", "--model", str(tiny_model), *flags])
    assert args.func(args) == 2  # refused before anything starts
    assert message in capsys.readouterr().err
