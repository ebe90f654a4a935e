"""The README's two commands are the ones CI and the main job run."""

import re
from pathlib import Path

REPO = Path(__file__).parents[2]


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    head = text.split("## The two commands")[1].split("\n## ")[0]
    return re.findall(r"```bash\n(.+?)\n```", head, re.S)


def test_readme_has_two_commands_at_the_top():
    commands = _readme_commands()
    assert commands == ["bash deploy/local/main.sh", "bash deploy/local/test.sh"]


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    test_command = _readme_commands()[1]
    assert test_command in [line.strip() for line in ci]


def test_test_command_treats_no_tests_as_failure():
    script = (REPO / "deploy" / "local" / "test.sh").read_text()
    assert '"$status" -eq 5' in script and "exit 1" in script
