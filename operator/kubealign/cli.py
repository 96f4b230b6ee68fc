"""The ``kubealign`` command.

    kubealign operator --namespace team-a [--namespace team-b ...]   # or --all-namespaces
    kubealign operator -A --metrics-port 9090                        # Prometheus at :9090/metrics
    kubealign operator -A --leader-elect --health-address 0.0.0.0:8081   # one of several replicas
    kubealign crd | kubectl apply -f -                               # the CRD and its admission policy
    kubealign validate run.yaml [...]                                # check manifests offline
    kubealign stages [TYPE]                                          # stage types and hyperparameters
    kubealign run run.yaml --local [--workdir DIR]                   # run the stages on this machine

Run the operator from a checkout against the current kubeconfig context::

    kubectl apply -f crds/
    kubealign operator --namespace default

Subcommands are registered in ``COMMANDS``; each adds its own argparse subparser.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from kubealign import api, local
from kubealign_jobs import stages
from kubealign_jobs.config import ConfigError


def _add_operator(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "operator",
        help="run the AlignmentRun operator in the foreground",
        description="Watch AlignmentRuns and run their stages as Jobs. Stops on SIGINT or SIGTERM.",
    )
    scope = parser.add_mutually_exclusive_group(required=True)
    scope.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        metavar="NS",
        help="serve this namespace (repeatable)",
    )
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="serve every namespace")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, then $KUBECONFIG)")
    parser.add_argument("--context", help="kubeconfig context (default: the current one)")
    parser.add_argument(
        "--resync-seconds", type=float, default=30.0, help="re-check every run this often (default: 30)"
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    parser.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics at :PORT/metrics (see kubealign.metrics; default: off)",
    )
    parser.add_argument(
        "--liveness",
        metavar="URL",
        help="kopf's health endpoint for the liveness probe, e.g. http://0.0.0.0:8080/healthz",
    )
    parser.add_argument(
        "--health-address",
        metavar="HOST:PORT",
        help="serve /readyz and /leader here, e.g. 0.0.0.0:8081 (default: off)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=16,
        help="runs reconciled in parallel; the API connection pool matches it (default: 16)",
    )
    parser.add_argument(
        "--leader-elect",
        action="store_true",
        help="run as one of several replicas: only the holder of a coordination.k8s.io Lease reconciles",
    )
    parser.add_argument(
        "--leader-election-namespace",
        default=os.environ.get("POD_NAMESPACE"),
        help="the Lease's namespace (default: $POD_NAMESPACE)",
    )
    parser.add_argument(
        "--leader-election-name",
        default="kubealign-operator",
        help="the Lease's name (default: kubealign-operator)",
    )
    parser.add_argument(
        "--kueue",
        action="store_true",
        help="the cluster runs Kueue: watch its Workloads so queued stages show why they wait",
    )
    parser.set_defaults(handler=_run_operator)


def _run_operator(args: argparse.Namespace) -> int:
    from kubealign.handlers import LeadershipLostError, default_identity, serve
    from kubealign.leader import LeaseSettings
    from kubealign.metrics import OPERATOR_METRICS

    if args.workers < 1:
        raise SystemExit("kubealign operator: --workers must be at least 1")
    election = None
    if args.leader_elect:
        if not args.leader_election_namespace:
            raise SystemExit(
                "kubealign operator: --leader-elect needs --leader-election-namespace or $POD_NAMESPACE"
            )
        election = LeaseSettings(
            namespace=args.leader_election_namespace,
            name=args.leader_election_name,
            identity=default_identity(),
        )

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # kopf logs every handler call at INFO; the operator's own log lines say what happened.
        logging.getLogger("kopf").setLevel(logging.WARNING)
    if args.metrics_port is not None:
        OPERATOR_METRICS.serve(port=args.metrics_port)
    try:
        asyncio.run(
            serve(
                namespaces=args.namespace,
                clusterwide=args.all_namespaces,
                kubeconfig=args.kubeconfig,
                context=args.context,
                resync_seconds=args.resync_seconds,
                workers=args.workers,
                leader_election=election,
                liveness_endpoint=args.liveness,
                health_address=args.health_address,
                kueue=args.kueue,
            )
        )
    except LeadershipLostError as exc:
        # Exit, so the pod restarts as a fresh candidate with nothing in flight.
        print(f"kubealign operator: {exc}", file=sys.stderr)
        return 1
    return 0


def _add_crd(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "crd",
        help="print the AlignmentRun CustomResourceDefinition and its hyperparameter admission policy",
    )
    parser.set_defaults(handler=lambda _args: _print(api.install_text()))


def _print(text: str) -> int:
    sys.stdout.write(text)
    return 0


def _add_validate(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "validate",
        help="check AlignmentRun manifests against the API's schema and rules",
        description="Exit status 1 if any manifest is invalid; each error names file, line and field.",
    )
    parser.add_argument("manifests", nargs="+", type=Path, metavar="MANIFEST")
    parser.set_defaults(handler=_validate)


def _validate(args: argparse.Namespace) -> int:
    failed = False
    for path in args.manifests:
        try:
            documents = api.load_manifests(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            print(f"{path}: {exc}", file=sys.stderr)
            failed = True
            continue
        for document in documents:
            for error in api.validate(document.body):
                print(f"{path}:{document.line_of(error.path)}: {error}", file=sys.stderr)
                failed = True
    return 1 if failed else 0


def _add_stages(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "stages",
        help="list the stage types, or one type's inputs and hyperparameters",
        description=(
            "The stage catalogue: what spec.stages[].type can be and, for one TYPE, its inputs and every "
            "hyperparameter with its type, default, bounds and description (as kubectl explain does "
            "for the spec)."
        ),
    )
    parser.add_argument("type", nargs="?", metavar="TYPE", help=f"one of {', '.join(stages.STAGE_TYPES)}")
    parser.set_defaults(handler=_stages)


def _stages(args: argparse.Namespace) -> int:
    try:
        text = stages.describe(args.type)
    except ConfigError as exc:
        print(f"kubealign stages: {exc}", file=sys.stderr)
        return 2
    return _print(text)


COMMANDS: list[Callable[[Any], None]] = [
    _add_operator,
    _add_crd,
    _add_validate,
    _add_stages,
    local.add_parser,
]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubealign", description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    args = parser.parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
