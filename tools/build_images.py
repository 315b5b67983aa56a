"""Build the service images from the one Dockerfile at the repository root (`make images`).

The chart's values (deploy/helm/rempart/values.yaml, components.*) are the one source of each
image's build arguments, so that an image runs and exposes what the chart expects of it:
  SERVICE  the image's name (imageName): the package of services/<imageName> it installs;
  MODULE   the module of the component named like the image (the relay's rempart.smtp_edge.relay
           runs from the smtp-edge image: the chart sets every container's command: anyway);
  PORTS    that component's containerPorts and opsPort, which the image EXPOSEs.
Images are tagged as the chart pulls them by default: <registry>/<repository>/<imageName>:<tag>,
the tag defaulting to the chart's appVersion.

    python tools/build_images.py [--dry-run] [--repository REGISTRY/REPO] [--tag TAG] [IMAGE ...]

Environment: DOCKER, the build command (default docker; `podman` works the same way).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
CHART = REPO_ROOT / "deploy" / "helm" / "rempart"


def image_build_args(values: dict[str, Any]) -> dict[str, dict[str, str]]:
    """The Dockerfile's build arguments by image name, from the chart's values."""
    components = values["components"]
    images = {}
    for name, component in components.items():
        if component["imageName"] == name:
            ports = [port["containerPort"] for port in component["ports"]] + [component["opsPort"]]
            images[name] = {"SERVICE": name, "MODULE": component["module"],
                            "PORTS": " ".join(str(port) for port in ports)}
    unnamed = sorted({component["imageName"] for component in components.values()} - images.keys())
    if unnamed:
        raise ValueError(f"no component is named like the image(s) {unnamed}: no MODULE or PORTS for them")
    return images


def main() -> int:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    image = values["image"]
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("images", nargs="*", metavar="IMAGE", help="image names (default: every one)")
    parser.add_argument("--repository", default="/".join(filter(None, [image["registry"], image["repository"]])),
                        help="prefix of the image names (default: the values' image.registry/image.repository)")
    parser.add_argument("--tag", default=image["tag"] or chart["appVersion"],
                        help="image tag (default: the values' image.tag, else the chart's appVersion)")
    parser.add_argument("--dry-run", action="store_true", help="print the build commands, run none")
    args = parser.parse_args()
    images = image_build_args(values)
    unknown = sorted(set(args.images) - images.keys())
    if unknown:
        parser.error(f"unknown image(s) {unknown}; the images are {sorted(images)}")
    docker = shlex.split(os.environ.get("DOCKER") or "docker")
    for name in args.images or images:
        build_args = [arg for key, value in images[name].items() for arg in ("--build-arg", f"{key}={value}")]
        command = [*docker, "build", "--file", "Dockerfile", *build_args,
                   "--tag", f"{args.repository}/{name}:{args.tag}", "."]
        print("+", shlex.join(command), flush=True)
        if not args.dry_run and subprocess.run(command, cwd=REPO_ROOT, check=False).returncode:
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
