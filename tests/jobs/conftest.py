"""Fixtures for the trainer tests: an S3 bucket on a moto server (until tests/conftest.py provides one)."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator

import pytest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def jobs_s3_endpoint() -> Iterator[str]:
    """A moto S3 server over HTTP on 127.0.0.1; the AWS_* env is set so subprocesses inherit it."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def jobs_bucket(jobs_s3_endpoint: str) -> str:
    """A fresh, empty bucket."""
    import boto3

    name = f"kubealign-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=jobs_s3_endpoint).create_bucket(Bucket=name)
    return name
