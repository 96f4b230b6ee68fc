"""Fixtures for the local-runner tests (helpers in runner_toys.py)."""

from __future__ import annotations

import pytest

from tests.local.runner_toys import Workspace, make_workspace


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    """A folder with a tiny base model and SFT rows that the tests' manifests refer to."""
    return make_workspace(tmp_path_factory.mktemp("local-runner"))
