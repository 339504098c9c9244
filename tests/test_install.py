"""Installs as a hospital runs them: the wheel with no repository around it, and deploy/install.sh for systemd.

Both build the wheel from the sources, install it outside the repository (see tests/installs.py for why the
dependencies come from the repository venv and only the wheel is installed), write the config with
``dicomnode init``, check it, start ``dicomnode serve`` from a folder outside the repository and send a fundus
series through it with dcmtk (``dcmsend`` in, ``storescp`` as the PACS).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
import yaml

from conftest import require_tools
from installs import DEPS_SITE, REPO, Served, build_wheel, ccm_series, clean_env, fundus_series, venv_with_wheel
from reliability import StoreSCP, dcmsend, free_port, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def _enhanced(folder: Path) -> list[pydicom.Dataset]:
    out = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            try:
                out.append(pydicom.dcmread(path, stop_before_pixels=True))
            except Exception:  # noqa: BLE001 - storescp's temp files
                continue
    return out


def _quick(config: Path) -> None:
    """A 1 s quiet period and loopback only, so the test does not wait 10 s per series or listen on every interface."""
    text = config.read_text()
    text = re.sub(r"(?m)^(  series_quiet_seconds: )\d+", r"\g<1>1", text)
    text = re.sub(r"(?m)^(  host: )0\.0\.0\.0", r"\g<1>127.0.0.1", text)
    config.write_text(text)


def test_wheel_contains_the_shipped_files(wheel: Path) -> None:
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"models/weights/{p.name}" for p in (REPO / "models" / "weights").iterdir() if p.is_file()}
    assert shipped and shipped <= names, sorted(shipped - names)
    assert "dicomnode/defaults/default.yaml" in names
    assert any(n.startswith("dicomnode/cli/init.py") for n in names)


def test_wheel_serves_a_series_end_to_end_outside_the_repository(wheel: Path, tmp_path: Path) -> None:
    require_tools("dcmsend", "storescp")
    bin_dir = venv_with_wheel(tmp_path / "venv", wheel)
    work = tmp_path / "site"  # the admin's folder: no repository anywhere near
    work.mkdir()
    env = clean_env()
    where = subprocess.run([str(bin_dir / "python"), "-c", "import dicomnode, models; print(dicomnode.__file__); "
                            "print(models.__file__)"], cwd=work, env=env, capture_output=True, text=True, check=True)
    for line in where.stdout.split():
        assert Path(line).is_relative_to(tmp_path / "venv"), where.stdout
        assert not Path(line).is_relative_to(REPO)

    pacs_dir = tmp_path / "pacs"
    port = free_port()
    with StoreSCP(pacs_dir) as pacs:
        init = subprocess.run([str(bin_dir / "dicomnode"), "init", "--dir", str(work), "--port", str(port),
                               "--pacs", f"PACS@127.0.0.1:{pacs.port}"], cwd=work, env=env, capture_output=True, text=True)
        assert init.returncode == 0, init.stderr
        config = work / "config.yaml"
        data = yaml.safe_load(config.read_text())
        assert data["storage"]["root"] == str(work / "var")
        assert data["models"]["hqgnet-color"]["weights"] == "builtin:hqgnet-color.pt"
        _quick(config)
        check = subprocess.run([str(bin_dir / "dicomnode"), "check-config", str(config)], cwd=work, env=env,
                               capture_output=True, text=True)
        assert check.returncode == 0 and check.stdout.startswith("OK: 4 rules, 6 models, 2 destinations"), check.stderr

        sources = ccm_series(tmp_path / "study", 2)  # routed to the shipped HQG-Net weights inside the wheel
        with Served([str(bin_dir / "dicomnode"), "serve", "--config", str(config)], work, tmp_path / "serve.log", env) as node:
            sent = dcmsend(port, sources)
            assert sent.returncode == 0, sent.stderr
            wait_until(lambda: len(_enhanced(pacs_dir)) >= 2, 300, what=f"2 enhanced instances at the PACS\n{node.text()}")
            status = subprocess.run([str(bin_dir / "dicomnode"), "status", "--config", str(config)], cwd=work, env=env,
                                    capture_output=True, text=True)
        assert node.proc is None
    received = _enhanced(pacs_dir)
    assert len(received) == 2 and len({d.SOPInstanceUID for d in received}) == 2
    source_uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in sources}
    weights_sha = hashlib.sha256((REPO / "models/weights/hqgnet-ccm.pt").read_bytes()).hexdigest()  # the wheel's copy
    for ds in received:
        assert ds.SeriesDescription.endswith("[enhanced, not for diagnosis]")
        assert "HQG-Net" in str(ds.DerivationDescription) and weights_sha in str(ds.DerivationDescription)
        assert {str(i.ReferencedSOPInstanceUID) for i in ds.SourceImageSequence} <= source_uids
    assert len(list((work / "var" / "outbox").rglob("*.dcm"))) == 2  # the outbox destination, under the absolute root
    assert status.returncode == 0, status.stderr


def test_installer_into_a_temporary_root_verifies_and_serves(wheel: Path, tmp_path: Path) -> None:
    require_tools("dcmsend")
    root = tmp_path / "root"
    port = free_port()
    python = shutil.which("python3.11", path="/usr/bin") or shutil.which("python3", path="/usr/bin")
    if python is None:
        pytest.skip("no system Python 3 in /usr/bin")
    env = clean_env(ROOT=str(root), WHEEL=str(wheel), DEPS_SITE=str(DEPS_SITE), NODE_PORT=str(port), PYTHON=python)
    run = subprocess.run(["sh", str(REPO / "deploy" / "install.sh")], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    prefix, confdir, statedir = root / "opt/dicomnode", root / "etc/dicomnode", root / "var/lib/dicomnode"
    unit = root / "etc/systemd/system/dicomnode.service"
    config = confdir / "config.yaml"
    assert (prefix / "venv/bin/dicomnode").exists() and config.exists() and statedir.is_dir()
    assert yaml.safe_load(config.read_text())["storage"]["root"] == str(statedir)

    text = unit.read_text()
    assert f"ReadWritePaths={statedir}" in text and "ProtectSystem=strict" in text and "ProtectHome=true" in text
    assert "StateDirectory=" not in text  # only for the real /var/lib/dicomnode
    assert "/work" not in text and str(REPO) not in text
    if shutil.which("systemd-analyze"):
        verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert "dicomnode.service" not in verify.stderr, verify.stderr  # no warning about the unit itself

    # Run the unit's own command lines, as systemd would (same working directory and environment).
    lines = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))
    unit_env = clean_env(**dict(kv.split("=", 1) for kv in lines["Environment"].split()))
    workdir = Path(lines["WorkingDirectory"])
    assert workdir == statedir
    pre = subprocess.run(lines["ExecStartPre"].split(), cwd=workdir, env=unit_env, capture_output=True, text=True)
    assert pre.returncode == 0, pre.stderr
    _quick(config)
    sources = fundus_series(tmp_path / "study", 1, study="installer-study")
    with Served(lines["ExecStart"].split(), workdir, tmp_path / "serve.log", unit_env) as node:
        sent = dcmsend(port, sources)
        assert sent.returncode == 0, sent.stderr
        wait_until(lambda: len(list((statedir / "outbox").rglob("*.dcm"))) == 1, 300,
                   what=f"the enhanced instance in the outbox\n{node.text()}")
    assert (statedir / "ledger.sqlite3").exists()

    # Running it again is the upgrade: the config is kept, the unit rewritten, the node still checks out.
    config.write_text(config.read_text().replace("retention_days_failed: 30", "retention_days_failed: 31"))
    again = subprocess.run(["sh", str(REPO / "deploy" / "install.sh")], env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "keeping" in again.stdout and "retention_days_failed: 31" in config.read_text()
