"""Shared pytest configuration for the whole suite."""

from __future__ import annotations

import os

from hypothesis import settings

# One profile for every run, local or CI: no deadline (a shared machine's timing is noisy, and a
# slow example is not a failure) and enough examples to reach the C kernel's edge cases.
# HYPOTHESIS_PROFILE selects another registered profile (e.g. "default") when needed.
settings.register_profile("ci", deadline=None, max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# --- a real kvmtagd, one per test session and configuration -----------------------------------

import contextlib  # noqa: E402 - fixture helpers below the Hypothesis setup
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@contextlib.contextmanager
def running_kvmtagd(
    directory: Path, *args: str, code: str | None = None
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """Start `python -m kvmtag` on a socket in `directory`; yield (socket path, process) once
    the socket exists (kvmtagd renames it into place only when listening); stop it after.
    With `code`, run `python -c code` instead: a wrapper that prepares the process (a fault
    to inject, a limit) and then calls kvmtag.daemon.main(sys.argv[1:])."""
    path = directory / "kvm.sock"
    log = (directory / "kvmtagd.log").open("w")
    launcher = [sys.executable, "-m", "kvmtag"] if code is None else [sys.executable, "-c", code]
    proc = subprocess.Popen(
        [*launcher, "--socket-path", str(path), "-v", *args],
        stdout=log, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not path.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                log_text = (directory / "kvmtagd.log").read_text()
                raise RuntimeError(f"kvmtagd did not start: {log_text}")
            time.sleep(0.01)
        yield str(path), proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="session")
def kvmtagd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The socket path of a kvmtagd with the default configuration."""
    with running_kvmtagd(tmp_path_factory.mktemp("kvmtagd")) as (path, _):
        yield path


@pytest.fixture(scope="session")
def file_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A directory on a disk filesystem, for mappings of "ordinary files"."""
    return str(tmp_path_factory.mktemp("files"))


class Daemons:
    """kvmtagd processes by configuration, started on first use and shared by the session."""

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        self._factory = factory
        self._stack = contextlib.ExitStack()
        self._paths: dict[tuple[str, int], str] = {}

    def socket(self, profile: str = "latest", page_size: int = 4096) -> str:
        key = (profile, page_size)
        if key not in self._paths:
            directory = self._factory.mktemp(f"kvmtagd-{profile}-{page_size}")
            path, _ = self._stack.enter_context(running_kvmtagd(
                directory, "--kernel", profile, "--page-size", str(page_size)
            ))  # fmt: skip
            self._paths[key] = path
        return self._paths[key]

    def close(self) -> None:
        self._stack.close()


@pytest.fixture(scope="session")
def daemons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemons]:
    d = Daemons(tmp_path_factory)
    yield d
    d.close()
