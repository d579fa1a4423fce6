"""The README's commands are the ones CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
  readme = ROOT.joinpath("README.md").read_text()
  ci = ROOT.joinpath(".ci", "run").read_text()
  test_cmds = [line.strip() for line in readme.splitlines() if line.strip().endswith("python -m pytest -q")]
  assert len(test_cmds) == 1
  assert test_cmds[0] in ci.splitlines()
