"""The check CI runs on a built wheel and sdist: what each requires of torch.

    python tests/wheel_metadata_check.py DIST...

A wheel (.whl) must require the torch it was built against, as setup.py's wheel_torch_requirement
words it for the installed torch (its binary loads into no other); an sdist (.tar.gz) must keep the
source range (setup.py's SOURCE_REQUIREMENTS) and say that its requirements are dynamic, since the
wheels built from it pin their own torch.
"""

from __future__ import annotations

import argparse
import email.parser
import importlib.util
import re
import sys
import tarfile
import zipfile
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_setup() -> ModuleType:
    """setup.py's functions (nothing is built: it is not run as __main__)."""
    spec = importlib.util.spec_from_file_location("gradstats_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def metadata(dist: Path) -> email.message.Message:
    """The core metadata of a wheel (METADATA) or an sdist (PKG-INFO)."""
    if dist.suffix == ".whl":
        with zipfile.ZipFile(dist) as wheel:
            name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
            text = wheel.read(name).decode()
    else:
        with tarfile.open(dist) as sdist:  # NAME-VERSION/PKG-INFO, not the egg-info's copy
            member = next(m for m in sdist.getmembers() if re.fullmatch(r"[^/]+/PKG-INFO", m.name))
            text = sdist.extractfile(member).read().decode()
    return email.parser.Parser().parsestr(text)


def torch_requirements(meta: email.message.Message) -> list[str]:
    return [r for r in meta.get_all("Requires-Dist", []) if re.match(r"torch\b", r)]


def problems(dist: Path, wheel_requirement: str, source_requirement: str) -> list[str]:
    """What is wrong with the dist's torch requirement (empty: nothing)."""
    meta = metadata(dist)
    got = torch_requirements(meta)
    wanted = [wheel_requirement] if dist.suffix == ".whl" else [source_requirement]
    found = [] if got == wanted else [f"requires {got}, not {wanted}"]
    if dist.suffix == ".whl":
        return found
    if "requires-dist" not in {d.lower() for d in meta.get_all("Dynamic", [])}:
        found.append("does not mark Requires-Dist as Dynamic (its wheels pin their own torch)")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dists", nargs="+", type=Path, metavar="DIST")
    args = parser.parse_args(argv)
    setup = load_setup()
    import torch

    wheel_requirement = setup.wheel_torch_requirement(setup.installed_torch_version(torch))
    (source_requirement,) = (r for r in setup.SOURCE_REQUIREMENTS if re.match(r"torch\b", r))
    failed = 0
    for dist in args.dists:
        found = problems(dist, wheel_requirement, source_requirement)
        print(f"{dist.name}: " + ("; ".join(found) if found else "torch requirement ok"))
        failed += bool(found)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
