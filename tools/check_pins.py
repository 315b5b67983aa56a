"""Fail when an install file names something only one machine has.

Every dependency must come from the package index by name and version. A pin such as
``srslib @ file:///tmp/srsdl/srslib-0.1.5-py3-none-any.whl`` installs on the machine that wrote
it and nowhere else, so ``make test`` runs this check before anything else.

Usage: ``python tools/check_pins.py [ROOT]`` (exit 1 with one line per offending line).
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

# A requirement from the index: a name, optional extras, optional version specifiers and markers.
INDEX_REQUIREMENT = re.compile(
    r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9._,\s-]+\])?\s*((==|>=|<=|~=|!=|<|>)\s*[A-Za-z0-9.*+!-]+\s*,?\s*)*(;.*)?$"
)
# In a Makefile or a shell script: a file URL, or a wheel/sdist/path under a machine-local folder.
LOCAL_REFERENCE = re.compile(
    r"file:|(^|[\s=\"'])(/tmp|/var/tmp|/home|/root|/opt|/mnt|/srv)/|\.whl\b|\.tar\.gz\b|--find-links"
)
# pip's short form of --find-links, on a line that runs pip (``rm -f`` is no package source).
PIP_FIND_LINKS = re.compile(r"(^|\s)-f\s")


def check_requirements(path: Path) -> list[str]:
    problems = []
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if not line:
            continue
        if not INDEX_REQUIREMENT.match(line):
            problems.append(f"{path}:{number}: not a package from the index by name and version: {raw.strip()}")
    return problems


def check_pyproject(path: Path) -> list[str]:
    data = tomllib.loads(path.read_text())
    deps = list(data.get("project", {}).get("dependencies", []))
    for group in data.get("project", {}).get("optional-dependencies", {}).values():
        deps.extend(group)
    deps.extend(data.get("build-system", {}).get("requires", []))
    problems = []
    for dep in deps:
        if "@" in dep or "file:" in dep or dep.startswith((".", "/")):
            problems.append(f"{path}: dependency not from the index: {dep}")
    return problems


def check_script(path: Path) -> list[str]:
    problems = []
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        if raw.lstrip().startswith("#"):
            continue
        if LOCAL_REFERENCE.search(raw) or ("pip" in raw and PIP_FIND_LINKS.search(raw)):
            problems.append(f"{path}:{number}: names a file only this machine has: {raw.strip()}")
    return problems


def check(root: Path) -> list[str]:
    problems: list[str] = []
    for name in ("requirements.in", "constraints.txt"):
        if (root / name).exists():
            problems += check_requirements(root / name)
    for pyproject in sorted(root.glob("pyproject.toml")) + sorted(root.glob("*/*/pyproject.toml")):
        problems += check_pyproject(pyproject)
    for script in (root / "Makefile", root / ".ci" / "run"):
        if script.exists():
            problems += check_script(script)
    return problems


def main() -> int:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent
    problems = check(root)
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        print("check_pins: every dependency must come from the package index as name==version "
              "(no file:, URL or local path): a fresh machine cannot install the lines above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
