#!/usr/bin/env python3
"""Copy the chart's single-source files into charts/kubealign, or check that they are identical.

Helm packages a chart from its own directory and does not follow symlinks out of it, so the chart
carries byte-for-byte copies of:

    crds/*.yaml                        -> charts/kubealign/crds/            (the AlignmentRun CRD)
    operator/kubealign/rbac/rules.yaml -> charts/kubealign/files/rbac-rules.yaml (what the operator needs)
    operator/kubealign/rbac/leader-election-rules.yaml -> charts/kubealign/files/leader-election-rules.yaml
    operator/kubealign/policy/hyperparameters.yaml -> charts/kubealign/files/hyperparameters-policy.yaml
                                       (the ValidatingAdmissionPolicy that checks hyperparameters)

Before copying, it rewrites the CRD's generated blocks (stage types and input rules) and the
hyperparameter admission policy from the stage catalogue, ``kubealign_jobs/stages.py``, through
``kubealign.crdgen``.

Run ``.venv/bin/python tools/sync_chart.py`` after editing a source or the catalogue;
``--check`` (and the chart tests) fail while any copy or generated block differs.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CHART = REPO_ROOT / "charts" / "kubealign"
RBAC_SOURCE = REPO_ROOT / "operator" / "kubealign" / "rbac" / "rules.yaml"
POLICY_SOURCE = REPO_ROOT / "operator" / "kubealign" / "policy" / "hyperparameters.yaml"


def pairs() -> list[tuple[Path, Path]]:
    """(source, chart copy) for every file the chart must carry verbatim."""
    crds = sorted((REPO_ROOT / "crds").glob("*.yaml"))
    return [
        *((source, CHART / "crds" / source.name) for source in crds),
        (RBAC_SOURCE, CHART / "files" / "rbac-rules.yaml"),
        (RBAC_SOURCE.with_name("leader-election-rules.yaml"), CHART / "files" / "leader-election-rules.yaml"),
        (POLICY_SOURCE, CHART / "files" / "hyperparameters-policy.yaml"),
    ]


def outdated() -> dict[Path, str]:
    """Every file written from the stage catalogue whose text differs from what it generates now."""
    # Imported here: the rest of this script needs only the standard library.
    from kubealign import crdgen

    wanted = {crd: crdgen.render_crd(crd.read_text()) for crd in sorted((REPO_ROOT / "crds").glob("*.yaml"))}
    if POLICY_SOURCE.parent.is_dir():
        wanted[POLICY_SOURCE] = crdgen.policy_text()
    return {path: text for path, text in wanted.items() if not path.is_file() or path.read_text() != text}


def stale() -> list[str]:
    """Human-readable problems: a missing source, a missing or differing copy, a copy with no source,
    a generated file that differs from what the stage catalogue generates."""
    problems = [
        f"{path.relative_to(REPO_ROOT)}: differs from what the stage catalogue generates"
        for path in outdated()
    ]
    expected = set()
    for source, copy in pairs():
        expected.add(copy)
        if not source.is_file():
            problems.append(f"{source.relative_to(REPO_ROOT)}: source missing")
        elif not copy.is_file() or copy.read_bytes() != source.read_bytes():
            problems.append(f"{copy.relative_to(REPO_ROOT)}: differs from {source.relative_to(REPO_ROOT)}")
    problems.extend(
        f"{orphan.relative_to(REPO_ROOT)}: no such file in crds/"
        for orphan in sorted((CHART / "crds").glob("*.yaml"))
        if orphan not in expected
    )
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="only report copies that differ; exit 1 if any")
    args = parser.parse_args()
    if args.check:
        problems = stale()
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print("run tools/sync_chart.py to update the chart's copies", file=sys.stderr)
        return 1 if problems else 0
    for path, text in outdated().items():
        path.write_text(text)
    for source, copy in pairs():
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, copy)
    for orphan in (CHART / "crds").glob("*.yaml"):
        if orphan not in {copy for _, copy in pairs()}:
            orphan.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
