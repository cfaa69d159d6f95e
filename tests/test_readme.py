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
# What a block may import that `pip install gradstats` does not bring: the module, the package
# that provides it, and how to install it. Such a block is skipped, saying so, where it is missing.
OPTIONAL = {
    "transformers": ("transformers", "pip install 'gradstats[transformers]'"),
    "accelerate": ("accelerate", "pip install 'gradstats[transformers]'"),
    "lightning": ("lightning", "pip install 'gradstats[lightning]'"),
    "matplotlib": ("matplotlib", "pip install 'gradstats[plot]'"),
    "torch.utils.tensorboard": ("tensorboard", "pip install tensorboard"),
}


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


def missing_optional(code: str) -> str | None:
    """Why the block cannot run here: an optional package it imports is not installed."""
    for module in re.findall(r"^(?:import|from) ([\w.]+)", code, re.M):
        for prefix, (package, install) in OPTIONAL.items():
            wanted = module == prefix or module.startswith(prefix + ".")
            if wanted and importlib.util.find_spec(package) is None:
                return f"needs {package} ({install})"
    return None


@pytest.mark.parametrize(
    "code", [code for _, code in BLOCKS], ids=[f"{i}-{h}" for i, (h, _) in enumerate(BLOCKS)]
)
def test_readme_block_runs(code, tmp_path):
    why = missing_optional(code)
    if why is not None:
        pytest.skip(why)
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


def test_a_block_needing_a_missing_package_is_skipped_with_its_reason(monkeypatch):
    """tensorboard (imported through torch.utils.tensorboard) and the extras, when missing."""
    installed = importlib.util.find_spec
    hidden = {"tensorboard", "lightning"}
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name in hidden else installed(name)
    )
    block = "import torch\nfrom torch.utils.tensorboard import SummaryWriter\n"
    assert missing_optional(block) == "needs tensorboard (pip install tensorboard)"
    assert missing_optional("import lightning\n") == (
        "needs lightning (pip install 'gradstats[lightning]')"
    )
    assert missing_optional("import torch\nimport gradstats\n") is None
