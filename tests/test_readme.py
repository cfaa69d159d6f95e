"""Every Python block of the README runs as shown, each in a fresh process and a scratch folder."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import child_env

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
TIMEOUT_S = 300
# The frameworks of the optional extras: a block that imports one is skipped where it is missing.
EXTRAS = {"transformers": "transformers", "accelerate": "transformers", "lightning": "lightning"}


def python_blocks() -> list[tuple[str, str]]:
    """(the heading above it, the code) of each ```python block."""
    text = README.read_text()
    blocks = []
    for match in BLOCK.finditer(text):
        headings = re.findall(r"^#+ (.*)$", text[: match.start()], re.M)
        blocks.append((headings[-1] if headings else "top", match.group(1)))
    return blocks


BLOCKS = python_blocks()


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize(
    "code", [code for _, code in BLOCKS], ids=[f"{i}-{h}" for i, (h, _) in enumerate(BLOCKS)]
)
def test_readme_block_runs(code, tmp_path):
    imported = re.findall(r"^(?:import|from) (\w+)", code, re.M)
    for name in imported:
        if name in EXTRAS and importlib.util.find_spec(name) is None:
            pytest.skip(f"needs {name} (pip install 'gradstats[{EXTRAS[name]}]')")
    script = tmp_path / "block.py"
    script.write_text(code)
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=child_env(),
        timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}"


def test_a_broken_block_would_fail(tmp_path):
    """The runner above reports a failing block (here: a name the block never defines)."""
    script = tmp_path / "block.py"
    script.write_text("loss.backward()\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, env=child_env())
    assert result.returncode != 0
