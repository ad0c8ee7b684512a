"""The README's commands and .ci/run stay in step."""

import os
import re
from tests import REPO_ROOT

ROOT = REPO_ROOT


def _read(*parts):
    with open(os.path.join(ROOT, *parts)) as fh:
        return fh.read()


def test_ci_runs_the_readme_test_command():
    readme_commands = re.findall(r"```bash\n(python3 -m venv .*?)\n```", _read("README.md"))
    assert len(readme_commands) == 2, readme_commands
    ci_lines = [line for line in _read(".ci", "run").splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert ci_lines == [readme_commands[1]]
