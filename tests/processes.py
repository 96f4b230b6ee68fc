"""Background server processes for tests: a free port, a readiness probe, wait until one is ready,
always stop it afterwards; and the polling wait every test that watches something asynchronous uses."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def answers(url: str) -> bool:
    """Whether ``url`` answers 200 within a second: the readiness check of a server under test."""
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            code: int = response.status
    except (urllib.error.URLError, OSError):
        return False
    return code == 200


@contextlib.contextmanager
def serving(
    process: subprocess.Popen[bytes] | subprocess.Popen[str],
    *,
    ready: Callable[[], bool],
    what: str,
    log: Path,
    start_timeout: float,
    stop_timeout: float,
    poll: float = 0.1,
) -> Iterator[None]:
    """Yield once ``ready()`` holds; fail with the process's log if it dies or times out first.

    On exit the process gets SIGTERM and ``stop_timeout`` seconds to finish, then SIGKILL.
    """
    try:
        deadline = time.monotonic() + start_timeout
        while not ready():
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{what} did not start; its log:\n{log.read_text()}", pytrace=False)
            time.sleep(poll)
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=stop_timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until(what: str, check: Callable[[], Any], *, timeout: float = 60, interval: float = 0.1) -> Any:
    """Poll until ``check()`` returns something truthy, and return it."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
