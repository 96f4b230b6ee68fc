"""Storage: artifacts on a real moto S3 server and on the local filesystem; manifests are the commit point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubealign_jobs import storage
from kubealign_jobs.config import MANIFEST_FILE, StorageSettings
from kubealign_jobs.storage import StorageError


def _make_tree(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text('{"a": 1}')
    (root / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 40)
    return root


@pytest.fixture(params=["s3", "file"])
def base_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "s3":
        bucket = request.getfixturevalue("bucket")
        storage.configure(StorageSettings())
        return f"s3://{bucket}/run/stage"
    return f"file://{tmp_path / 'store'}"


def test_parse_uri_forms() -> None:
    assert storage.parse_uri("s3://b00/k/x").key == "k/x"
    assert storage.parse_uri("file:///tmp/x").path == Path("/tmp/x")
    assert storage.parse_uri("relative/dir").path == Path("relative/dir")
    with pytest.raises(StorageError, match="bucket"):
        storage.parse_uri("s3:///nobucket")
    with pytest.raises(StorageError, match="unsupported scheme 'gs'"):
        storage.parse_uri("gs://bucket/x")


@pytest.mark.parametrize(
    "bucket", ["My_Bucket!", "ab", "a" * 64, "-leading", "trailing-", "UPPER", "has space"]
)
def test_bucket_names_s3_would_refuse_are_refused_naming_the_uri(bucket: str) -> None:
    with pytest.raises(StorageError, match=r"is not an S3 bucket name"):
        storage.parse_uri(f"s3://{bucket}/runs")


@pytest.mark.parametrize("bucket", ["abc", "my.bucket-1", "a" * 63, "0numbers9"])
def test_valid_bucket_names_pass(bucket: str) -> None:
    assert storage.parse_uri(f"s3://{bucket}/runs").bucket == bucket


@pytest.mark.s3
def test_publish_fetch_roundtrip(base_uri: str, tmp_path: Path) -> None:
    src = _make_tree(tmp_path / "src")
    uri = storage.join(base_uri, "artifact")
    assert not storage.is_complete(uri)
    manifest = storage.publish_dir(src, uri, metadata={"step": 3})
    assert {f.path for f in manifest.files} == {"config.json", "sub/weights.bin"}
    assert storage.is_complete(uri)
    assert storage.read_manifest(uri) == manifest
    local = storage.fetch_dir(uri, tmp_path / "dest", require_manifest=True)
    assert (local / "sub" / "weights.bin").read_bytes() == (src / "sub" / "weights.bin").read_bytes()
    assert storage.list_prefixes(base_uri) == [uri]


@pytest.mark.s3
def test_prefix_without_manifest_is_not_an_artifact(base_uri: str, tmp_path: Path) -> None:
    uri = storage.join(base_uri, "partial")
    storage.write_text(storage.join(uri, "config.json"), "{}")
    assert not storage.is_complete(uri)
    with pytest.raises(StorageError, match="not a complete artifact"):
        storage.fetch_dir(uri, tmp_path / "dest", require_manifest=True)
    # A later publish clears the leftovers: the manifest describes exactly what is there.
    src = _make_tree(tmp_path / "src")
    storage.publish_dir(src, uri)
    assert storage.is_complete(uri)


@pytest.mark.s3
def test_corrupt_file_is_detected(base_uri: str, tmp_path: Path) -> None:
    uri = storage.join(base_uri, "artifact")
    storage.publish_dir(_make_tree(tmp_path / "src"), uri)
    # Same size, different content: only the checksum can tell.
    storage.write_bytes(storage.join(uri, "config.json"), b'{"a": 2}')
    assert storage.is_complete(uri)
    with pytest.raises(StorageError, match=r"config\.json: checksum mismatch"):
        storage.fetch_dir(uri, tmp_path / "dest")
    storage.write_bytes(storage.join(uri, "config.json"), b"{}")
    assert not storage.is_complete(uri)


@pytest.mark.s3
def test_unreadable_manifest_is_not_complete(base_uri: str, tmp_path: Path) -> None:
    uri = storage.join(base_uri, "artifact")
    storage.publish_dir(_make_tree(tmp_path / "src"), uri)
    storage.write_text(storage.join(uri, MANIFEST_FILE), '{"format": "kubealign-manifest/v1", "fi')
    assert not storage.is_complete(uri)
    with pytest.raises(StorageError, match="invalid manifest"):
        storage.fetch_dir(uri, tmp_path / "dest")


@pytest.mark.s3
def test_complete_artifact_is_never_replaced_by_default(base_uri: str, tmp_path: Path) -> None:
    uri = storage.join(base_uri, "artifact")
    storage.publish_dir(_make_tree(tmp_path / "src"), uri)
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("new")
    with pytest.raises(StorageError, match="already there"):
        storage.publish_dir(other, uri)
    assert storage.is_complete(uri)
    storage.publish_dir(other, uri, overwrite=True)
    assert [f.path for f in storage.read_manifest(uri).files] == ["x.txt"]  # type: ignore[union-attr]
    assert [path for path, _ in storage.list_files(uri)] == [MANIFEST_FILE, "x.txt"]


@pytest.mark.s3
def test_delete_prefix_and_small_objects(base_uri: str, tmp_path: Path) -> None:
    uri = storage.join(base_uri, "artifact")
    storage.publish_dir(_make_tree(tmp_path / "src"), uri)
    storage.write_json(storage.join(base_uri, "metrics.json"), {"loss": 1.5})
    assert storage.read_json(storage.join(base_uri, "metrics.json")) == {"loss": 1.5}
    assert storage.exists(storage.join(base_uri, "metrics.json"))
    storage.delete_prefix(uri)
    assert not storage.is_complete(uri)
    assert storage.list_files(uri) == []
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(uri, "config.json"))


@pytest.mark.s3
def test_multipart_upload_and_download(bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # S3's smallest part is 5 MiB; lower the threshold so an 11 MiB file goes up in three parts.
    monkeypatch.setattr(storage, "_MULTIPART_BYTES", 5 * 1024 * 1024)
    storage.configure(StorageSettings())
    src = tmp_path / "src"
    src.mkdir()
    payload = bytes(range(251)) * (11 * 1024 * 1024 // 251)
    (src / "big.bin").write_bytes(payload)
    uri = f"s3://{bucket}/big"
    storage.publish_dir(src, uri)
    head = storage._s3().head_object(Bucket=bucket, Key="big/big.bin")
    assert head["ETag"].strip('"').endswith("-3")  # a multipart ETag carries the part count
    local = storage.fetch_dir(uri, tmp_path / "dest")
    assert (local / "big.bin").read_bytes() == payload


@pytest.mark.s3
def test_fetch_single_object_and_missing(bucket: str, tmp_path: Path) -> None:
    storage.configure(StorageSettings())
    uri = f"s3://{bucket}/data/train.jsonl"
    storage.write_text(uri, json.dumps({"text": "hi"}) + "\n")
    path = storage.fetch(uri, tmp_path)
    assert path.read_text().startswith('{"text"')
    with pytest.raises(StorageError, match="no such file, object or prefix"):
        storage.fetch(f"s3://{bucket}/nothing", tmp_path)


def test_local_publish_is_a_rename(tmp_path: Path) -> None:
    target = tmp_path / "out" / "artifact"
    storage.publish_dir(_make_tree(tmp_path / "src"), str(target))
    assert (target / MANIFEST_FILE).is_file()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["artifact"]  # no temp dirs left
    # Local artifacts are verified in place, never copied.
    assert storage.fetch_dir(str(target), tmp_path / "unused") == target
