"""README's Python API snippets run as written against the bundled folder, in a process of their own."""

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO


def python_api_snippets() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Python API\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert section, "README.md has no '## Python API' section"
    return re.findall(r"```python\n(.*?)```", section.group(1), flags=re.S)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(python_api_snippets())))
def test_python_api_snippet_runs_as_written(index, tmp_path):
    snippet = python_api_snippets()[index]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", snippet], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"snippet {index} failed:\n{snippet}\n{result.stderr[-3000:]}"
    assert result.stdout.strip(), f"snippet {index} printed nothing"
