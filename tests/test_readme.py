"""README's method list and command reference are the CLI's own output. LOWMERGE_UPDATE_README=1 rewrites them."""
from __future__ import annotations

import os
import re
from pathlib import Path

from conftest import run_cli

README = Path(__file__).resolve().parents[1] / "README.md"
SECTIONS = {
    "methods": [("lowmerge methods", ["methods"])],
    "help": [(f"lowmerge {c} --help".strip(), [*c.split(), "--help"]) for c in ("", "merge", "moe", "inspect", "methods", "demo", "export")],
}


def render(section: str) -> str:
    blocks = []
    for title, args in SECTIONS[section]:
        out = run_cli(*args, env={"COLUMNS": "110"}, check=True).stdout.replace("python -m lowmem_merge", "lowmerge")
        blocks.append(f"```\n$ {title}\n{out.rstrip()}\n```")
    return "\n\n".join(blocks)


def test_readme_matches_cli_output():
    text = README.read_text()
    for section in SECTIONS:
        pattern = re.compile(rf"(<!-- {section}:begin -->\n).*?(<!-- {section}:end -->)", re.S)
        fresh = pattern.sub(lambda m: m.group(1) + render(section) + "\n" + m.group(2), text)
        if os.environ.get("LOWMERGE_UPDATE_README"):
            README.write_text(fresh)
            text = fresh
        assert fresh == text, f"README's {section} section is stale: run LOWMERGE_UPDATE_README=1 pytest tests/test_readme.py"


def test_readme_starts_with_the_two_commands_ci_uses():
    text = README.read_text()
    assert "make demo" in text.split("## What a merge does")[0]
    assert "make test" in text.split("## What a merge does")[0]
    ci = (README.parent / ".ci" / "run").read_text()
    assert "make test" in ci
