"""Smoke test of the moto S3 server fixture: a multi-part round trip, and the env contract that
lets subprocesses (trainers) reach the same server with no arguments."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest
from boto3.s3.transfer import TransferConfig

pytestmark = pytest.mark.s3

PART = 5 * 2**20  # S3's minimum size for every part but the last


def test_a_multipart_object_round_trips_intact(s3: Any, bucket: str) -> None:
    payload = os.urandom(2 * PART + 12345)
    config = TransferConfig(multipart_threshold=PART, multipart_chunksize=PART)

    s3.upload_fileobj(io.BytesIO(payload), bucket, "weights/model.bin", Config=config)
    downloaded = io.BytesIO()
    s3.download_fileobj(bucket, "weights/model.bin", downloaded, Config=config)

    head = s3.head_object(Bucket=bucket, Key="weights/model.bin")
    # A multi-part ETag ends in -<number of parts>.
    assert head["ETag"].strip('"').endswith("-3")
    assert head["ContentLength"] == len(payload)
    assert hashlib.sha256(downloaded.getvalue()).hexdigest() == hashlib.sha256(payload).hexdigest()


def test_a_subprocess_reaches_the_server_from_the_environment_alone(s3: Any, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key="hello.txt", Body=b"from the parent")
    script = textwrap.dedent(
        f"""
        import boto3
        body = boto3.client("s3").get_object(Bucket={bucket!r}, Key="hello.txt")["Body"].read()
        print(body.decode())
        """
    )

    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "from the parent"
