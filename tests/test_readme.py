"""The docs' method list (docs/methods.md) and command reference (docs/commands.md) are the CLI's own output;
LOWMERGE_UPDATE_README=1 rewrites them. README starts with the two commands CI runs."""
from __future__ import annotations

import os
import re
from pathlib import Path

from conftest import run_cli

from lowmem_merge.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
COMMANDS = ("", "merge", "moe", "inspect", "methods", "demo", "export")       # the reference's order; every command is there
SECTIONS = {   # marker name -> (the file holding it, the commands whose output it shows)
    "methods": (ROOT / "docs" / "methods.md", [("lowmerge methods", ["methods"])]),
    "help": (ROOT / "docs" / "commands.md",
             [(f"lowmerge {c} --help".strip(), [*c.split(), "--help"]) for c in COMMANDS]),
}


def render(section: str) -> str:
    blocks = []
    for title, args in SECTIONS[section][1]:
        out = run_cli(*args, env={"COLUMNS": "110"}, check=True).stdout.replace("python -m lowmem_merge", "lowmerge")
        blocks.append(f"```\n$ {title}\n{out.rstrip()}\n```")
    return "\n\n".join(blocks)


def test_docs_match_cli_output():
    for section, (path, _) in SECTIONS.items():
        text = path.read_text()
        pattern = re.compile(rf"(<!-- {section}:begin -->\n).*?(<!-- {section}:end -->)", re.S)
        assert pattern.search(text), f"{path.name} lost its {section} markers"
        fresh = pattern.sub(lambda m: m.group(1) + render(section) + "\n" + m.group(2), text)
        if os.environ.get("LOWMERGE_UPDATE_README"):
            path.write_text(fresh)
            text = fresh
        assert fresh == text, (f"{path.name}'s {section} section is stale: run LOWMERGE_UPDATE_README=1 pytest "
                               "tests/test_readme.py")


def test_the_reference_covers_every_command():
    assert set(COMMANDS) - {""} == set(main.commands)


def test_readme_links_to_docs_pages_that_exist():
    links = re.findall(r"\]\((docs/[^)#]+)", README.read_text())
    assert len(links) >= 7
    for link in links:
        assert (ROOT / link).is_file(), link


def test_readme_starts_with_the_two_commands_ci_uses():
    text = README.read_text()
    assert "make demo" in text.split("## The commands")[0]
    assert "make test" in text.split("## The commands")[0]
    ci = (README.parent / ".ci" / "run").read_text()
    assert "make test" in ci
