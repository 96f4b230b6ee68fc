"""Trainer-test fixtures: every test starts with a fresh S3 client in `kubealign_jobs.storage`."""

from __future__ import annotations

import pytest

from kubealign_jobs import storage
from kubealign_jobs.config import StorageSettings


@pytest.fixture(autouse=True)
def fresh_storage_client() -> None:
    """The storage module caches one boto3 client per process; drop it so it sees this test's env."""
    storage.configure(StorageSettings())
