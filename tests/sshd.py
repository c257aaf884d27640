"""A throwaway OpenSSH server on 127.0.0.1 for tests of remote workers.

It runs as the current user on a free port with a host key and a user key
made in a temporary directory; nothing outside that directory is read or
changed (but sshd's privilege separation directory, which a system that has
sshd normally has). The test skips, saying why, when sshd or ssh is missing.
"""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
from pathlib import Path

import psutil
import pytest

from .helpers import wait_until

SSHD_PATHS = ("/usr/sbin/sshd", "/usr/local/sbin/sshd", "/opt/homebrew/sbin/sshd")


def _sshd_binary() -> str | None:
    found = shutil.which("sshd")
    return found or next((p for p in SSHD_PATHS if os.path.exists(p)), None)


class SshServer:
    def __init__(self, root: Path, port: int):
        sshd, ssh = _sshd_binary(), shutil.which("ssh")
        if sshd is None or ssh is None or shutil.which("ssh-keygen") is None:
            pytest.skip("OpenSSH (sshd, ssh, ssh-keygen) is not installed")
        if os.geteuid() == 0 and not os.path.isdir("/run/sshd"):
            try:
                os.makedirs("/run/sshd", mode=0o755)  # sshd's privilege separation dir
            except OSError as exc:
                pytest.skip(f"sshd needs /run/sshd: {exc}")
        self.root = root
        self.port = port
        self.user = getpass.getuser()
        for name in ("host_key", "user_key"):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / name)],
                check=True,
            )
        (root / "authorized_keys").write_bytes((root / "user_key.pub").read_bytes())
        config = root / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"Port {port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {root / 'host_key'}",
                    f"PidFile {root / 'sshd.pid'}",
                    f"AuthorizedKeysFile {root / 'authorized_keys'}",
                    "StrictModes no",
                    "UsePAM no",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PubkeyAuthentication yes",
                    "PermitRootLogin prohibit-password",
                    "",
                ]
            )
        )
        self.log_path = root / "sshd.log"
        self.proc = subprocess.Popen(
            [sshd, "-D", "-e", "-f", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.log_path, "wb"),  # noqa: SIM115
        )
        self.command = " ".join(
            [
                "ssh",
                "-F /dev/null",
                f"-i {root / 'user_key'}",
                f"-p {port}",
                "-o StrictHostKeyChecking=no",
                "-o UserKnownHostsFile=/dev/null",
                "-o LogLevel=ERROR",
            ]
        )
        self.dest = f"{self.user}@127.0.0.1"
        wait_until(self._answers, 20, "sshd to accept logins", interval=0.2)

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            pytest.skip(f"sshd did not start: {self.log_path.read_text(errors='replace')}")
        done = subprocess.run(
            [*self.command.split(), "-o", "BatchMode=yes", self.dest, "true"],
            capture_output=True,
            timeout=20,
        )
        return done.returncode == 0

    def sessions(self) -> list[psutil.Process]:
        """Everything running under this sshd (the remote side of sessions)."""
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def workers(self, *, ranks: bool | None = None) -> list[psutil.Process]:
        """The `python -m worker` processes its sessions run (only the ranks of
        sharded workers with ranks=True, only the others with ranks=False)."""
        found = []
        for p in self.sessions():
            try:
                cmd = p.cmdline()
            except psutil.NoSuchProcess:
                continue
            if "worker" in cmd and "-m" in cmd and ranks in (None, "--rank" in cmd):
                found.append(p)
        return found

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
