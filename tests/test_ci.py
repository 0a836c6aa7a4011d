"""CI must do what the README tells a new user to do, in a fresh environment, with pinned versions."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    """The commands of the README's first shell block (comments and blank lines dropped)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_ci_runs_the_readme_install_and_test_commands_in_a_fresh_venv():
    install, main_job, tests = readme_commands()
    assert main_job == "doe build"
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert install in ci and tests in ci, "the README's install/test commands and .ci/run have drifted apart"
    assert ci.index(install) < ci.index(tests)
    # a fresh environment: the install command creates and activates it before installing anything
    assert install.startswith("python -m venv .venv && . .venv/bin/activate && ")
    assert "rm -rf .venv" in ci[: ci.index(install)]
    assert install.count("-c constraints.txt") == install.count("pip install")


def test_ci_runs_the_checks_the_readme_names():
    """Lint, format and types of both packages, and the slow test the default run leaves out."""
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for command in ("ruff check .", "ruff format --check .", "mypy", "python -m pytest -m slow"):
        assert command in ci, f".ci/run does not run {command!r}"
        assert command in readme, f"the README does not say how to run {command!r}"
    assert ci.index("ruff check .") < ci.index("python -m pytest")  # findings fail fast, before the tests


def test_the_readme_is_a_guide_and_docs_numbers_link_to_records():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 300
    for doc in ("export", "runtime", "benchmarks", "results", "design"):
        assert f"docs/{doc}.md" in readme and (ROOT / "docs" / f"{doc}.md").is_file()
    results = (ROOT / "docs" / "results.md").read_text(encoding="utf-8")
    for link in re.findall(r"\]\((\.\./benchmarks/results/[^)]+)\)", results):
        assert (ROOT / "docs" / link).resolve().exists(), f"docs/results.md links to a missing record: {link}"


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _prose(path: Path) -> str:
    return re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)  # code blocks are not links


def test_every_relative_link_in_the_docs_resolves_anchors_included():
    missing = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for link in re.findall(r"\]\(([^)\s]+)\)", _prose(doc)):
            if re.match(r"[a-z]+:", link):  # https:, mailto:
                continue
            path, _, anchor = link.partition("#")
            target = (doc.parent / path).resolve() if path else doc.resolve()
            if not target.exists():
                missing.append(f"{doc.name}: {link} (no such file)")
            elif anchor and target.suffix == ".md":
                headings = {_slug(h) for h in re.findall(r"^#+ (.+)$", _prose(target), re.M)}
                if anchor not in headings:
                    missing.append(f"{doc.name}: {link} (no heading with that anchor in {target.name})")
    assert not missing, "broken links: " + "; ".join(missing)


def test_constraints_pin_every_declared_dependency():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin (name==version)"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    declared = []
    for path in (ROOT / "pyproject.toml", ROOT / "runtime" / "pyproject.toml"):
        text = path.read_text()
        # every quoted requirement with a version operator: dependencies and extras, one or many per line
        declared += re.findall(r'"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?((?:[<>=!~]=?[^",]+,?)+)"', text)
    checked = 0
    for name, spec in declared:
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in ("doe-runtime", "setuptools", "onnxruntime-gpu"):  # gpu: not installable beside the cpu build
            continue
        assert key in pins, f"{name} is a dependency but constraints.txt does not pin it"
        # every fast-moving dependency has both bounds
        assert ">=" in spec and "<" in spec.replace("<=", ""), f"{name}{spec}: needs a lower and an upper bound"
        checked += 1
    assert checked >= 15
