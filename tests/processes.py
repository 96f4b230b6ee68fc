"""Background server processes for tests: wait until one is ready, always stop it afterwards; and
the polling wait every test that watches something asynchronous uses."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


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
