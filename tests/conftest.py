"""Shared fixtures: a real local Kubernetes control plane, a namespace per test, a moto S3 server.

- `cluster` (session) runs `tools/cluster up` in a state directory of its own and `down` at the end,
  or uses an existing cluster only when both KUBEALIGN_TEST_KUBECONFIG and KUBEALIGN_TEST_CONTEXT
  are set and the context's name marks it as throwaway (kind-*, kwok-*, *test*, *throwaway*).
- `kube_api` (session), `namespace` (per test, deleted afterwards).
- `mlflow_server` (session): a real `mlflow server` (sqlite backend) on a free 127.0.0.1 port.
- `s3_server` (session): moto's standalone server as a subprocess on a free 127.0.0.1 port; it puts
  AWS_ENDPOINT_URL and credentials into os.environ so subprocesses inherit them. `s3`, `bucket`.

Tests that use the cluster or S3 fixtures get the `cluster` / `s3` marker automatically, so
`pytest -m "not cluster"` deselects them and never starts the control plane.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.processes import answers, free_port, serving

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

# No test reaches a model hub: hf:// inputs resolve from hub caches the tests build (the trainers
# and the local runner inherit this).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# `kubealign run --local` tracks into a sqlite store in its workdir by default; the local-runner tests
# that are not about tracking leave it off (tests/local/test_local_tracking.py runs the default).
os.environ.setdefault("KUBEALIGN_MLFLOW", "off")

REPO_ROOT = Path(__file__).resolve().parent.parent
CLUSTER_TOOL = REPO_ROOT / "tools" / "cluster"
# tools/localcluster.py (stdlib only) holds the rules the fixtures share with tools/cluster.
sys.path.insert(0, str(REPO_ROOT / "tools"))

CLUSTER_FIXTURES = frozenset({"cluster", "kube_api", "namespace"})
S3_FIXTURES = frozenset({"s3_server", "s3", "bucket"})


def pytest_itemcollected(item: pytest.Item) -> None:
    """Mark tests by the fixtures they use (directly or through other fixtures), before -m filters."""
    used = set(getattr(item, "fixturenames", ()))
    if used & CLUSTER_FIXTURES and item.get_closest_marker("cluster") is None:
        item.add_marker(pytest.mark.cluster)
    if used & S3_FIXTURES and item.get_closest_marker("s3") is None:
        item.add_marker(pytest.mark.s3)


# ---------------------------------------------------------------------------------------------
# Kubernetes


class KubectlError(subprocess.CalledProcessError):
    """A failed kubectl call whose message shows what kubectl said."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


@dataclass(frozen=True)
class Cluster:
    """A cluster the tests may use; every kubectl call names its kubeconfig and context explicitly."""

    kubeconfig: str
    context: str
    kubectl_path: str
    # tools/cluster's state directory when the tests started the cluster themselves (None for an
    # opted-in external one): tests that restart a component need it.
    state_dir: str | None = None

    def kubectl(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        command = [self.kubectl_path, f"--kubeconfig={self.kubeconfig}", f"--context={self.context}", *args]
        result = subprocess.run(
            command, capture_output=True, text=True, input=input, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise KubectlError(result.returncode, command, result.stdout, result.stderr)
        return result


def _cluster_tool(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CLUSTER_TOOL), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _cached_kubectl() -> str | None:
    import localcluster

    path = localcluster.BINARY_BY_NAME["kubectl"].path()
    return str(path) if path.is_file() else None


def _external_cluster() -> Cluster | None:
    """The explicitly opted-in existing cluster, or None; refuses anything not marked throwaway."""
    import localcluster

    kubeconfig = os.environ.get("KUBEALIGN_TEST_KUBECONFIG", "")
    context = os.environ.get("KUBEALIGN_TEST_CONTEXT", "")
    if not kubeconfig and not context:
        return None
    if not (kubeconfig and context):
        pytest.fail(
            "set both KUBEALIGN_TEST_KUBECONFIG and KUBEALIGN_TEST_CONTEXT, or neither", pytrace=False
        )
    if not localcluster.is_throwaway_context(context):
        pytest.fail(
            f"refusing to run tests against context {context!r}: only contexts named kind-*, kwok-*, "
            "or containing 'test' or 'throwaway' may be used",
            pytrace=False,
        )
    kubectl = _cached_kubectl() or shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("no kubectl: run `tools/cluster build` or put kubectl on PATH", pytrace=False)
    cluster = Cluster(kubeconfig=kubeconfig, context=context, kubectl_path=kubectl)
    contexts = cluster.kubectl("config", "get-contexts", "--output=name").stdout.split()
    if context not in contexts:
        pytest.fail(
            f"context {context!r} is not in {kubeconfig} (it has: {', '.join(contexts)})", pytrace=False
        )
    return cluster


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop_abandoned_test_clusters(state_root: Path) -> None:
    """Stop clusters of earlier test sessions that died before their teardown (e.g. SIGKILL)."""
    if not state_root.is_dir():
        return
    for state_dir in state_root.iterdir():
        match = re.fullmatch(r"pytest-(\d+)-[0-9a-f]+", state_dir.name)
        if match and not _pid_alive(int(match.group(1))):
            _cluster_tool("down", "--state-dir", str(state_dir), timeout=60)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """A running control plane: our own (tools/cluster up ... down) or an opted-in throwaway one."""
    external = _external_cluster()
    if external is not None:
        yield external
        return
    import localcluster

    state_root = localcluster.cache_dir() / "state"
    _stop_abandoned_test_clusters(state_root)
    chosen = os.environ.get("KUBEALIGN_TEST_STATE_DIR")
    state_dir = Path(chosen) if chosen else state_root / f"pytest-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        up = _cluster_tool("up", "--state-dir", str(state_dir), timeout=300)
        if up.returncode != 0:
            pytest.fail(f"`tools/cluster up --state-dir {state_dir}` failed:\n{up.stderr}", pytrace=False)
        kubeconfig = up.stdout.strip().splitlines()[-1]
        kubectl = _cached_kubectl()
        assert kubectl is not None, "tools/cluster up succeeded without a cached kubectl"
        yield Cluster(
            kubeconfig=kubeconfig,
            context=localcluster.CONTEXT_NAME,
            kubectl_path=kubectl,
            state_dir=str(state_dir),
        )
    finally:
        down = _cluster_tool("down", "--state-dir", str(state_dir), timeout=120)
        if down.returncode != 0:
            print(f"tools/cluster down failed:\n{down.stderr}", file=sys.stderr)


@pytest.fixture(scope="session")
def kube_api(cluster: Cluster) -> Iterator[ApiClient]:
    """A kubernetes.client.ApiClient bound to the test cluster's kubeconfig and context."""
    from kubernetes import config

    # persist_config=False: never write refreshed credentials back into someone's kubeconfig.
    api: ApiClient = config.new_client_from_config(  # type: ignore[no-untyped-call]
        config_file=cluster.kubeconfig, context=cluster.context, persist_config=False
    )
    yield api
    api.close()  # type: ignore[no-untyped-call]


def namespace_name(test_name: str) -> str:
    """A valid, unique namespace name that still says which test made it."""
    slug = re.sub(r"[^a-z0-9]+", "-", test_name.lower()).strip("-")[:48].strip("-")
    return f"t-{slug}-{secrets.token_hex(3)}" if slug else f"t-{secrets.token_hex(3)}"


@pytest.fixture
def namespace(kube_api: ApiClient, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace (with its default ServiceAccount in place), deleted after the test."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core = client.CoreV1Api(kube_api)
    name = namespace_name(request.node.name)
    core.create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels={"kubealign.io/test": "true"}))
    )
    # Pods are rejected until the controller manager has created the default ServiceAccount.
    deadline = time.monotonic() + 30
    while True:
        try:
            core.read_namespaced_service_account("default", name)
            break
        except ApiException as error:
            if error.status != 404 or time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    yield name
    with contextlib.suppress(ApiException):
        core.delete_namespace(name, propagation_policy="Background")


# ---------------------------------------------------------------------------------------------
# S3


@dataclass(frozen=True)
class S3Server:
    """A moto S3 server on 127.0.0.1 and the credentials it accepts."""

    endpoint: str
    region: str = "us-east-1"
    access_key_id: str = "testing"
    secret_access_key: str = "testing"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_DEFAULT_REGION": self.region,
        }


@contextlib.contextmanager
def _environment(set_values: dict[str, str], unset: Sequence[str]) -> Iterator[None]:
    """Set and unset os.environ entries, restoring the previous values afterwards."""
    saved = {key: os.environ.get(key) for key in (*set_values, *unset)}
    for key in unset:
        os.environ.pop(key, None)
    os.environ.update(set_values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's standalone S3 server in a subprocess; AWS_* env points subprocesses at it."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("moto") / "moto_server.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    server = S3Server(endpoint=f"http://127.0.0.1:{port}")
    with (
        serving(
            process,
            ready=lambda: answers(f"{server.endpoint}/moto-api/data.json"),
            what="moto server",
            log=log_path,
            start_timeout=30,
            stop_timeout=10,
        ),
        # A profile or session token from the caller's environment would override our credentials.
        _environment(server.env(), unset=("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")),
    ):
        yield server


@pytest.fixture
def s3(s3_server: S3Server) -> Any:
    """A boto3 S3 client for the moto server."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        region_name=s3_server.region,
        aws_access_key_id=s3_server.access_key_id,
        aws_secret_access_key=s3_server.secret_access_key,
    )


@pytest.fixture
def bucket(s3: Any) -> Iterator[str]:
    """A fresh, empty bucket, emptied and deleted after the test."""
    from botocore.exceptions import ClientError

    name = f"t-{secrets.token_hex(8)}"
    s3.create_bucket(Bucket=name)
    yield name
    with contextlib.suppress(ClientError):
        for page in s3.get_paginator("list_object_versions").paginate(Bucket=name):
            doomed = [
                {"Key": item["Key"], "VersionId": item["VersionId"]}
                for item in (*page.get("Versions", ()), *page.get("DeleteMarkers", ()))
            ]
            if doomed:
                s3.delete_objects(Bucket=name, Delete={"Objects": doomed})
        s3.delete_bucket(Bucket=name)


@dataclass(frozen=True)
class MlflowServer:
    uri: str

    def client(self) -> Any:
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """`mlflow server` with a sqlite backend store, as a platform team runs a small one."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log_path = root / "mlflow-server.log"
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT
        )
    server = MlflowServer(uri=f"http://127.0.0.1:{port}")
    # Its first start creates the schema: about 10 s alone, a minute on two busy cores.
    with serving(
        process,
        ready=lambda: answers(f"{server.uri}/health"),
        what="mlflow server",
        log=log_path,
        start_timeout=180,
        stop_timeout=15,
        poll=0.5,
    ):
        yield server
