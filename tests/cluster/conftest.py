"""Fixtures of the operator's cluster tests: the CRD installed once per module, a Reader per test."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from kubealign.k8s import Kube
from tests.cluster.operator_harness import Reader, install_crd

if TYPE_CHECKING:
    from tests.conftest import Cluster


@pytest.fixture(scope="module")
def crd(cluster: Cluster) -> None:
    install_crd(cluster)


@pytest.fixture
def reader(cluster: Cluster, namespace: str) -> Reader:
    return Reader(Kube.connect(kubeconfig=cluster.kubeconfig, context=cluster.context), namespace)
