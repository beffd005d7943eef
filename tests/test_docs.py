"""Docs that must not drift from the code: the hooks reference, and README's set-up commands vs CI."""

from __future__ import annotations

import re
from pathlib import Path

from imagezoo import hookspecs

ROOT = Path(__file__).resolve().parents[1]


def _hookspec_names() -> set[str]:
    return {name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "imagezoo_spec")}


def test_every_hook_is_documented_and_nothing_else():
    documented = set(re.findall(r"^## (\w+)$", (ROOT / "docs" / "hooks.md").read_text(), flags=re.MULTILINE))
    assert documented == _hookspec_names()
    assert len(documented) == 6


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.+?)\n```", setup, flags=re.DOTALL)
    assert len(commands) == 2
    main_job, tests = commands
    assert "imagezoo generate --model tiny" in main_job and "torch==2.13.0" in main_job
    test_command = tests.rsplit("&&", 1)[1].strip()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert ci_lines[-1] == test_command == "pytest -q"
