"""The whole node against real dcmtk peers: dcmsend as the modality, storescp as the PACS.

Slow tests (``-m slow``) run ``dicomnode serve`` as a subprocess so SIGTERM and restarts are real.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml

from dicomnode import cli as node_cli
from dicomnode.cli.node import collect_status
from dicomnode.config import parse_config
from dicomnode.resident import ResidentModel, ResidentModels
from dicomnode.server import Server, ServerOptions
from dicomnode.spool import Spool
from models.registry import Enhancer, ModelInfo

from conftest import require_tools
from factories import sample_series
from reliability import (
    NodeProcess,
    StoreSCP,
    dcmsend,
    free_port,
    node_config,
    tool_env,
    wait_port,
    wait_until,
    write_series,
)

SC_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image
    "1.2.840.10008.5.1.4.1.1.7.1",
    "1.2.840.10008.5.1.4.1.1.7.2",
    "1.2.840.10008.5.1.4.1.1.7.3",
    "1.2.840.10008.5.1.4.1.1.7.4",
}


# ------------------------------------------------------------------------------------------ inputs
def jpeg_fundus_series(folder: Path, count: int) -> list[Path]:
    """Ophthalmic photographs, JPEG baseline YBR_FULL_422, made by dcmtk's img2dcm from skimage's retina."""
    from PIL import Image
    from skimage.data import retina
    from skimage.transform import resize

    folder.mkdir(parents=True, exist_ok=True)
    rgb = (resize(retina(), (160, 160), anti_aliasing=True) * 255).astype(np.uint8)
    jpg = folder / "retina.jpg"
    Image.fromarray(rgb).save(jpg, quality=90)
    out: list[Path] = []
    for i in range(count):
        path = folder / f"oph_{i}.dcm"
        keys = ["--no-checks", "-k", "Modality=OP", "-k", "ImageLaterality=R", "-k", f"InstanceNumber={i + 1}",
                "-k", "PatientID=E2E-0001",
                "-k", "SeriesDescription=fundus photo"]
        if out:
            keys += ["-sef", str(out[0])]  # same patient, study and series as the first
        subprocess.run(["img2dcm", "-oph", *keys, str(jpg), str(path)], check=True, capture_output=True, timeout=60)
        out.append(path)
    return out


def received(folder: Path) -> list[pydicom.Dataset]:
    out = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            try:
                out.append(pydicom.dcmread(path))
            except Exception:  # noqa: BLE001 - a peer's temp file mid-write
                continue
    return out


def status_json(node: NodeProcess) -> dict:
    """What `dicomnode status --json` prints, read in-process (the CLI costs seconds per call here)."""
    spool = Spool(node.config["storage"]["root"])
    try:
        return json.loads(json.dumps(collect_status(spool.ledger)))
    finally:
        spool.close()


# ------------------------------------------------------------------------------------------ fast, in-process
def test_model_that_fails_to_load_fails_its_jobs_with_the_reason(tmp_path: Path, free_port: int) -> None:
    require_tools("dcmsend")
    weights = tmp_path / "missing.pt"
    cfg = parse_config({
        "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": free_port, "series_quiet_seconds": 0.2},
        "storage": {"root": str(tmp_path / "var")},
        "destinations": {"out": {"folder": str(tmp_path / "out")}},
        "models": {"broken": {"kind": "hqgnet", "weights": str(weights)}},
        "rules": [{"name": "ct", "match": {"Modality": "CT"}, "model": "broken", "destinations": ["out"]},
                  {"name": "mr", "match": {"Modality": "MR"}, "destinations": ["out"]}],
    }, tmp_path)
    server = Server(cfg, options=ServerOptions(drain_seconds=5))
    server.start()
    try:
        assert "broken" in server.models.failures
        ct = sample_series("CT_small.dcm", tmp_path / "ct", 2)
        mr = sample_series("MR_small.dcm", tmp_path / "mr", 1)
        out = dcmsend(server.port, [*ct, *mr])
        assert out.returncode == 0, out.stderr
        ledger = server.spool.ledger
        wait_until(lambda: {j.state for j in ledger.jobs()} == {"failed", "done"} and len(ledger.jobs()) == 2,
                   30, what="both jobs settled")
        (failed,) = ledger.jobs("failed")
        assert failed.model == "broken" and "failed to load" in failed.error and "missing.pt" in failed.error
        (done,) = ledger.jobs("done")  # the forward rule still works beside the broken model
        assert done.action == "forward"
        assert len(list((tmp_path / "out").glob("*.dcm"))) == 1
    finally:
        assert server.stop()


class SlowIdentity(Enhancer):
    """A model that takes its time: the SCP must keep answering meanwhile."""

    info = ModelInfo(kind="test-slow", name="SlowIdentity", version="1")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.calls = 0
        self.busy_until = 0.0

    def enhance(self, images, guidance=None):  # type: ignore[no-untyped-def]
        self.calls += 1
        self.busy_until = time.perf_counter() + self.seconds
        time.sleep(self.seconds)
        return [np.asarray(img, dtype=np.float32) for img in images]


def test_partial_match_unmatched_series_and_scp_answers_while_a_model_works(
    tmp_path: Path, free_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    require_tools("dcmsend", "echoscu")
    cfg = parse_config({
        "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": free_port, "series_quiet_seconds": 0.2},
        "storage": {"root": str(tmp_path / "var")},
        "destinations": {"out": {"folder": str(tmp_path / "out")}},
        "models": {"slow": {"kind": "clahe", "batch_size": 1}},
        "rules": [{"name": "first-ct-only", "match": {"Modality": "CT", "InstanceNumber": "1"}, "model": "slow",
                   "destinations": ["out"]}],
        "unmatched": {"action": "ignore"},
    }, tmp_path)
    slow = SlowIdentity(2.0)
    models = ResidentModels({"slow": ResidentModel("slow", slow, "cpu", 1)}, {})
    server = Server(cfg, models=models, options=ServerOptions(drain_seconds=10))
    server.start()
    try:
        ct = sample_series("CT_small.dcm", tmp_path / "ct", 3)  # InstanceNumber 1, 2, 3: the rule matches one
        mr = sample_series("MR_small.dcm", tmp_path / "mr", 1)  # no rule: unmatched, ignored
        assert dcmsend(server.port, [*ct, *mr]).returncode == 0
        ledger = server.spool.ledger
        wait_until(lambda: slow.calls > 0, 20, interval=0.05, what="the model to start")
        echo = subprocess.run(["echoscu", "-aec", "DICOMNODE", "127.0.0.1", str(server.port)], capture_output=True,
                              timeout=30)
        assert echo.returncode == 0 and time.perf_counter() < slow.busy_until  # answered while the model works
        wait_until(lambda: len(ledger.jobs("done")) == 2, 30, what="both jobs done")
        ct_job = next(j for j in ledger.jobs() if j.model == "slow")
        routed = sorted((i.routed, i.sop_uid) for i in ledger.instances(ct_job.id))
        assert [r for r, _ in routed].count("matched") == 1 and [r for r, _ in routed].count("not_matched") == 2
        (output,) = list((tmp_path / "out").glob("*.dcm"))
        first = str(pydicom.dcmread(ct[0]).SOPInstanceUID)
        assert pydicom.dcmread(output).SourceImageSequence[0].ReferencedSOPInstanceUID == first
        (unmatched,) = ledger.unmatched_series()
        assert unmatched.series_uid == str(pydicom.dcmread(mr[0]).SeriesInstanceUID)
        assert unmatched.action == "ignore"
    finally:
        assert server.stop()
    config_path = tmp_path / "node.yaml"
    config_path.write_text(yaml.safe_dump({
        "storage": {"root": str(tmp_path / "var")}, "destinations": {"out": {"folder": str(tmp_path / "out")}},
        "rules": [{"name": "r", "match": {"Modality": "CT"}, "destinations": ["out"]}],
    }))
    assert node_cli.main(["status", "--config", str(config_path)]) == 0
    text = capsys.readouterr().out
    assert "done 2" in text and "unmatched series: 1" in text and unmatched.series_uid in text
    assert node_cli.main(["resend", "--config", str(config_path), "--all-dead"]) == 0
    assert capsys.readouterr().out.startswith("0 dead-lettered deliveries")


# ------------------------------------------------------------------------------------------ slow, processes
@pytest.mark.slow
def test_enhance_end_to_end_to_pacs(tmp_path: Path) -> None:
    """JPEG YBR fundus + 16-bit CT + MR series in, CLAHE SC series out at the PACS, valid and renderable."""
    pytest.importorskip("dicomnode.enhance", reason="dicomnode.enhance (imaging/derive) not built yet")
    require_tools("dcmsend", "storescp", "img2dcm", "dciodvfy", "dcml2pnm")
    inputs = [
        *jpeg_fundus_series(tmp_path / "in" / "oph", 2),
        *sample_series("CT_small.dcm", tmp_path / "in" / "ct", 3),
        *sample_series("MR_small.dcm", tmp_path / "in" / "mr", 2),
    ]
    sources = {str(pydicom.dcmread(p).SOPInstanceUID): pydicom.dcmread(p, stop_before_pixels=True) for p in inputs}
    assert pydicom.dcmread(inputs[0]).PhotometricInterpretation == "YBR_FULL_422"
    with StoreSCP(tmp_path / "pacs") as pacs:
        cfg = node_config(
            tmp_path / "var", free_port(), {"pacs": {"type": "dicom", "ae_title": "PACS", "host": "127.0.0.1",
                                                     "port": pacs.port}},
            rules=[{"name": "fundus", "match": {"Modality": "OP"}, "model": "clahe", "destinations": ["pacs"]},
                   {"name": "ct-mr", "match": {"Modality": ["CT", "MR"]}, "model": "clahe",
                    "destinations": ["pacs"]}],
        )
        with NodeProcess(tmp_path / "node", cfg) as node:
            sent = dcmsend(node.port, inputs)
            assert sent.returncode == 0, sent.stderr
            wait_until(lambda: len(received(pacs.folder)) >= len(inputs), 90, what="SC series at the PACS")
            wait_until(lambda: status_json(node)["jobs"]["done"] == 3, 30, what="3 jobs done")
            info = status_json(node)
        assert node.stderr().count("Traceback") == 0, node.stderr()[-3000:]
    outputs = received(pacs.folder)
    assert len(outputs) == len(inputs)
    series_out: dict[str, set[str]] = {}
    for ds in outputs:
        assert ds.SOPClassUID in SC_CLASSES
        (ref,) = ds.SourceImageSequence
        src = sources[str(ref.ReferencedSOPInstanceUID)]
        assert ds.StudyInstanceUID == src.StudyInstanceUID
        assert ds.SeriesInstanceUID != src.SeriesInstanceUID
        assert ds.SOPInstanceUID not in sources
        series_out.setdefault(str(src.SeriesInstanceUID), set()).add(str(ds.SeriesInstanceUID))
    assert len(series_out) == 3 and all(len(v) == 1 for v in series_out.values())  # one new series per input
    for path in sorted(p for p in pacs.folder.rglob("*") if p.is_file()):
        check = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]
        assert not errors, f"{path.name}: {errors}"
        png = tmp_path / "png" / f"{path.name}.png"
        png.parent.mkdir(exist_ok=True)
        render = subprocess.run(["dcml2pnm", "+on", str(path), str(png)], capture_output=True, timeout=60)
        assert render.returncode == 0 and png.stat().st_size > 0, render.stderr
    assert info["deliveries"]["sent"] == len(inputs) and info["deliveries"]["dead_letter"] == 0


@pytest.mark.slow
def test_refused_store_is_never_sent_then_resend_delivers(tmp_path: Path) -> None:
    """A PACS refusing the association: retries back off, then dead letter with the reason; `resend`
    delivers once a PACS accepts. (A PACS that is down is covered by the restart test.)"""
    require_tools("dcmsend", "storescp")
    pacs_port = free_port()
    series = write_series(tmp_path / "in", "study-r", "series-r", 3)
    cfg = node_config(
        tmp_path / "var", free_port(),
        {"pacs": {"type": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port, "timeout_seconds": 5}},
        rules=[{"name": "fwd", "match": {"Modality": "CT"}, "destinations": ["pacs"]}],
        dispatch={"max_attempts": 2, "backoff_initial_seconds": 0.3, "backoff_max_seconds": 0.5},
    )
    refusing = subprocess.Popen(["storescp", "--refuse", "-aet", "PACS", str(pacs_port)], env=tool_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(pacs_port, 15, refusing)
        with NodeProcess(tmp_path / "node", cfg) as node:
            assert dcmsend(node.port, series).returncode == 0
            wait_until(lambda: status_json(node)["deliveries"]["dead_letter"] == 3, 60, what="dead letters")
    finally:
        refusing.terminate()
        refusing.wait(10)
    with node:  # the same node, restarted: dead letters stay dead until resent
        info = status_json(node)
        assert info["deliveries"]["sent"] == 0 and info["jobs"]["failed"] == 1
        assert all("rejected" in d["last_error"] and d["attempts"] == 2 for d in info["dead_letters"]), info
        assert json.loads(node.cli("status", "--json").stdout)["deliveries"]["dead_letter"] == 3
        text = node.cli("status").stdout
        assert "dead_letter 3" in text and "Testpatient" not in text and "PID-000001" not in text
        with StoreSCP(tmp_path / "pacs", port=pacs_port) as pacs:
            out = node.cli("resend", "--job", str(info["dead_letters"][0]["job"]))
            assert out.returncode == 0 and out.stdout.startswith("3 "), out.stdout + out.stderr
            wait_until(lambda: status_json(node)["jobs"]["done"] == 1, 30, what="job done after resend")
            wait_until(lambda: len(received(pacs.folder)) == 3, 10, what="3 files at the PACS")
        assert status_json(node)["deliveries"] == {
            "pending": 0, "sent": 3, "dead_letter": 0, "pending_by_destination": {}, "dead_letter_by_destination": {}}
    log = node.stderr()
    assert "Testpatient" not in log and "PID-000001" not in log and "19700101" not in log  # UIDs only


@pytest.mark.slow
def test_sigterm_then_restart_resumes(tmp_path: Path) -> None:
    """Work left by a SIGTERM (a collecting series, undelivered outputs) finishes after the restart."""
    require_tools("dcmsend", "storescp")
    pacs_port = free_port()
    first = write_series(tmp_path / "in", "study-s", "series-1", 2)
    second = write_series(tmp_path / "in", "study-s", "series-2", 2)
    cfg = node_config(
        tmp_path / "var", free_port(),
        {"pacs": {"type": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port, "timeout_seconds": 5}},
        rules=[{"name": "fwd", "match": {"Modality": "CT"}, "destinations": ["pacs"]}],
        node={"series_quiet_seconds": 3.0},
        dispatch={"max_attempts": 5, "backoff_initial_seconds": 60, "backoff_max_seconds": 300},
    )
    node = NodeProcess(tmp_path / "node", cfg).start()
    try:
        assert dcmsend(node.port, first).returncode == 0
        wait_until(lambda: any(d["attempts"] == 1 for d in status_json(node)["pending_deliveries"]), 30,
                   what="first delivery attempt failed (PACS down)")
        assert dcmsend(node.port, second).returncode == 0  # still collecting when SIGTERM comes
        assert node.stop() == 0, node.stderr()[-4000:]
        info = status_json(node)
        assert info["jobs"]["collecting"] == 1 and info["jobs"]["derived"] == 1
        assert info["deliveries"]["pending"] == 2 and info["deliveries"]["sent"] == 0
        with StoreSCP(tmp_path / "pacs", port=pacs_port) as pacs:
            node.start()  # pending deliveries are retried at start-up, not after the 60 s backoff
            wait_until(lambda: len(received(pacs.folder)) == 4, 40, what="both series at the PACS")
            wait_until(lambda: status_json(node)["jobs"]["done"] == 2, 20, what="both jobs done")
        got = sorted(str(ds.SOPInstanceUID) for ds in received(pacs.folder))
        want = sorted(str(pydicom.dcmread(p).SOPInstanceUID) for p in [*first, *second])
        assert got == want
    finally:
        node.stop()


def test_second_node_on_the_same_spool_is_refused(tmp_path: Path, free_port: int) -> None:
    from dicomnode.spool import SpoolError

    def config(port: int):  # type: ignore[no-untyped-def]
        return parse_config({
            "node": {"host": "127.0.0.1", "port": port},
            "storage": {"root": str(tmp_path / "var")},
            "destinations": {"out": {"folder": str(tmp_path / "out")}},
            "rules": [{"name": "r", "match": {"Modality": "CT"}, "destinations": ["out"]}],
        }, tmp_path)

    first = Server(config(free_port), options=ServerOptions(drain_seconds=5))
    first.start()
    try:
        with pytest.raises(SpoolError, match="another `dicomnode serve`"):
            Server(config(free_port + 1 if free_port < 65535 else free_port - 1)).start()
    finally:
        assert first.stop()
    second = Server(config(free_port), options=ServerOptions(drain_seconds=5))  # free again after a stop
    second.start()
    assert second.stop()


@pytest.mark.slow
def test_display_rules_reach_the_pacs_as_a_viewer_shows_them(tmp_path: Path) -> None:
    """Three gray series whose on-screen look depends on a display rule the sender states: Presentation LUT
    Shape INVERSE, Pixel Padding Value around a 12-bit image without a window, and a Modality LUT Sequence
    under a window. Through dcmsend -> node (near-identity CLAHE) -> storescp, each enhanced image must look
    like what a viewer showed: inverted, stretched without the padding, looked up before the window."""
    from pydicom.sequence import Sequence as DicomSequence

    from factories import image_dataset, write

    require_tools("dcmsend", "storescp")
    yy, xx = np.mgrid[:128, :128]
    shape = (np.clip(xx / 127.0 + 0.8 * (((yy - 64) ** 2 + (xx - 64) ** 2) < 30**2), 0, 1.6) / 1.6)
    inverse = write(image_dataset((shape * 255).astype(np.uint8), study="disp", series="inverse", modality="OT",
                                  description="inverse", PresentationLUTShape="INVERSE"), tmp_path / "in" / "inverse.dcm")
    padded = np.zeros((128, 128), np.uint16)
    padded[32:96, 32:96] = (3000 + 150 * shape[32:96, 32:96]).astype(np.uint16)
    pad_ds = image_dataset(padded, study="disp", series="padding", modality="OT", description="padding")
    pad_ds.BitsStored, pad_ds.HighBit, pad_ds.PixelPaddingValue = 12, 11, 0
    lut_raw = ((xx // 32) % 4).astype(np.uint16)  # four vertical bands of stored values 0..3
    lut_ds = image_dataset(lut_raw, study="disp", series="lut", modality="OT", description="modality lut",
                           WindowCenter=2000, WindowWidth=1001)
    lut_ds.BitsStored, lut_ds.HighBit = 12, 11
    item = pydicom.Dataset()
    item.add_new(0x00283002, "US", [4, 0, 16])  # LUT Descriptor: 4 entries from stored value 0, 16 bits
    item.ModalityLUTType = "US"
    item.add_new(0x00283006, "US", [1500, 2500, 2000, 1000])  # LUT Data: not monotonic, a real lookup
    lut_ds.ModalityLUTSequence = DicomSequence([item])
    inputs = [inverse, write(pad_ds, tmp_path / "in" / "padding.dcm"), write(lut_ds, tmp_path / "in" / "lut.dcm")]
    with StoreSCP(tmp_path / "pacs") as pacs:
        cfg = node_config(tmp_path / "var", free_port(), {"pacs": {"type": "dicom", "ae_title": "PACS", "host": "127.0.0.1",
                                                                  "port": pacs.port}},
                          models={"near-identity": {"kind": "clahe", "options": {"clip_limit": 0.0001}}},
                          rules=[{"name": "all", "match": {"Modality": "OT"}, "model": "near-identity",
                                  "destinations": ["pacs"]}])
        with NodeProcess(tmp_path / "node", cfg) as node:
            assert dcmsend(node.port, inputs).returncode == 0
            wait_until(lambda: len(received(pacs.folder)) >= 3, 90, what="3 SC images at the PACS")
        assert node.stderr().count("Traceback") == 0, node.stderr()[-3000:]
    out = {}
    for ds in received(pacs.folder):
        scale = float((1 << int(ds.BitsStored)) - 1)
        out[str(ds.SeriesDescription).split(" [")[0]] = ds.pixel_array.astype(np.float64) / scale
    assert set(out) == {"inverse", "padding", "modality lut"}
    assert np.corrcoef(out["inverse"].ravel(), shape.ravel())[0, 1] < -0.95  # shown inverted, sent inverted
    inner = out["padding"][34:94, 34:94]
    assert float(inner.max() - inner.min()) > 0.8  # the image's own range, not squeezed by the padding
    assert float(out["padding"][:20].max()) < 0.05  # the padding stays black
    bands = [float(out["modality lut"][:, 32 * i + 4 : 32 * i + 28].mean()) for i in range(4)]
    assert bands[1] > 0.9 and 0.35 < bands[2] < 0.65 and bands[0] < 0.1 and bands[3] < 0.1, bands
