"""Lint the operator and trainer Dockerfiles: hadolint itself, plus the house rules hadolint cannot see.

The images cannot be built here (no Docker daemon), so these checks are what stands between a
Dockerfile edit and a broken or unsafe image: pinned bases (ARG defaults resolved, since hadolint skips
``FROM ${VAR}``), a non-root final stage, multi-stage builds, nothing secret-looking in ENV/ARG, a
build context that only carries sources, and the trainer's torch matching the pyproject pin.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {
    "operator": ROOT / "images" / "operator" / "Dockerfile",
    "trainer": ROOT / "images" / "trainer" / "Dockerfile",
}
SECRET_NAME = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL|PRIVATE|ACCESS_KEY|API_KEY)", re.I)


@dataclass(frozen=True)
class Instruction:
    line: int
    keyword: str
    args: str


def parse(text: str) -> list[Instruction]:
    """Split a Dockerfile into instructions, joining backslash continuations and dropping comments."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        keyword, _, args = " ".join(part for part in pending if part).partition(" ")
        instructions.append(Instruction(start, keyword.upper(), args.strip()))
        pending = []
    return instructions


def _arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    defaults: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ARG" and "=" in ins.args:
            name, _, value = ins.args.partition("=")
            defaults[name.strip()] = value.strip().strip('"')
    return defaults


def _expand(value: str, defaults: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), m.group(0)), value)


def violations(text: str) -> list[str]:
    """Every house-rule violation in a Dockerfile, each naming its line."""
    instructions = parse(text)
    defaults = _arg_defaults(instructions)
    problems: list[str] = []
    stages: list[list[Instruction]] = []
    stage_names: set[str] = set()
    for ins in instructions:
        if ins.keyword == "FROM":
            stages.append([])
            words = ins.args.split()
            image = _expand(words[0], defaults)
            if len(words) >= 3 and words[1].upper() == "AS":
                stage_names.add(words[2])
            if image in stage_names:
                continue
            repository, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
            if "$" in image:
                problems.append(f"line {ins.line}: FROM {words[0]} has no ARG default to pin it")
            elif not tag and "@sha256:" not in image:
                problems.append(f"line {ins.line}: FROM {image} is not pinned to a tag")
            elif tag == "latest" or not re.search(r"\d", tag):
                problems.append(f"line {ins.line}: FROM {repository}:{tag} is not a pinned version tag")
        elif stages:
            stages[-1].append(ins)
        if ins.keyword in ("ENV", "ARG"):
            for name in re.findall(r"(\w+)=", ins.args) or [ins.args.split()[0]]:
                if SECRET_NAME.search(name):
                    problems.append(f"line {ins.line}: {ins.keyword} {name} looks like a secret baked in")
    if len(stages) < 2:
        problems.append("not a multi-stage build: build tools would ship in the final image")
    users = [ins for ins in (stages[-1] if stages else []) if ins.keyword == "USER"]
    if not users:
        problems.append("final stage sets no USER: the container would run as root")
    else:
        user = users[-1].args.split(":")[0]
        if user in ("root", "0") or not user.isdigit():
            problems.append(
                f"line {users[-1].line}: final USER {users[-1].args} must be a numeric non-root uid "
                "(runAsNonRoot can only verify numeric users)"
            )
    return problems


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_dockerfile_follows_house_rules(image: str) -> None:
    assert violations(DOCKERFILES[image].read_text()) == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("FROM python:latest\nUSER 1000\n", ["not a pinned version tag", "multi-stage"]),
        ("FROM python\nFROM python:3.11.11-slim\nUSER 1000\n", ["python is not pinned"]),
        ("ARG BASE\nFROM ${BASE} AS b\nFROM b\nUSER 1000\n", ["no ARG default"]),
        ("FROM a:1 AS b\nFROM a:1\nRUN true\n", ["sets no USER"]),
        ("FROM a:1 AS b\nFROM a:1\nUSER root\n", ["numeric non-root"]),
        ("FROM a:1 AS b\nFROM a:1\nUSER nobody\n", ["numeric non-root"]),
        (
            "FROM a:1 AS b\nFROM a:1\nENV AWS_SECRET_ACCESS_KEY=x \\\n  B=2\nUSER 1\n",
            ["AWS_SECRET_ACCESS_KEY"],
        ),
        ("FROM a:1 AS b\nARG HF_TOKEN\nFROM a:1\nUSER 1\n", ["HF_TOKEN"]),
    ],
)
def test_house_rules_catch_bad_dockerfiles(text: str, expected: list[str]) -> None:
    found = violations(text)
    assert len(found) == len(expected), found
    for problem, fragment in zip(found, expected, strict=True):
        assert fragment in problem


def test_parse_joins_continuations_and_skips_comments() -> None:
    text = "# c\nFROM a:1 AS b\nRUN x \\\n  # inner comment\n  && y\nUSER 1\n"
    assert parse(text) == [
        Instruction(2, "FROM", "a:1 AS b"),
        Instruction(3, "RUN", "x && y"),
        Instruction(6, "USER", "1"),
    ]


def _bin(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: it comes with the [dev] extra (pip install -e '.[dev]')")
    return found


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_hadolint_is_clean(image: str) -> None:
    result = subprocess.run(
        [_bin("hadolint"), "--no-color", "--failure-threshold", "info", str(DOCKERFILES[image])],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_build_script_passes_shellcheck() -> None:
    result = subprocess.run(
        [_bin("shellcheck"), str(ROOT / "images" / "build.sh")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _pyproject() -> dict[str, object]:
    with (ROOT / "pyproject.toml").open("rb") as handle:
        return tomllib.load(handle)


def test_trainer_base_matches_the_torch_pin() -> None:
    project = _pyproject()["project"]
    assert isinstance(project, dict)
    pins = [dep for dep in project["optional-dependencies"]["train"] if dep.startswith("torch==")]
    assert len(pins) == 1, "pyproject's [train] extra must pin torch exactly once"
    version = pins[0].removeprefix("torch==")
    defaults = _arg_defaults(parse(DOCKERFILES["trainer"].read_text()))
    assert defaults["TORCH_IMAGE"].startswith(f"pytorch/pytorch:{version}-cuda"), defaults["TORCH_IMAGE"]


def test_operator_image_installs_no_training_stack() -> None:
    instructions = parse(DOCKERFILES["operator"].read_text())
    installs = [ins.args for ins in instructions if ins.keyword == "RUN" and "pip install" in ins.args]
    assert installs, "the operator image must install kubealign"
    assert all("[train]" not in args and "torch" not in args for args in installs)
    entrypoints = [ins.args for ins in instructions if ins.keyword == "ENTRYPOINT"]
    assert entrypoints == ['["kubealign", "operator"]']


def test_build_context_carries_only_sources() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "**", "the context must start from nothing and re-include sources"
    included = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert included == {"pyproject.toml", "README.md", "operator", "jobs", "crds"}


def _copied_sources(image: str) -> set[str]:
    """The top-level paths a Dockerfile copies from the build context (not from another stage)."""
    sources: set[str] = set()
    for ins in parse(DOCKERFILES[image].read_text()):
        if ins.keyword == "COPY" and not ins.args.startswith("--from"):
            sources.update(Path(source).parts[0] for source in ins.args.split()[:-1])
    return sources


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_images_copy_what_package_symlinks_point_at(image: str) -> None:
    # kubealign/crd/ links into crds/: a wheel built without the target ships a dangling link and
    # the operator cannot load its own schema.
    links = [path for top in ("operator", "jobs") for path in (ROOT / top).rglob("*") if path.is_symlink()]
    assert links, "expected the package's crd/ symlink"
    copied = _copied_sources(image)
    for link in links:
        target = link.resolve().relative_to(ROOT)
        assert target.parts[0] in copied, f"{link.relative_to(ROOT)} -> {target}: not copied by {image}"


def _final_user(image: str) -> int:
    users = [ins.args for ins in parse(DOCKERFILES[image].read_text()) if ins.keyword == "USER"]
    return int(users[-1].split(":")[0])


def test_image_users_match_the_pods_that_run_them() -> None:
    import yaml

    from kubealign import render

    # Trainer pods set runAsUser (render.py); the operator pod's comes from the chart's values.
    assert _final_user("trainer") == render.RUN_AS_USER
    values = yaml.safe_load((ROOT / "charts" / "kubealign" / "values.yaml").read_text())
    assert _final_user("operator") == values["podSecurityContext"]["runAsUser"]
