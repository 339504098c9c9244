"""The compose topology (deploy/compose.yaml) without containers: Orthanc as PACS, the node beside it.

Debian's Orthanc with its DICOMweb plugin runs deploy/orthanc/orthanc.json and autoroute.lua (ports, paths and the
node's address changed for loopback); the node runs deploy/compose/config.yaml (storage, ports and Orthanc's
address changed likewise). A modality stores a fundus study in Orthanc; Orthanc forwards it to the node; the node
sends the enhanced series back; QIDO-RS lists both series in the study and WADO-RS returns the enhanced objects.
The fast test checks that the compose files, the Dockerfile and the configs agree with each other.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
import yaml

from dicomnode.config import load_config

from conftest import require_tools
from installs import ccm_series
from reliability import NodeProcess, dcmsend, free_port, wait_until

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def test_compose_files_agree_with_each_other() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    orthanc_conf = json.loads((DEPLOY / "orthanc" / "orthanc.json").read_text())
    node = load_config(DEPLOY / "compose" / "config.yaml")
    for name in ("dicomnode", "dicomnode-cuda"):
        mounts = services[name]["volumes"]
        assert "./compose/config.yaml:/etc/dicomnode/config.yaml:ro" in mounts
        assert services[name]["build"]["dockerfile"] == "deploy/Dockerfile"
    assert services["dicomnode"]["build"]["args"]["VARIANT"] == "cpu"
    assert services["dicomnode-cuda"]["build"]["args"]["VARIANT"] == "cuda"
    for mount in services["orthanc"]["volumes"]:
        host = mount.split(":", 1)[0]
        assert not host.startswith("./") or (DEPLOY / host).exists(), mount
    # The node calls Orthanc by its AE title and port; Orthanc forwards to the node's AE title and port.
    pacs = node.destinations["pacs"]
    assert (pacs.ae_title, pacs.host, pacs.port) == (orthanc_conf["DicomAet"], "orthanc", orthanc_conf["DicomPort"])
    assert orthanc_conf["DicomModalities"]["dicomnode"] == [node.node.ae_title, "dicomnode", node.node.port]
    assert f"~= '{node.node.ae_title}'" in (DEPLOY / "orthanc" / "autoroute.lua").read_text()
    assert str(node.storage.root) == "/var/lib/dicomnode"
    # builtin: shipped files (classical models such as CLAHE or field normalisation have no weights)
    trained = [m for m in node.models.values() if m.kind in ("hqgnet", "hqgnet-lite", "stillgan", "lamegan")]
    assert trained and all(m.weights is not None and m.weights.is_file() for m in trained)
    assert all(m.weights is None for m in node.models.values() if m not in trained)  # classical: no weights
    assert any(m.weights is not None for m in node.models.values())
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "deploy/install.sh" in dockerfile and "TORCH=torch==2.13.0" in dockerfile  # the tested install path


def _get(url: str, accept: str = "application/dicom+json", timeout: float = 30) -> tuple[str, bytes]:
    req = urllib.request.Request(url, headers={"Accept": accept})
    with urllib.request.urlopen(req, timeout=timeout) as rsp:  # noqa: S310 - loopback test server
        return rsp.headers.get("Content-Type", ""), rsp.read()


def _json(url: str) -> list[dict]:
    try:
        return json.loads(_get(url)[1] or b"[]")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return []
        raise


def _multipart_dicom(content_type: str, body: bytes) -> list[pydicom.Dataset]:
    """The application/dicom parts of a multipart/related WADO-RS answer."""
    boundary = next(p.split("=", 1)[1].strip('"') for p in content_type.split(";") if p.strip().startswith("boundary="))
    out = []
    for part in body.split(b"--" + boundary.encode())[1:]:
        if part.startswith(b"--"):
            break
        _headers, _, payload = part.partition(b"\r\n\r\n")
        out.append(pydicom.dcmread(BytesIO(payload.rstrip(b"\r\n"))))
    return out


@pytest.mark.slow
def test_orthanc_pacs_gets_the_enhanced_series_in_the_source_study(tmp_path: Path) -> None:
    require_tools("dcmsend", "Orthanc")
    if not DICOMWEB_PLUGIN.exists():
        pytest.skip("needs orthanc-dicomweb (apt-get install orthanc orthanc-dicomweb; `make setup` installs it)")
    dicom_port, http_port, node_port = free_port(), free_port(), free_port()

    conf = json.loads((DEPLOY / "orthanc" / "orthanc.json").read_text())
    conf.update({"StorageDirectory": str(tmp_path / "orthanc-db"), "IndexDirectory": str(tmp_path / "orthanc-db"),
                 "Plugins": [str(DICOMWEB_PLUGIN)], "DicomPort": dicom_port, "HttpPort": http_port,
                 "RemoteAccessAllowed": False, "LuaScripts": [str(DEPLOY / "orthanc" / "autoroute.lua")]})
    conf["DicomModalities"]["dicomnode"] = [conf["DicomModalities"]["dicomnode"][0], "127.0.0.1", node_port]
    (tmp_path / "orthanc.json").write_text(json.dumps(conf, indent=2))

    node_conf = yaml.safe_load((DEPLOY / "compose" / "config.yaml").read_text())
    node_conf["node"].update({"host": "127.0.0.1", "port": node_port, "series_quiet_seconds": 1})
    node_conf["storage"]["root"] = str(tmp_path / "var")
    node_conf["destinations"]["outbox"]["folder"] = str(tmp_path / "var" / "outbox")
    node_conf["destinations"]["pacs"].update({"host": "127.0.0.1", "port": dicom_port})

    base = f"http://127.0.0.1:{http_port}"
    orthanc = subprocess.Popen(["Orthanc", str(tmp_path / "orthanc.json")], stdout=subprocess.DEVNULL,
                               stderr=(tmp_path / "orthanc.log").open("wb"), cwd=tmp_path)
    node = NodeProcess(tmp_path / "node", node_conf)
    try:
        node.start(timeout=120)

        def orthanc_up() -> bool:
            if orthanc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {orthanc.returncode}: {(tmp_path / 'orthanc.log').read_text()[-3000:]}")
            try:
                return bool(json.loads(_get(f"{base}/system", "application/json")[1]).get("DicomAet"))
            except OSError:
                return False

        wait_until(orthanc_up, 60, what="Orthanc's HTTP port")
        sources = ccm_series(tmp_path / "study", 2, study="orthanc-study")  # default rules: the shipped HQG-Net
        study = str(pydicom.dcmread(sources[0], stop_before_pixels=True).StudyInstanceUID)
        sent = dcmsend(dicom_port, sources, aec="ORTHANC")
        assert sent.returncode == 0, sent.stderr

        series_url = f"{base}/dicom-web/studies/{study}/series"
        wait_until(lambda: len(_json(series_url)) == 2, 300, interval=1.0,
                   what=f"2 series in the study (QIDO-RS)\n{node.stderr()[-3000:]}")
        series = _json(series_url)
        described = {s["0020000E"]["Value"][0]: s.get("0008103E", {}).get("Value", [""])[0] for s in series}
        enhanced = [uid for uid, desc in described.items() if desc.endswith("[enhanced, not for diagnosis]")]
        assert len(enhanced) == 1, described
        uid = enhanced[0]
        wait_until(lambda: len(_json(f"{series_url}/{uid}/instances")) == 2, 60, what="both enhanced instances")
        instances = _json(f"{series_url}/{uid}/instances")
        assert all(i["00080016"]["Value"][0] == "1.2.840.10008.5.1.4.1.1.7" for i in instances)  # Secondary Capture

        content_type, body = _get(f"{series_url}/{uid}", 'multipart/related; type="application/dicom"', timeout=60)
        retrieved = _multipart_dicom(content_type, body)
        source_uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in sources}
        assert len(retrieved) == 2
        for ds in retrieved:
            assert ds.StudyInstanceUID == study and "HQG-Net" in str(ds.DerivationDescription)
            assert {str(i.ReferencedSOPInstanceUID) for i in ds.SourceImageSequence} <= source_uids
            assert ds.pixel_array.shape == (192, 192)
        # Orthanc did not forward the node's own output back to it (autoroute.lua): one job only.
        time.sleep(2.0)
        status = node.cli("status", "--json")
        assert status.returncode == 0, status.stderr
        jobs = json.loads(status.stdout).get("jobs", {})
        assert sum(jobs.values()) == 1, status.stdout
    finally:
        node.stop()
        if orthanc.poll() is None:
            orthanc.terminate()
            try:
                orthanc.wait(30)
            except subprocess.TimeoutExpired:
                orthanc.kill()
                orthanc.wait(10)
