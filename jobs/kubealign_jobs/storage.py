"""Object storage for stage inputs and outputs: ``s3://`` through boto3, ``file://`` and plain paths.

An *artifact* is a prefix (an S3 key prefix or a local directory) holding files and a
``_MANIFEST.json`` that lists every file with its size and SHA-256. The manifest is written
last, so it is the commit point: a prefix without a valid manifest is not an artifact, and a
reader never mistakes a half-uploaded checkpoint for a finished one.

- ``publish_dir(src, uri)`` uploads a local directory as an artifact. On S3, which has no
  rename, the files go directly under ``uri`` and the manifest follows them; copying from a
  temporary prefix would double the transfer for the same guarantee. Locally, the directory
  is assembled under a hidden temporary name next to the target and renamed into place.
- ``fetch_dir(uri, dest)`` downloads an artifact (or any prefix) and verifies the manifest's
  sizes and checksums when there is one.
- ``is_complete(uri)`` is the cheap check: the manifest parses and every file it lists exists
  with the listed size.

S3 endpoint: ``StorageSettings.endpoint`` (from the stage config), else ``AWS_ENDPOINT_URL``.
Credentials come only from the environment, through boto3's usual chain.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from kubealign_jobs.config import MANIFEST_FILE, StorageSettings

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "kubealign-manifest/v1"

# Multipart kicks in for checkpoint shards; 64 MiB parts keep the part count of a 10 GB
# shard far below S3's 10 000-part limit while still parallelising uploads.
_MULTIPART_BYTES = 64 * 1024 * 1024
_TRANSFER_THREADS = 8
_RETRY_ATTEMPTS = 10
_HASH_CHUNK = 4 * 1024 * 1024


class StorageError(RuntimeError):
    """A storage operation failed or found an artifact missing, partial or corrupt."""


@dataclass(frozen=True)
class ManifestEntry:
    """One file of an artifact, relative to the artifact root (always ``/``-separated)."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """The commit record of an artifact: what it contains, written after everything else."""

    files: tuple[ManifestEntry, ...]
    created: str
    metadata: dict[str, Any]

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": MANIFEST_FORMAT,
                "created": self.created,
                "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files],
                "metadata": self.metadata,
            },
            indent=2,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str, *, where: str) -> Manifest:
        try:
            doc = json.loads(text)
            if doc.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"format is {doc.get('format')!r}, expected {MANIFEST_FORMAT!r}")
            files = tuple(
                ManifestEntry(path=str(f["path"]), size=int(f["size"]), sha256=str(f["sha256"]))
                for f in doc["files"]
            )
            return cls(
                files=files, created=str(doc.get("created", "")), metadata=dict(doc.get("metadata", {}))
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StorageError(f"{where}: invalid manifest: {exc}") from exc


@dataclass(frozen=True)
class Location:
    """A parsed URI: ``scheme`` is ``s3`` (with bucket and key prefix) or ``file`` (with path)."""

    scheme: str
    bucket: str
    key: str
    path: Path | None

    def uri(self) -> str:
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.key}" if self.key else f"s3://{self.bucket}"
        return str(self.path)


# S3's bucket naming rules, as the CRD's uri patterns state them.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def parse_uri(uri: str) -> Location:
    """Split ``s3://bucket/key``, ``file:///path`` or a plain path into a `Location`."""
    if not uri:
        raise StorageError("empty storage URI")
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"{uri}: an s3:// URI needs a bucket")
        if not _BUCKET.fullmatch(parsed.netloc):
            raise StorageError(
                f"{uri}: {parsed.netloc!r} is not an S3 bucket name (3-63 lowercase letters, digits, "
                "dots and hyphens, starting and ending with a letter or digit)"
            )
        return Location(scheme="s3", bucket=parsed.netloc, key=parsed.path.lstrip("/"), path=None)
    if parsed.scheme == "file":
        return Location(scheme="file", bucket="", key="", path=Path(unquote(parsed.path)))
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter would be a Windows drive, not a scheme
        raise StorageError(f"{uri}: unsupported scheme {parsed.scheme!r} (use s3://, file:// or a path)")
    return Location(scheme="file", bucket="", key="", path=Path(uri))


def join(uri: str, *parts: str) -> str:
    """Append path segments to a URI or path with exactly one ``/`` between them."""
    out = uri.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


# ---------------------------------------------------------------------------- S3 client


class _ClientCache:
    """The process-wide S3 client: boto3 clients are thread-safe and costly to create."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.settings = StorageSettings()
        self.client: Any = None


_cache = _ClientCache()


def configure(settings: StorageSettings) -> None:
    """Use the stage config's endpoint and region for every later S3 call in this process."""
    with _cache.lock:
        _cache.settings = settings
        _cache.client = None


def _s3() -> Any:
    with _cache.lock:
        if _cache.client is None:
            import boto3
            from botocore.config import Config

            endpoint = _cache.settings.endpoint or os.environ.get("AWS_ENDPOINT_URL") or None
            region = (
                _cache.settings.region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
            )
            # Custom endpoints (MinIO, Ceph, moto) rarely have wildcard DNS for virtual-hosted buckets.
            addressing = {"addressing_style": "path"} if endpoint else {}
            _cache.client = boto3.session.Session().client(
                "s3",
                endpoint_url=endpoint,
                region_name=region or "us-east-1",
                config=Config(
                    retries={"max_attempts": _RETRY_ATTEMPTS, "mode": "adaptive"},
                    s3=addressing,
                    max_pool_connections=2 * _TRANSFER_THREADS,
                ),
            )
        return _cache.client


def _transfer_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=_MULTIPART_BYTES,
        multipart_chunksize=_MULTIPART_BYTES,
        max_concurrency=_TRANSFER_THREADS,
    )


def _is_not_found(exc: Exception) -> bool:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return False
    code = str(response.get("Error", {}).get("Code", ""))
    return code in {"404", "NoSuchKey", "NotFound"}


def _s3_call(what: str, fn: Any, /, **kwargs: Any) -> Any:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return fn(**kwargs)
    except ClientError as exc:
        if _is_not_found(exc):
            raise FileNotFoundError(what) from exc
        raise StorageError(f"{what}: {exc}") from exc
    except BotoCoreError as exc:
        raise StorageError(f"{what}: {exc}") from exc


def _iter_s3_objects(loc: Location) -> Iterator[tuple[str, int]]:
    """Yield (key, size) for every object under the prefix ``loc.key + '/'``."""
    prefix = loc.key.rstrip("/") + "/" if loc.key else ""
    paginator = _s3().get_paginator("list_objects_v2")
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        for page in paginator.paginate(Bucket=loc.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                yield obj["Key"], int(obj["Size"])
    except (ClientError, BotoCoreError) as exc:
        raise StorageError(f"listing {loc.uri()}: {exc}") from exc


# ---------------------------------------------------------------------------- small objects


def read_bytes(uri: str) -> bytes:
    """The content of one object or file; `FileNotFoundError` when it does not exist."""
    loc = parse_uri(uri)
    if loc.scheme == "s3":
        body = _s3_call(uri, _s3().get_object, Bucket=loc.bucket, Key=loc.key)
        data: bytes = body["Body"].read()
        return data
    assert loc.path is not None
    return loc.path.read_bytes()


def write_bytes(uri: str, data: bytes) -> None:
    """Write one object or file; local writes go through a temporary file and a rename."""
    loc = parse_uri(uri)
    if loc.scheme == "s3":
        _s3_call(uri, _s3().put_object, Bucket=loc.bucket, Key=loc.key, Body=data)
        return
    assert loc.path is not None
    loc.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = loc.path.with_name(f".{loc.path.name}.tmp-{secrets.token_hex(4)}")
    tmp.write_bytes(data)
    os.replace(tmp, loc.path)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def read_json(uri: str) -> Any:
    return json.loads(read_text(uri))


def write_json(uri: str, value: Any) -> None:
    write_text(uri, json.dumps(value, indent=2, sort_keys=True) + "\n")


def exists(uri: str) -> bool:
    """True if ``uri`` names an existing object or file (not a prefix or directory)."""
    loc = parse_uri(uri)
    if loc.scheme == "s3":
        try:
            _s3_call(uri, _s3().head_object, Bucket=loc.bucket, Key=loc.key)
        except FileNotFoundError:
            return False
        return True
    assert loc.path is not None
    return loc.path.is_file()


def is_dir(uri: str) -> bool:
    """True if ``uri`` is a non-empty S3 prefix or an existing local directory."""
    loc = parse_uri(uri)
    if loc.scheme == "s3":
        prefix = loc.key.rstrip("/") + "/" if loc.key else ""
        page = _s3_call(uri, _s3().list_objects_v2, Bucket=loc.bucket, Prefix=prefix, MaxKeys=1)
        return int(page.get("KeyCount", 0)) > 0
    assert loc.path is not None
    return loc.path.is_dir()


def list_prefixes(uri: str) -> list[str]:
    """The immediate children of a prefix that are themselves prefixes (sub-directories), sorted."""
    loc = parse_uri(uri)
    if loc.scheme == "s3":
        prefix = loc.key.rstrip("/") + "/" if loc.key else ""
        found: list[str] = []
        paginator = _s3().get_paginator("list_objects_v2")
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            for page in paginator.paginate(Bucket=loc.bucket, Prefix=prefix, Delimiter="/"):
                for common in page.get("CommonPrefixes", []):
                    found.append(f"s3://{loc.bucket}/{common['Prefix'].rstrip('/')}")
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"listing {uri}: {exc}") from exc
        return sorted(found)
    assert loc.path is not None
    if not loc.path.is_dir():
        return []
    base = uri.rstrip("/")
    return sorted(join(base, child.name) for child in loc.path.iterdir() if child.is_dir())


def list_files(uri: str) -> list[tuple[str, int]]:
    """Every file under a prefix as (relative path, size), sorted; empty when there is none."""
    loc = parse_uri(uri)
    if loc.scheme == "s3":
        prefix = loc.key.rstrip("/") + "/" if loc.key else ""
        return sorted((key[len(prefix) :], size) for key, size in _iter_s3_objects(loc))
    assert loc.path is not None
    if not loc.path.is_dir():
        return []
    return sorted(
        (p.relative_to(loc.path).as_posix(), p.stat().st_size) for p in loc.path.rglob("*") if p.is_file()
    )


def delete_prefix(uri: str) -> None:
    """Delete an artifact or prefix. The manifest goes first, so a half-deleted artifact is never complete."""
    loc = parse_uri(uri)
    if loc.scheme == "s3":
        manifest_key = join(loc.key, MANIFEST_FILE)
        _s3_call(uri, _s3().delete_object, Bucket=loc.bucket, Key=manifest_key)
        keys = [key for key, _ in _iter_s3_objects(loc)]
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            chunk = [{"Key": key} for key in keys[start : start + 1000]]
            _s3_call(uri, _s3().delete_objects, Bucket=loc.bucket, Delete={"Objects": chunk, "Quiet": True})
        return
    assert loc.path is not None
    if not loc.path.exists():
        return
    (loc.path / MANIFEST_FILE).unlink(missing_ok=True)
    shutil.rmtree(loc.path)


# ---------------------------------------------------------------------------- artifacts


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def build_manifest(src_dir: Path, *, metadata: dict[str, Any] | None = None) -> Manifest:
    """Describe every file under ``src_dir`` (except an old manifest) with its size and checksum."""
    paths = sorted(p for p in src_dir.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    with ThreadPoolExecutor(max_workers=_TRANSFER_THREADS) as pool:
        digests = list(pool.map(sha256_file, paths))
    files = tuple(
        ManifestEntry(path=p.relative_to(src_dir).as_posix(), size=p.stat().st_size, sha256=digest)
        for p, digest in zip(paths, digests, strict=True)
    )
    created = datetime.now(UTC).isoformat(timespec="seconds")
    return Manifest(files=files, created=created, metadata=dict(metadata or {}))


def read_manifest(uri: str) -> Manifest | None:
    """The artifact's manifest, or None when it has none; `StorageError` when it is unreadable."""
    where = join(uri, MANIFEST_FILE)
    try:
        text = read_text(where)
    except FileNotFoundError:
        return None
    except UnicodeDecodeError as exc:
        raise StorageError(f"{where}: invalid manifest: {exc}") from exc
    return Manifest.from_json(text, where=where)


def is_complete(uri: str) -> bool:
    """True if ``uri`` holds a valid manifest and every file it lists exists with the listed size.

    Checksums are verified by `fetch_dir`; this check only lists the prefix, so it is cheap
    enough to run over every checkpoint when choosing one.
    """
    try:
        manifest = read_manifest(uri)
    except StorageError as exc:
        log.warning("%s", exc)
        return False
    if manifest is None:
        return False
    present = dict(list_files(uri))
    missing = [f.path for f in manifest.files if present.get(f.path) != f.size]
    if missing:
        log.warning(
            "%s: manifest lists %d missing or truncated file(s), e.g. %s", uri, len(missing), missing[0]
        )
        return False
    return True


def publish_dir(
    src_dir: Path, uri: str, *, metadata: dict[str, Any] | None = None, overwrite: bool = False
) -> Manifest:
    """Publish ``src_dir`` as the artifact at ``uri``; the manifest is written last.

    An existing complete artifact is never replaced unless ``overwrite``; leftovers of an
    earlier interrupted publish (files without a manifest) are cleared first, so the new
    manifest describes exactly what is there.
    """
    src_dir = Path(src_dir)
    if not src_dir.is_dir():
        raise StorageError(f"publish {uri}: {src_dir} is not a directory")
    if read_manifest_quiet(uri) is not None and not overwrite:
        raise StorageError(f"publish {uri}: a complete artifact is already there")
    token = begin_parts(uri)
    entries = upload_part(src_dir, uri, token)
    return commit_parts(uri, entries, token, metadata=metadata)


# An artifact written by several processes (a sharded checkpoint: every rank its own shard
# files) is published in three steps, with the same guarantee as `publish_dir`:
#   token = begin_parts(uri)                      one process, before any writer starts
#   entries = upload_part(src, uri, token)        every writer, its own files (disjoint paths)
#   commit_parts(uri, all entries, token)         one process, after every writer: the manifest


def begin_parts(uri: str) -> str:
    """Prepare ``uri`` for writers and return the token they share; clears leftovers on S3.

    Locally the writers fill a hidden staging directory that `commit_parts` renames into place.
    On S3 the files go directly under ``uri`` (no rename there), so a partial earlier attempt
    is deleted first: the manifest must describe exactly what is there.
    """
    if parse_uri(uri).scheme == "s3":
        delete_prefix(uri)
    return secrets.token_hex(4)


def _staging(target: Path, token: str) -> Path:
    return target.with_name(f".{target.name}.tmp-{token}")


def upload_part(src_dir: Path, uri: str, token: str) -> list[ManifestEntry]:
    """Upload every file under ``src_dir`` to the artifact at ``uri``; return their manifest entries."""
    src_dir = Path(src_dir)
    part = build_manifest(src_dir)
    loc = parse_uri(uri)
    if loc.scheme == "s3":
        transfer = _transfer_config()

        def upload(entry: ManifestEntry) -> None:
            _s3_call(
                f"upload {entry.path} to {uri}",
                _s3().upload_file,
                Filename=str(src_dir / entry.path),
                Bucket=loc.bucket,
                Key=join(loc.key, entry.path),
                Config=transfer,
            )

        with ThreadPoolExecutor(max_workers=_TRANSFER_THREADS) as pool:
            list(pool.map(upload, part.files))
        return list(part.files)
    assert loc.path is not None
    staging = _staging(loc.path, token)
    for entry in part.files:
        dest = staging / entry.path
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src_dir / entry.path, dest)
    return list(part.files)


def commit_parts(
    uri: str, entries: list[ManifestEntry], token: str, *, metadata: dict[str, Any] | None = None
) -> Manifest:
    """Write the manifest of every writer's ``entries``: the artifact at ``uri`` is then complete."""
    paths = [e.path for e in entries]
    if len(set(paths)) != len(paths):
        raise StorageError(f"publish {uri}: two writers wrote the same file")
    created = datetime.now(UTC).isoformat(timespec="seconds")
    manifest = Manifest(
        files=tuple(sorted(entries, key=lambda e: e.path)), created=created, metadata=dict(metadata or {})
    )
    loc = parse_uri(uri)
    if loc.scheme == "s3":
        write_text(join(uri, MANIFEST_FILE), manifest.to_json())
        return manifest
    assert loc.path is not None
    target = loc.path
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging(target, token)
    try:
        staging.mkdir(parents=True, exist_ok=True)
        (staging / MANIFEST_FILE).write_text(manifest.to_json())
        if target.exists():
            # The old directory is either partial (no manifest) or being overwritten on request.
            retired = target.with_name(f".{target.name}.old-{secrets.token_hex(4)}")
            os.replace(target, retired)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return manifest


def read_manifest_quiet(uri: str) -> Manifest | None:
    """Like `read_manifest`, but an unreadable manifest counts as none (it does not commit anything)."""
    try:
        return read_manifest(uri)
    except StorageError:
        return None


def fetch_dir(uri: str, dest: Path, *, require_manifest: bool = False) -> Path:
    """Download the prefix at ``uri`` into ``dest`` and return the local directory.

    With a manifest, exactly the listed files are fetched and each one's size and SHA-256 are
    checked (`StorageError` on mismatch). Without one, every file under the prefix is fetched,
    unless ``require_manifest``. A local source is verified in place and returned as is, to
    avoid copying multi-gigabyte weights; treat the returned directory as read-only.
    """
    manifest = read_manifest(uri)
    if manifest is None and require_manifest:
        raise StorageError(f"{uri}: no {MANIFEST_FILE}; not a complete artifact")
    loc = parse_uri(uri)
    if loc.scheme == "file":
        assert loc.path is not None
        if not loc.path.is_dir():
            raise StorageError(f"{uri}: no such directory")
        if manifest is not None:
            _verify(loc.path, manifest, where=uri)
        return loc.path

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if manifest is not None:
        wanted = [(f.path, f.size) for f in manifest.files]
    else:
        wanted = [(path, size) for path, size in list_files(uri) if path != MANIFEST_FILE]
        if not wanted:
            raise StorageError(f"{uri}: nothing there")
    transfer = _transfer_config()

    def download(item: tuple[str, int]) -> None:
        rel, _ = item
        local = dest / rel
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            _s3_call(
                f"download {join(uri, rel)}",
                _s3().download_file,
                Bucket=loc.bucket,
                Key=join(loc.key, rel),
                Filename=str(local),
                Config=transfer,
            )
        except FileNotFoundError as exc:
            raise StorageError(f"{join(uri, rel)}: listed but missing") from exc

    with ThreadPoolExecutor(max_workers=_TRANSFER_THREADS) as pool:
        list(pool.map(download, wanted))
    if manifest is not None:
        _verify(dest, manifest, where=uri)
        (dest / MANIFEST_FILE).write_text(manifest.to_json())
    return dest


def fetch_file(uri: str, dest_dir: Path) -> Path:
    """Download one object into ``dest_dir`` (local files are returned in place)."""
    loc = parse_uri(uri)
    if loc.scheme == "file":
        assert loc.path is not None
        if not loc.path.is_file():
            raise StorageError(f"{uri}: no such file")
        return loc.path
    dest_dir.mkdir(parents=True, exist_ok=True)
    local = dest_dir / Path(loc.key).name
    try:
        _s3_call(
            f"download {uri}",
            _s3().download_file,
            Bucket=loc.bucket,
            Key=loc.key,
            Filename=str(local),
            Config=_transfer_config(),
        )
    except FileNotFoundError as exc:
        raise StorageError(f"{uri}: no such object") from exc
    return local


def fetch(uri: str, dest: Path) -> Path:
    """Fetch ``uri`` whether it names a single file/object or a prefix/directory."""
    if exists(uri):
        return fetch_file(uri, dest)
    if is_dir(uri):
        return fetch_dir(uri, dest)
    raise StorageError(f"{uri}: no such file, object or prefix")


def _verify(root: Path, manifest: Manifest, *, where: str) -> None:
    def check(entry: ManifestEntry) -> str | None:
        path = root / entry.path
        if not path.is_file():
            return f"{entry.path}: missing"
        if path.stat().st_size != entry.size:
            return f"{entry.path}: size {path.stat().st_size} != {entry.size}"
        if sha256_file(path) != entry.sha256:
            return f"{entry.path}: checksum mismatch"
        return None

    with ThreadPoolExecutor(max_workers=_TRANSFER_THREADS) as pool:
        problems = [p for p in pool.map(check, manifest.files) if p]
    if problems:
        raise StorageError(f"{where}: corrupt artifact: {'; '.join(problems[:5])}")
