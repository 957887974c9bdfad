"""The documentation: a short README that starts with its two commands, docs/ pages whose links resolve,
generated reference pages in step with the code, and every dependency explained."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from autocontour.cli import build_parser, main
from autocontour.cli.reference import REGENERATE, cli_markdown, pages
from autocontour.cli.settings import setting_rows, settings_markdown

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]

SETUP_COMMAND = ("python3 -m venv .venv && .venv/bin/pip install -e '.[dev]' && "
                 ".venv/bin/autocontour segment examples/pelvis_ct/ct.nii.gz --out out/example")
TEST_COMMAND = ".venv/bin/python -m pytest"

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M)


def _without_code(text: str) -> str:
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    headings = re.findall(r"^#{1,6}\s+(.*?)\s*#*$", FENCE.sub("", path.read_text(encoding="utf-8")), re.M)
    return {_slug(heading) for heading in headings}


def test_readme_is_a_short_guide_that_starts_with_its_two_commands():
    text = README.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; keep it at most 200 and move the rest to docs/"
    blocks = _code_blocks(text)
    assert blocks[0].strip() == SETUP_COMMAND
    assert blocks[1].strip() == TEST_COMMAND
    before_second = text[:text.index(TEST_COMMAND)]
    assert before_second.count("```") == 3, "the two commands must be the README's first code blocks"
    assert "draft for review by a qualified clinician" in text


def test_there_are_at_least_five_docs_pages_and_the_readme_links_each():
    docs = sorted(DOCS.glob("*.md"))
    assert len(docs) >= 5
    readme = README.read_text(encoding="utf-8")
    missing = [page.name for page in docs if f"](docs/{page.name})" not in readme]
    assert not missing, f"README.md's 'Where to read next' does not link {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_and_image_resolves(page: Path):
    broken = []
    for target in LINK.findall(_without_code(page.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        if not resolved.exists():
            broken.append(f"{target}: no file {resolved}")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_anchor_slugs_follow_github():
    assert _slug("Structure-centred crops (`--crops`)") == "structure-centred-crops---crops"
    assert _slug("`autocontour support build`") == "autocontour-support-build"
    assert _slug("Dependencies and why") == "dependencies-and-why"


@pytest.mark.parametrize("relative", sorted(pages()))
def test_generated_pages_are_up_to_date(relative: str):
    page = ROOT / relative
    assert page.exists(), f"{relative} is missing: run `{REGENERATE}`"
    assert page.read_text(encoding="utf-8") == pages()[relative](), \
        f"{relative} is stale: run `{REGENERATE}` to regenerate it"


def test_cli_page_lists_every_command_and_subcommand():
    text = cli_markdown()
    commands = next(action for action in build_parser()._actions if hasattr(action, "choices")
                    and isinstance(action.choices, dict))
    for name, parser in commands.choices.items():
        assert f"## `autocontour {name}`" in text
        for action in parser._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert f"`{option}`" in text


def test_configuration_page_describes_every_setting():
    rows = setting_rows()
    text = settings_markdown()
    assert len(rows) >= 35
    for row in rows:
        assert row.description, f"{row.variable} has no description= in its settings field"
        assert f"`{row.variable}`" in text
    variables = {row.variable for row in rows}
    assert {"AUTOCONTOUR_WEIGHTS", "AUTOCONTOUR_DATA_DIR", "AUTOCONTOUR_PACS_PASSWORD"} <= variables
    assert str(ROOT) not in text, "a machine-dependent default leaked into the page"


def test_settings_command_prints_every_variable(capsys):
    assert main(["settings"]) == 0
    out = capsys.readouterr().out
    for row in setting_rows():
        assert row.variable in out
    assert main(["settings", "--markdown"]) == 0
    assert capsys.readouterr().out == settings_markdown()


def test_reference_check_reports_a_stale_page(tmp_path, capsys):
    from autocontour.cli.reference import main as reference_main

    (tmp_path / "docs").mkdir()
    assert reference_main(["--root", str(tmp_path), "--check"]) == 1
    assert not (tmp_path / "docs" / "cli.md").exists()
    assert reference_main(["--root", str(tmp_path)]) == 0
    assert reference_main(["--root", str(tmp_path), "--check"]) == 0
    assert (tmp_path / "docs" / "cli.md").read_text(encoding="utf-8") == cli_markdown()


def test_every_dependency_is_explained():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = project["dependencies"] + [dep for deps in project["optional-dependencies"].values()
                                             for dep in deps]
    text = (DOCS / "dependencies.md").read_text(encoding="utf-8").lower()
    names = [re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower() for requirement in requirements]
    missing = [name for name in names if name not in text]
    assert not missing, f"docs/dependencies.md does not say why these are dependencies: {missing}"


def test_docs_state_what_is_true_now_not_how_it_was_developed():
    history = re.compile(r"\b(stop \d+|issue \d+|the sessions that built)\b", re.I)
    found = [f"{page.relative_to(ROOT)}: {match.group(0)!r}" for page in PAGES
             for match in history.finditer(page.read_text(encoding="utf-8"))]
    assert not found, "; ".join(found)
