"""The set-up contract: the README opens with the main-job and test commands; CI runs the latter."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block is not None, "README must open with a bash block holding the two commands"
    before = text[: block.start()].strip().splitlines()
    assert before == ["# mlfop"], "nothing but the title may come before the two commands"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_exactly_two_commands_installing_cpu_torch_first():
    commands = _readme_commands()
    assert len(commands) == 2
    for command in commands:
        assert command.startswith("python -m pip install -q torch==2.13.0 && ")
    assert "benchmarks/step_time.py" in commands[0] or "mlfop-bench" in commands[0]
    assert commands[1].endswith("python -m pytest")


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert _readme_commands()[1] in ci.splitlines()


def test_package_metadata_asks_for_torch_2_4_or_newer_only():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'dependencies = \["torch>=2\.4"\]', pyproject)
