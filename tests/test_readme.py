"""The README is a front page that stays true: its extras table is ``pyproject.toml``'s optional
dependencies, the packages its notes name are in those extras, its quick-start commands and test
command are the ones CI runs, it stays short, and its links resolve."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PYPROJECT = REPO / "pyproject.toml"
CI = REPO / ".ci" / "run"

#: The two quick-start commands, verbatim (the issue that made the README a front page).
QUICK_START = (
    "python3 -m venv .venv && .venv/bin/pip install -e '.[serve]' && .venv/bin/abstain serve",
    "bash .ci/run",
)
#: The test command the README gives and ``.ci/run`` runs last.
TEST_COMMAND = "python -m pytest -q"
MAX_LINES = 160

_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")
_BACKTICKED = re.compile(r"`([^`]+)`")
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _norm(name: str) -> str:
    """A distribution name as pip compares it (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _optional_dependencies() -> dict[str, list[str]]:
    with PYPROJECT.open("rb") as f:
        return tomllib.load(f)["project"]["optional-dependencies"]


def _expand(extra: str, table: dict[str, list[str]]) -> tuple[set[str], set[str]]:
    """(distribution names, extras) that ``pip install 'abstain[extra]'`` asks for directly.

    Self-references (``abstain[triton-client]``) are followed; dependencies of the packages
    themselves are not (the serve-only CI environment checks those by installing).
    """
    packages: set[str] = set()
    reached: set[str] = set()
    todo = [extra]
    while todo:
        name = todo.pop()
        if name in reached:
            continue
        reached.add(name)
        for requirement in table[name]:
            match = _REQUIREMENT.match(requirement)
            assert match, f"cannot read the requirement {requirement!r} of extra {name!r}"
            dist, extras = _norm(match.group(1)), match.group(2)
            if dist == "abstain":
                todo += [e.strip() for e in (extras or "").split(",") if e.strip()]
            else:
                packages.add(dist)
    return packages, reached - {extra}


def _readme_lines() -> list[str]:
    return README.read_text(encoding="utf-8").splitlines()


def _extras_table() -> dict[str, str]:
    """The README's extras table: extra name → its notes cell."""
    lines = _readme_lines()
    header = [i for i, line in enumerate(lines) if re.match(r"^\|\s*extra\s*\|.*\|\s*notes\s*\|\s*$", line)]
    assert len(header) == 1, "the README should have one table whose header is | extra | for | notes |"
    rows: dict[str, str] = {}
    start = header[0] + 2  # after the header and its |---| line
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        assert len(cells) == 3, f"an extras row should have 3 cells: {line!r}"
        names = _BACKTICKED.findall(cells[0])
        assert names, f"an extras row should name its extra in backticks: {line!r}"
        for name in names:
            assert name not in rows, f"extra {name!r} is listed twice"
            rows[name] = cells[2]
    return rows


def test_extras_table_lists_exactly_the_extras_of_pyproject() -> None:
    listed, defined = set(_extras_table()), set(_optional_dependencies())
    assert listed == defined, (
        f"README's extras table and pyproject.toml differ: only in the README {sorted(listed - defined)}, "
        f"only in pyproject.toml {sorted(defined - listed)}"
    )


def test_notes_name_packages_that_are_in_their_extra() -> None:
    """The notes' first clause (up to ``;``) names main packages in backticks: each is in the extra.

    A clause starting with ``no`` names packages the extra must not ask for; "the X extra" names
    an extra it includes.
    """
    table = _optional_dependencies()
    for extra, notes in _extras_table().items():
        packages, reached = _expand(extra, table)
        clauses = [clause.strip() for clause in notes.split(";")]
        named = [_norm(n) for n in _BACKTICKED.findall(clauses[0])]
        assert named or "every extra" in notes, f"the notes of {extra!r} name no package: {notes!r}"
        missing = sorted(set(named) - packages)
        assert not missing, (
            f"the README says extra {extra!r} brings {missing}; pyproject.toml: {sorted(packages)}"
        )
        for clause in clauses[1:]:
            if clause.startswith("no "):
                present = sorted({_norm(n) for n in _BACKTICKED.findall(clause)} & packages)
                assert not present, f"the README says extra {extra!r} has no {present}, but it asks for them"
        for included in re.findall(r"\bthe ([a-z][a-z0-9-]*) extra\b", notes):
            assert included in reached, f"the README says extra {extra!r} includes {included!r}; it does not"


def test_the_gpu_extra_is_the_cpu_one_with_the_gpu_runtime() -> None:
    """A swap the notes state ("`new` instead of old, the rest as base"), requirement by requirement."""
    table = _optional_dependencies()
    swaps = 0
    for extra, notes in _extras_table().items():
        match = re.search(r"`([^`]+)` instead of ([\w.-]+), the rest as ([\w-]+)", notes)
        if not match:
            continue
        swaps += 1
        new, old, base = _norm(match.group(1)), _norm(match.group(2)), match.group(3)

        def others(name: str, leave_out: str) -> list[str]:
            return sorted(r for r in table[name] if _norm(_REQUIREMENT.match(r).group(1)) != leave_out)

        assert others(extra, new) == others(base, old), f"{extra!r} is not {base!r} with {new} for {old}"
        assert new in _expand(extra, table)[0] and old not in _expand(extra, table)[0], (
            f"{extra!r} should ask for {new} and never {old}"
        )
    assert swaps, "the serve-gpu row should say which runtime it swaps in"


def test_every_extra_but_the_ones_named() -> None:
    table = _optional_dependencies()
    for extra, notes in _extras_table().items():
        match = re.search(r"every extra but ([\w-]+)", notes)
        if match:
            _, reached = _expand(extra, table)
            assert reached == set(table) - {extra, match.group(1)}, (
                f"the README says {extra!r} is every extra but {match.group(1)!r}; "
                f"it reaches {sorted(reached)}"
            )


def test_readme_stays_a_front_page() -> None:
    lines = _readme_lines()
    assert len(lines) < MAX_LINES, (
        f"README.md has {len(lines)} lines; keep it under {MAX_LINES} (move the detail to docs/)"
    )


def test_quick_start_and_test_command_are_verbatim() -> None:
    lines = [line.strip() for line in _readme_lines()]
    for command in (*QUICK_START, TEST_COMMAND):
        assert command in lines, f"the README lost the command line {command!r}"


def test_ci_runs_the_readme_test_command() -> None:
    ci = [line.strip() for line in CI.read_text(encoding="utf-8").splitlines()]
    commands = [line for line in ci if line and not line.startswith("#")]
    assert commands[-1] == TEST_COMMAND, f".ci/run should end with the README's {TEST_COMMAND!r}"


def _headings(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file (code fences skipped)."""
    anchors, fenced = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            text = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return anchors


def test_links_resolve_and_every_doc_is_linked() -> None:
    targets = _LINK.findall(README.read_text(encoding="utf-8"))
    for target in targets:
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = README.parent / path if path else README
        assert file.exists(), f"the README links to {target!r}, which does not exist"
        if anchor and file.suffix == ".md":
            assert anchor in _headings(file), f"the README links to {target!r}: no such heading in {path}"
    linked = {target.partition("#")[0] for target in targets}
    pages = sorted(f"docs/{doc.name}" for doc in (REPO / "docs").glob("*.md"))
    unlinked = [page for page in pages if page not in linked]
    assert not unlinked, f"the README should link every page of docs/: {unlinked}"
