"""How gradstats was installed, and the command that rebuilds it that way.

No torch import: setup.py loads this file to word its own advice.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from urllib.parse import unquote, urlparse

DIST_NAME = "gradstats"
# The commands the README gives; gradstats builds against the torch already installed.
REGULAR = "pip install --no-build-isolation --no-deps ."
EDITABLE = "pip install --no-build-isolation --config-settings editable_mode=compat -e ."
IN_PLACE = "./run test"
# The file in a checkout that says the package sits in a source tree, and ./run's script.
SETUP_FILE = "setup.py"
RUN_SCRIPT = "run"

WHEEL, EDITABLE_INSTALL, IN_PLACE_BUILD = "wheel", "editable", "in-place"


def source_tree(package_dir: Path) -> Path | None:
    """The checkout holding the package folder, or None for an installed copy."""
    tree = package_dir.resolve().parent
    return tree if (tree / SETUP_FILE).is_file() else None


def editable_folders() -> list[Path]:
    """The folders pip recorded for editable installs of gradstats on sys.path (a checkout's own
    gradstats.egg-info, found first from its folder, records none)."""
    folders = []
    for dist in importlib.metadata.distributions(name=DIST_NAME):
        try:
            direct = json.loads(dist.read_text("direct_url.json") or "{}")
        except ValueError:
            continue
        if direct.get("dir_info", {}).get("editable"):
            folders.append(Path(unquote(urlparse(direct.get("url", "")).path)).resolve())
    return folders


def how_installed(package_dir: Path) -> str:
    """WHEEL (an installed copy), EDITABLE_INSTALL (pip's editable install of a checkout) or
    IN_PLACE_BUILD (a checkout built in place and imported from it, e.g. by ./run)."""
    tree = source_tree(package_dir)
    if tree is None:
        return WHEEL
    return EDITABLE_INSTALL if tree in editable_folders() else IN_PLACE_BUILD


def rebuild_advice(package_dir: Path, env: str = "") -> str:
    """What to run to get a build that fits the installed torch, for the way gradstats was
    installed; env (e.g. "GRADSTATS_CPU_ISA=default ") goes before the build command."""
    kind = how_installed(package_dir)
    if kind == WHEEL:
        return (
            "install the gradstats wheel built for the installed torch, or build one for it from a"
            f" gradstats checkout: {env}{REGULAR}"
        )
    tree = source_tree(package_dir)
    if kind == EDITABLE_INSTALL:
        also = f", or {env}{IN_PLACE}" if (tree / RUN_SCRIPT).is_file() else ""
        return f"rebuild the editable install: cd {tree} && {env}{EDITABLE}{also}"
    if (tree / RUN_SCRIPT).is_file():
        return f"rebuild it in place: cd {tree} && {env}{IN_PLACE} (it rebuilds, then tests)"
    return f"rebuild it: cd {tree} && {env}{EDITABLE}"
