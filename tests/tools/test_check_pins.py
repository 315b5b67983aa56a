"""`make test` refuses an install file that names a file only one machine has (issue 8)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHECK = ROOT / "tools" / "check_pins.py"


def _copy_install_files(dest: Path) -> None:
    for name in ("requirements.in", "constraints.txt", "Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, dest / name)
    (dest / ".ci").mkdir()
    shutil.copy(ROOT / ".ci" / "run", dest / ".ci" / "run")


def _run(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(CHECK), str(root)], capture_output=True, text=True, timeout=30)


def test_the_repository_installs_from_the_index_only() -> None:
    result = _run(ROOT)
    assert result.returncode == 0, result.stderr


def test_a_local_wheel_pin_fails_with_the_offending_line(tmp_path: Path) -> None:
    _copy_install_files(tmp_path)
    constraints = tmp_path / "constraints.txt"
    constraints.write_text(constraints.read_text().replace(
        "srslib==0.1.5", "srslib @ file:///tmp/srsdl/srslib-0.1.5-py3-none-any.whl"))
    result = _run(tmp_path)
    assert result.returncode == 1
    assert "constraints.txt:" in result.stderr and "srslib @ file:///tmp/srsdl" in result.stderr
    assert "package index" in result.stderr


def test_a_path_in_the_makefile_or_a_service_pyproject_fails(tmp_path: Path) -> None:
    _copy_install_files(tmp_path)
    makefile = tmp_path / "Makefile"
    makefile.write_text(makefile.read_text() + "\nextra:\n\tpip install /tmp/wheels/thing-1.0-py3-none-any.whl\n")
    service = tmp_path / "services" / "demo"
    service.mkdir(parents=True)
    (service / "pyproject.toml").write_text(
        '[project]\nname = "demo"\nversion = "0"\ndependencies = ["thing @ file:///home/me/thing"]\n')
    result = _run(tmp_path)
    assert result.returncode == 1
    assert "Makefile:" in result.stderr and "/tmp/wheels" in result.stderr
    assert "services/demo/pyproject.toml" in result.stderr


def test_requirements_by_name_pass(tmp_path: Path) -> None:
    (tmp_path / "requirements.in").write_text("# runtime\nredis[hiredis]\nnats-py>=2.0,<3 ; python_version >= '3.11'\n")
    (tmp_path / "constraints.txt").write_text("redis==8.1.0\nnats-py==2.16.0\n")
    assert _run(tmp_path).returncode == 0


def test_pip_find_links_fails_but_rm_f_in_ci_passes(tmp_path: Path) -> None:
    """`-f` is pip's --find-links only on a pip line: `.ci/run`'s `rm -f /usr/sbin/policy-rc.d`
    once made every `make test` fail."""
    _copy_install_files(tmp_path)
    run = tmp_path / ".ci" / "run"
    run.write_text(run.read_text() + "\nrm -f /usr/sbin/policy-rc.d\n")
    assert _run(tmp_path).returncode == 0, _run(tmp_path).stderr
    run.write_text(run.read_text() + "python3 -m pip install -f wheels/ srslib\n")
    result = _run(tmp_path)
    assert result.returncode == 1 and "pip install -f wheels/" in result.stderr
