"""Build the GPU check kit (``make gpu-kit``): a git-ignored folder of at most 60 MiB that an offline
GPU machine (Python 3.12, its own torch, no Ray, no pydantic) runs with one command.

    python -m gpu_kit.build [--out .gpu-kit] [--data ../shared/data/dogs-vs-cats] [--cache DIR] [--no-wheels]

The kit holds
  wheels/         cp312 manylinux wheels of what the job imports beyond the machine's image
                  (gpu_kit/image-packages.txt); Ray repacked without ray/jars/ray_dist.jar (Java only)
  data/           real images: train/ cat.0-199 and dog.0-199, test1/ 1-120 (what tests/test_gpu.py reads)
  run.sh          the check (gpu_kit/run.sh); catdog itself runs from the checkout around the kit
  requirements.txt, manifest.json

Downloading needs PyPI (the wheels are cached in --cache).  The wheel set is checked with
``pip install --dry-run --no-index`` for Python 3.12 on manylinux, against the kit's wheels plus
PyPI's wheels of the image's packages standing in for the image.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CAP_BYTES = 60 * 1024 * 1024
# What catdog imports beyond the image, as pyproject.toml pins it.  Not ray[default]: its extras
# (dashboard, metrics exporters, virtualenv) are for a cluster's dashboard, not a local job.
# torch / torchvision are the machine's own; catdog runs from the checkout, not from a wheel.
REQUIREMENTS = ("ray[data,train]>=2.60,<2.61", "pydantic>=2.6,<3")
DROP_FROM_RAY = ("ray/jars/",)  # ray_dist.jar: Java workers only, about 31 MiB
PYTHON_VERSION = "3.12"
PLATFORMS = tuple(f"manylinux_2_{n}_x86_64" for n in (39, 38, 36, 35, 34, 31, 28, 27, 24, 17, 12, 5)) + (
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
    "linux_x86_64",
)
TARGET = ["--python-version", PYTHON_VERSION, "--implementation", "cp", "--only-binary=:all:"] + [
    arg for platform in PLATFORMS for arg in ("--platform", platform)
]
TRAIN_IMAGES = [f"{kind}.{i}.jpg" for kind in ("cat", "dog") for i in range(200)]
TEST_IMAGES = [f"{i}.jpg" for i in range(1, 121)]


class KitError(Exception):
    """A kit that cannot be built, phrased as one line."""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages() -> set[str]:
    lines = (REPO / "gpu_kit" / "image-packages.txt").read_text().splitlines()
    return {canonical(line.strip()) for line in lines if line.strip() and not line.startswith("#")}


def wheel_name(path: Path) -> str:
    return canonical(path.name.split("-")[0])


def pip(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise KitError(f"pip {args[0]} failed: {tail[0]}")
    return result


def download(cache: Path) -> list[Path]:
    """Every wheel the requirements need for cp312 manylinux (kit and image packages alike)."""
    cache.mkdir(parents=True, exist_ok=True)
    pip("download", "--quiet", "--dest", str(cache), *TARGET, *REQUIREMENTS)
    return sorted(cache.glob("*.whl"))


def repack_without(source: Path, dest: Path, prefixes: tuple[str, ...]) -> None:
    """Copy a wheel leaving out members under ``prefixes`` (and their RECORD lines); file modes kept."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            if info.filename.startswith(prefixes):
                continue
            data = zin.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if not line.startswith(prefixes)).encode()
            zout.writestr(info, data, compress_type=info.compress_type)


def select_wheels(downloaded: list[Path], wheels: Path, stand_ins: Path) -> list[Path]:
    """Kit wheels into ``wheels`` (Ray repacked); the image's packages into ``stand_ins`` (not shipped)."""
    image = image_packages()
    for folder in (wheels, stand_ins):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    kit = []
    for path in downloaded:
        if wheel_name(path) in image:
            shutil.copy(path, stand_ins / path.name)
        elif wheel_name(path) == "ray":
            repack_without(path, wheels / path.name, DROP_FROM_RAY)
            kit.append(wheels / path.name)
        else:
            shutil.copy(path, wheels / path.name)
            kit.append(wheels / path.name)
    return kit


def check_resolves(wheels: Path, stand_ins: Path) -> list[str]:
    """``pip install --dry-run --no-index`` for cp312: the kit plus the image covers every requirement.
    Returns the names pip would install from the kit; fails if the kit holds a wheel nothing needs."""
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.json"
        pip(
            "install", "--isolated", "--dry-run", "--quiet", "--no-index", "--ignore-installed",
            "--find-links", str(wheels), "--find-links", str(stand_ins),
            "--target", str(Path(scratch) / "target"), "--report", str(report), *TARGET, *REQUIREMENTS,
        )  # fmt: skip
        installed = json.loads(report.read_text())["install"]
    needed = {canonical(item["metadata"]["name"]) for item in installed}
    kit = {wheel_name(p) for p in wheels.glob("*.whl")}
    if kit - needed:
        raise KitError(f"kit wheels nothing needs: {', '.join(sorted(kit - needed))}")
    return sorted(kit)


def copy_images(data: Path, dest: Path) -> int:
    for part, names in (("train", TRAIN_IMAGES), ("test1", TEST_IMAGES)):
        (dest / part).mkdir(parents=True, exist_ok=True)
        for name in names:
            source = data / part / name
            if not source.is_file():
                raise KitError(f"{source}: not found (--data must hold the Kaggle train/ and test1/ folders)")
            shutil.copyfile(source, dest / part / name)
    return len(TRAIN_IMAGES) + len(TEST_IMAGES)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def build(out: Path, data: Path, cache: Path, with_wheels: bool = True) -> dict:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    manifest: dict = {"python": PYTHON_VERSION, "requirements": list(REQUIREMENTS), "wheels": []}
    if with_wheels:
        kit = select_wheels(download(cache / "downloads"), out / "wheels", cache / "image-stand-ins")
        manifest["resolves_for"] = check_resolves(out / "wheels", cache / "image-stand-ins")
        manifest["wheels"] = [{"file": p.name, "bytes": p.stat().st_size} for p in kit]
        (out / "requirements.txt").write_text("\n".join(REQUIREMENTS) + "\n")
    manifest["images"] = copy_images(data, out / "data")
    shutil.copy(REPO / "gpu_kit" / "run.sh", out / "run.sh")
    os.chmod(out / "run.sh", 0o755)
    manifest["bytes"] = folder_bytes(out)  # everything but manifest.json itself
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    total = folder_bytes(out)
    if total > CAP_BYTES:
        raise KitError(f"{out}: {total / 2**20:.1f} MiB, over the {CAP_BYTES / 2**20:.0f} MiB cap")
    return manifest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / ".gpu-kit"))
    parser.add_argument("--data", default=os.environ.get("CATDOG_DATA", str(REPO.parent / "shared/data/dogs-vs-cats")))
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "catdog-gpu-kit"))
    parser.add_argument(
        "--no-wheels", action="store_true", help="images and run.sh only (run.sh --cpu needs no wheels)"
    )
    args = parser.parse_args()
    try:
        manifest = build(Path(args.out), Path(args.data), Path(args.cache), with_wheels=not args.no_wheels)
    except (KitError, subprocess.TimeoutExpired) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for wheel in manifest["wheels"]:
        print(f"  {wheel['bytes'] / 2**20:7.2f} MiB  {wheel['file']}")
    size = manifest["bytes"] / 2**20
    print(f"{args.out}: {size:.1f} MiB, {len(manifest['wheels'])} wheels, {manifest['images']} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
