"""README's two fresh-machine commands stay true: CI runs exactly README's test command."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_test_command() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- test-command -->\s*```bash\n(.+?)\n```", text, re.S)
    assert m, "README.md must show the test command in a bash block after <!-- test-command -->"
    return m.group(1).strip()


def test_ci_runs_readme_test_command():
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert ci[-1] == readme_test_command()


def test_readme_api_example_runs():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## The API in a few lines\s*```python\n(.+?)\n```", text, re.S).group(1)
    exec(compile(block, "README.md", "exec"), {})
