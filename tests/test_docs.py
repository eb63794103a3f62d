"""The documentation a newcomer reads: a README that fits on a few screens, links that lead somewhere inside the
repository, and the documented Python example still running as printed."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
README_MAX_CHARS = 15_000
DOCS = [README, REPO / "configs" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# [text](target) outside code; images too. Autolinks and reference-style links are not used in these files.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def _prose(text: str) -> str:
    """The text without fenced code blocks (their brackets are code, not links)."""
    return FENCE.sub("", text)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.*)$", _prose(path.read_text()), re.MULTILINE)}


def _relative_links(path: Path) -> list[str]:
    return [t for t in LINK.findall(_prose(path.read_text())) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def test_readme_fits_the_budget():
    size = len(README.read_text(encoding="utf-8"))
    assert size <= README_MAX_CHARS, f"README.md has {size} characters (limit {README_MAX_CHARS}); move detail to docs/"


def test_readme_set_up_is_the_two_make_commands():
    quick = README.read_text().split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", quick, re.DOTALL).group(1)
    assert block.split("\n")[:-1] == ["make demo", "make test"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_points_to_an_existing_file_inside_the_repository(doc):
    broken = []
    for target in _relative_links(doc):
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.is_relative_to(REPO):
            broken.append(f"{target} (outside the repository)")
        elif not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    assert not broken, f"{doc.relative_to(REPO)}: {broken}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_docs_do_not_send_readers_outside_the_repository(doc):
    text = doc.read_text()
    assert "shared/docs" not in text and "../shared" not in text, f"{doc.name} refers to files outside the repository"


def test_readme_links_the_docs_pages():
    links = set(_relative_links(README))
    for page in ("CONFIG", "OUTPUTS", "DESIGN", "SLURM", "DOCKER", "TESTING", "BENCHMARKS"):
        assert f"docs/{page}.md" in links, f"README.md does not link docs/{page}.md"


def test_the_documented_python_example_runs_as_printed():
    text = (REPO / "docs" / "OUTPUTS.md").read_text()
    example = next(b for b in re.findall(r"```python\n(.*?)```", text, re.DOTALL) if "build_model" in b)
    expected = [line[2:] for line in example.splitlines() if line.startswith("# (")]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(example, "docs/OUTPUTS.md", "exec"), {})  # noqa: S102 - the documented example itself
    assert printed.getvalue().splitlines() == ["True", *expected]


def test_the_test_script_runs_only_the_test_paths_it_is_given():
    """README: `bash scripts/test.sh ... tests/test_ops.py` runs that file, not the whole suite (issue 20)."""
    assert "scripts/test.sh" in README.read_text() and "tests/test_ops.py" in README.read_text()
    res = subprocess.run(
        ["bash", "scripts/test.sh", "--collect-only", "-q", "-p", "no:cacheprovider", "tests/test_ops.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    ids = [line for line in res.stdout.splitlines() if "::" in line]
    assert res.returncode == 0 and ids, res.stdout[-3000:] + res.stderr[-3000:]
    assert {i.split("::")[0] for i in ids} == {"tests/test_ops.py"}, sorted({i.split("::")[0] for i in ids})
