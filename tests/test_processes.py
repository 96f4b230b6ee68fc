"""The background-process helper: it fails with the log of a process that dies, and always stops it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.processes import serving


def _start(code: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT)


def test_a_process_that_dies_fails_with_its_log(tmp_path: Path) -> None:
    log = tmp_path / "log"
    process = _start("print('bad flag'); raise SystemExit(3)", log)
    with (
        pytest.raises(pytest.fail.Exception, match=r"toy did not start; its log:\nbad flag"),
        serving(process, ready=lambda: False, what="toy", log=log, start_timeout=30, stop_timeout=5),
    ):
        pass
    assert process.returncode == 3


def test_a_ready_process_is_stopped_afterwards(tmp_path: Path) -> None:
    log = tmp_path / "log"
    process = _start("import time; print('up', flush=True); time.sleep(60)", log)
    with serving(
        process, ready=lambda: "up" in log.read_text(), what="toy", log=log, start_timeout=30, stop_timeout=5
    ):
        assert process.poll() is None
    assert process.returncode is not None
