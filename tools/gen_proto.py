"""Generate the Python code for proto/ into libs/common (``make proto``), or check it is fresh.

The contracts live under ``proto/rempart/<area>/v1``; their generated modules go to
``rempart.common.pb.<area>.v1`` so that they exist once, beside the shared library, and do not
collide with the service packages ``rempart.policy`` and ``rempart.auth``.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT = ROOT / "libs" / "common" / "src" / "rempart" / "common" / "pb"
BIN = Path(sys.executable).parent
IMPORT_RE = re.compile(r"^from rempart\.(\w+)\.v1 import", re.MULTILINE)


def generate(into: Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"--plugin=protoc-gen-mypy={BIN / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={BIN / 'protoc-gen-mypy_grpc'}",
            f"--python_out={tmp}",
            f"--mypy_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--mypy_grpc_out={tmp}",
            *protos,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        generated = Path(tmp) / "rempart"
        into.mkdir(parents=True, exist_ok=True)
        (into / "__init__.py").write_text('"""Generated protobuf code: run `make proto`."""\n')
        for src in sorted(generated.rglob("*.py*")):
            rel = src.relative_to(generated)
            dest = into / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            text = IMPORT_RE.sub(r"from rempart.common.pb.\1.v1 import", src.read_text())
            text = text.replace("import rempart.", "import rempart.common.pb.")
            dest.write_text(text)
        for pkg in {p.parent for p in into.rglob("*.py")} | {p.parent for p in into.rglob("*.pyi")}:
            init = pkg / "__init__.py"
            if not init.exists():
                init.write_text("")
        (into / "py.typed").write_text("")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the generated code is stale")
    args = parser.parse_args()
    if not args.check:
        if OUT.exists():
            shutil.rmtree(OUT)
        generate(OUT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "pb"
        generate(fresh)
        stale = _differences(filecmp.dircmp(fresh, OUT))
        if stale:
            print("generated protobuf code is stale; run `make proto`:", *stale, sep="\n  ")
            return 1
    return 0


def _differences(cmp: filecmp.dircmp[str]) -> list[str]:
    out = [*cmp.left_only, *cmp.right_only, *cmp.diff_files]
    out = [f for f in out if f != "__pycache__"]
    for sub in cmp.subdirs.values():
        out.extend(_differences(sub))
    return out


if __name__ == "__main__":
    sys.exit(main())
