"""Holding under attack and faults: decode budgets (a decompression bomb), poison jobs, a full disk.

* A 30 KB JPEG whose header and frame claim 65535 x 65535 pixels is refused from its header before the
  decoder allocates anything (``node.max_decoded_frame_bytes``): its job fails with the sizes, it is
  quarantined, and a node under a 3 GiB address-space limit keeps a small RSS and serves the next series.
* A series whose processing kills the node (a model that SIGKILLs its own process) fails after
  ``node.max_job_attempts`` crashes, quarantined; the series queued behind it is delivered.
* A full output disk (above the watermark, or ENOSPC while writing: a real small tmpfs) sends the job back
  to wait; ``status`` shows why; once space returns the job is retried and every instance delivered.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit

from dicomnode import cli as node_cli
from dicomnode.assemble import series_from_files
from dicomnode.cli.node import collect_status
from dicomnode.config import parse_config
from dicomnode.imaging import DecodeBudgetExceeded, check_decode_budget, decoded_frame_bytes, pixel_info
from dicomnode.ledger import DeliveryState, JobState, Ledger, SeriesKey
from dicomnode.pipeline import Pipeline, StorageFull
from dicomnode.resident import ResidentModels
from dicomnode.server import Server, ServerOptions
from dicomnode.spool import Spool

from conftest import require_tools
from factories import ct_dataset, free_port, image_dataset, write, write_series
from reliability import LedgerView, NodeProcess, dcmsend, node_config, raw_object, send_raw, wait_until

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

BOMB_SIDE = 65535


def bomb_jpeg(side: int = BOMB_SIDE) -> bytes:
    """A small baseline JPEG (160 x 160 noise) whose SOF segment is patched to claim ``side`` x ``side``."""
    pixels = np.random.default_rng(0).integers(0, 256, (160, 160, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=95)
    data = bytearray(buf.getvalue())
    pos = 2
    while data[pos + 1] != 0xC0:  # walk the marker segments to SOF0
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    data[pos + 5:pos + 9] = side.to_bytes(2, "big") * 2  # height, width
    return bytes(data)


def bomb_dataset(study: str = "bomb", series: str = "bomb", index: int = 0) -> Dataset:
    """A JPEG Secondary Capture whose Rows/Columns and codestream agree on 65535 x 65535 (it passes every check
    made without decoding, and decoding it would take ~13 GB for the decoder's output alone)."""
    ds = image_dataset(np.zeros((4, 4, 3), np.uint8), study=study, series=series, index=index, modality="XC")
    ds.Rows = ds.Columns = BOMB_SIDE
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([bomb_jpeg()])
    ds["PixelData"].VR = "OB"
    ds.LossyImageCompression = "01"
    return ds


def _config(tmp: Path, port: int, out: Path, *, derive: dict | None = None, **sections) -> dict:
    """A node on loopback: CT and XC series to CLAHE (gate off: noise images), a folder destination."""
    rules = [{"name": "all", "match": {"Modality": ["CT", "XC"]}, "model": "clahe", "destinations": ["out"],
              "gate": {"enabled": False}}]
    return node_config(tmp / "var", port, {"out": {"folder": str(out)}}, rules=rules,
                       extra={"derive": derive} if derive else None, **sections)


# ------------------------------------------------------------------------------------------ decode budgets
def test_budget_is_known_from_the_header() -> None:
    info = pixel_info(bomb_dataset())
    assert decoded_frame_bytes(info) == BOMB_SIDE**2 * (3 + 3 * 4)  # 8-bit RGB from the decoder + float32 RGB
    with pytest.raises(DecodeBudgetExceeded) as err:
        check_decode_budget(info, 512 * 1024**2, 8 * 1024**3)
    message = str(err.value)
    assert "65535x65535" in message and "60.0 GiB" in message and "node.max_decoded_frame_bytes 512.0 MiB" in message
    ct = pixel_info(ct_dataset("budget", "ct", 0, rows=512, cols=512))
    assert decoded_frame_bytes(ct) == 512 * 512 * (2 + 4)  # 1.5 MiB: 16-bit stored + float32 gray
    assert check_decode_budget(ct, 2 * 1024**2, 10 * 1024**2, 8 * 1024**2) == 512 * 512 * 6
    with pytest.raises(DecodeBudgetExceeded, match="node.max_decoded_series_bytes 10.0 MiB"):
        check_decode_budget(ct, 2 * 1024**2, 10 * 1024**2, 9 * 1024**2)


def test_pipeline_fails_the_bomb_before_decoding_and_enhances_the_rest(tmp_path: Path) -> None:
    good = [write(image_dataset(np.full((32, 32, 3), 40 * i, np.uint8), study="bomb", series="mixed", index=i,
                                modality="XC"), tmp_path / f"good{i}.dcm") for i in range(2)]
    bomb = write(bomb_dataset(series="mixed", index=2), tmp_path / "bomb.dcm")
    config = parse_config(_config(tmp_path, free_port(), tmp_path / "out"), tmp_path)
    pipeline = Pipeline(config, ResidentModels.load(config))
    (series,), _ = series_from_files([*good, bomb], ["Modality"])
    started = time.perf_counter()
    outcome = pipeline.run(series, tmp_path / "outputs")
    assert time.perf_counter() - started < 10  # decoding the bomb alone took 49 s (and 8 GB) before the budget
    assert len(outcome.outputs) == 2 and outcome.error is None
    ((path, reason),) = outcome.failed
    assert path == bomb and "decoded size over budget" in reason and "node.max_decoded_frame_bytes" in reason

    # the series budget: the third 32x32 RGB instance (15 KiB decoded each) no longer fits in 40 KiB
    config = parse_config(_config(tmp_path, free_port(), tmp_path / "out", node={"max_decoded_series_bytes": 40 * 1024}),
                          tmp_path)
    more = [write(image_dataset(np.full((32, 32, 3), 9 * i, np.uint8), study="bomb", series="long", index=i,
                                modality="XC"), tmp_path / f"long{i}.dcm") for i in range(3)]
    (series,), _ = series_from_files(more, ["Modality"])
    outcome = Pipeline(config, ResidentModels.load(config)).run(series, tmp_path / "outputs2")
    assert len(outcome.outputs) == 2
    ((path, reason),) = outcome.failed
    assert path == more[2] and "node.max_decoded_series_bytes 40.0 KiB" in reason


@pytest.mark.slow
def test_jpeg_bomb_over_c_store_fails_alone_under_a_memory_limit(tmp_path: Path) -> None:
    """The bomb through real C-STORE into `dicomnode serve` under `prlimit --as=3GiB`: failed job with the budget
    reason, quarantined, RSS stays small, and a normal series sent after it is delivered."""
    require_tools("prlimit")
    out = tmp_path / "out"
    node = NodeProcess(tmp_path, _config(tmp_path, free_port(), out, node={"series_quiet_seconds": 0.5}),
                       prefix=["prlimit", f"--as={3 * 1024**3}", "--"])
    ledger = LedgerView(tmp_path / "var")
    with node:
        bomb = bomb_dataset()
        assert send_raw(node.port, [raw_object(bomb)], tmp_path / "send") == [0]  # the door does not decode
        wait_until(lambda: ledger.jobs().get("failed") == 1, 60, 0.2, "the bomb's job to fail")
        after = [ct_dataset("bomb", "after", i, rows=64, cols=64) for i in range(3)]
        assert send_raw(node.port, [raw_object(ds) for ds in after], tmp_path / "after") == [0, 0, 0]
        wait_until(lambda: ledger.settled() and ledger.jobs().get("done") == 1, 60, 0.2, "the next series delivered")
        peak_kib = int(next(line for line in Path(f"/proc/{node.proc.pid}/status").read_text().splitlines()
                            if line.startswith("VmHWM:")).split()[1])
        status = node.cli("status")
    (failed,) = [j for j in ledger.job_records() if j.state == "failed"]
    assert "decoded size over budget" in failed.error and "65535x65535" in failed.error
    assert "node.max_decoded_frame_bytes" in status.stdout
    reasons = "\n".join(p.read_text() for p in (tmp_path / "var" / "quarantine").glob("*.reason.txt"))
    assert f"{bomb.SOPInstanceUID}.dcm not enhanced" in reasons and "node.max_decoded_frame_bytes" in reasons
    delivered = {str(pydicom.dcmread(p).SourceImageSequence[0].ReferencedSOPInstanceUID) for p in out.glob("*.dcm")}
    assert delivered == {ds.SOPInstanceUID for ds in after}
    assert peak_kib < 1024 * 1024, f"node peak RSS {peak_kib / 1024:.0f} MiB"
    print(f"\nJPEG bomb {BOMB_SIDE}x{BOMB_SIDE} ({len(bomb.PixelData)} bytes): node peak RSS {peak_kib / 1024:.0f} MiB")


# ------------------------------------------------------------------------------------------ poison jobs
def test_ledger_counts_unfinished_claims_and_fails_poison(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    key = SeriesKey("p", "1.2.3", "1.2.3.4")
    job, _ = ledger.add_instance(key, sop_uid="1.2.3.4.5", sop_class_uid="1.2", calling_aet="M", size=1,
                                 place=lambda _j: tmp_path / "x.dcm", now=0.0)
    ledger.complete_quiet_jobs(1.0)
    assert ledger.claim_job().attempts == 1
    assert ledger.fail_poisoned(2) == [] and ledger.recover() == [job]  # first crash: redone
    assert ledger.claim_job().attempts == 2
    assert ledger.release_job(job) and ledger.job(job).attempts == 1  # a drain is not a crash
    assert ledger.claim_job().attempts == 2
    (poisoned,) = ledger.fail_poisoned(2)  # second crash: failed, not redone
    assert poisoned.state == JobState.FAILED and poisoned.error.startswith("processing crashed 2 times")
    assert ledger.recover() == []
    assert ledger.reprocess(job) and ledger.job(job).attempts == 0  # an admin may try again

    # a storage fault is not an attempt; the job waits for its retry time, then is claimed again
    assert ledger.claim_job().attempts == 1
    ledger.defer_job(job, "waiting for disk space", 0.3)
    deferred = ledger.job(job)
    assert deferred.state == JobState.COMPLETE and deferred.attempts == 0 and deferred.error == "waiting for disk space"
    assert ledger.claim_job() is None
    time.sleep(0.35)
    assert ledger.claim_job().id == job

    # instances not enhanced: the job settles failed, not done, once the rest is delivered
    ledger.finish_job(job, JobState.DERIVED, outputs=[tmp_path / "o.dcm"], destinations=["out"], not_enhanced=1,
                      error="1 instances not enhanced: x.dcm: pixel data: broken")
    ledger.mark_sent([d.id for d in ledger.deliveries(job)])
    assert ledger.settle_jobs() == [(job, JobState.FAILED)]
    assert ledger.job(job).error == "1 instances not enhanced: x.dcm: pixel data: broken"
    assert [d.state for d in ledger.deliveries(job)] == [DeliveryState.SENT]
    ledger.close()


CRASH_MODEL = '''
import os
import signal

from models.registry import Enhancer, ModelInfo


class Crash(Enhancer):
    """Kills its own process on the first frame, as an OOM kill or a segfault in a decoder would."""

    info = ModelInfo(kind="test-crash", name="Crash", version="1")

    def enhance(self, images, guidance=None):
        os.kill(os.getpid(), signal.SIGKILL)


def build(weights=None, device="cpu", options=None):
    return Crash()
'''


@pytest.mark.slow
def test_series_that_kills_the_node_fails_after_max_attempts_and_the_queue_moves_on(tmp_path: Path) -> None:
    """A model that SIGKILLs the node (registered through sitecustomize in the node process only) on one
    series: the node dies, is restarted (as systemd would), dies again; the third start fails that job,
    quarantines its sources and delivers the series behind it."""
    require_tools("dcmsend")
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "crash_model.py").write_text(CRASH_MODEL)
    (hooks / "sitecustomize.py").write_text(textwrap.dedent('''
        from models.registry import ModelSpec, register
        register(ModelSpec("test-crash", "crashes the node", "crash_model:build", ("EdgeEnhancement",)))
    '''))
    out = tmp_path / "out"
    rules = [{"name": "poison", "match": {"Modality": "MR"}, "model": "crash", "destinations": ["out"]},
             {"name": "ct", "match": {"Modality": "CT"}, "model": "clahe", "destinations": ["out"],
              "gate": {"enabled": False}}]
    cfg = node_config(tmp_path / "var", free_port(), {"out": {"folder": str(out)}}, rules=rules,
                      models={"crash": {"kind": "test-crash"}, "clahe": {"kind": "clahe"}},
                      node={"series_quiet_seconds": 1.0, "max_job_attempts": 2})
    node = NodeProcess(tmp_path, cfg, env={"PYTHONPATH": str(hooks)})
    ledger = LedgerView(tmp_path / "var")
    poison = write_series(tmp_path / "in", "poison", "mr", 2, modality="MR")
    behind = write_series(tmp_path / "in", "poison", "ct", 3, rows=64, cols=64)
    node.start()
    try:
        assert dcmsend(node.port, poison).returncode == 0
        assert dcmsend(node.port, behind).returncode == 0  # both acknowledged before the first crash
        deaths = []
        for _ in range(2):
            node.proc.wait(60)  # the model kills it once the poison job is claimed
            deaths.append(node.proc.returncode)
            try:
                node.start()  # the restart a supervisor does
            except RuntimeError:  # it claimed the job again and died before it listened
                if node.proc.returncode != -9:
                    raise
        wait_until(lambda: ledger.settled() and ledger.jobs() == {"failed": 1, "done": 1}, 60, 0.2, "the queue to move on")
        assert node.alive()
        view = Ledger(tmp_path / "var" / "ledger.sqlite3", readonly=True)  # what `status` prints (its CLI would
        status = collect_status(view)  # refuse this config: the crash model is registered in the node only)
        view.close()
    finally:
        node.stop()
    assert deaths == [-9, -9]
    (failed,) = [j for j in ledger.job_records() if j.state == "failed"]
    assert failed.series_uid == str(pydicom.dcmread(poison[0]).SeriesInstanceUID)
    assert failed.error.startswith("processing crashed 2 times (node.max_job_attempts 2)")
    assert status["failed_jobs"][0]["error"].startswith("processing crashed 2 times")
    reasons = [p.read_text() for p in (tmp_path / "var" / "quarantine").glob("*.reason.txt")]
    assert len(reasons) == 2 and all("crashed the node 2 times" in r for r in reasons)
    assert len(list((tmp_path / "var" / "series" / f"job-{failed.id}").glob("*.dcm"))) == 2  # sources kept
    delivered = {str(pydicom.dcmread(p).SourceImageSequence[0].ReferencedSOPInstanceUID) for p in out.glob("*.dcm")}
    assert delivered == {str(pydicom.dcmread(p).SOPInstanceUID) for p in behind}


# ------------------------------------------------------------------------------------------ disk faults
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs mounted at tmp_path/var/outgoing (the node's output folder); skips where mounting is not allowed."""
    mount = tmp_path / "var" / "outgoing"
    mount.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs for a real disk-full (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(folder: Path, leave: int) -> Path:
    """A filler file that leaves about ``leave`` bytes free on ``folder``'s file system."""
    filler = folder / "filler"
    filler.unlink(missing_ok=True)
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with filler.open("wb") as fh:
        fh.write(b"\0" * max(0, free - leave))
    return filler


def test_pipeline_raises_storage_full_on_enospc(small_disk: Path, tmp_path: Path) -> None:
    sources = write_series(tmp_path / "in", "full", "ct", 4, rows=128, cols=128)
    config = parse_config(_config(tmp_path, free_port(), tmp_path / "out", derive={"transfer_syntax": "uncompressed"}),
                          tmp_path)
    pipeline = Pipeline(config, ResidentModels.load(config))
    (series,), _ = series_from_files(sources, ["Modality"])
    _fill(small_disk, 48 * 1024)  # room for one 32 KiB output, not two
    with pytest.raises(StorageFull, match="No space left on device"):
        pipeline.run(series, small_disk / "job-1")
    assert not list((small_disk / "job-1").glob(".*.part"))  # the cut write left no temporary file
    with pytest.raises(StorageFull, match="not started: .*storage.disk_high_watermark_percent 50%"):
        pipeline.run(series, small_disk / "job-1", check_space=lambda: Spool.too_full(small_disk, 50.0))


@pytest.mark.slow
def test_disk_full_during_enhancement_is_retried_until_every_instance_is_delivered(
        small_disk: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Real ENOSPC half-way through a series (watermark 100 %: only the write itself notices), then a node with
    the watermark at 90 % that does not start a job on a 95 % full disk. Both wait, status says why, both are
    delivered once space returns, nothing is quarantined."""
    require_tools("dcmsend")
    out = tmp_path / "out"
    config_path = tmp_path / "node.yaml"
    port = free_port()

    def start(watermark: float) -> Server:
        data = _config(tmp_path, port, out, node={"series_quiet_seconds": 0.3},
                       storage={"disk_high_watermark_percent": watermark, "disk_low_watermark_percent": watermark - 5,
                                "disk_full_retry_seconds": 1.0},
                       derive={"transfer_syntax": "uncompressed"})
        config_path.write_text(yaml.safe_dump(data))
        server = Server(parse_config(data, tmp_path), options=ServerOptions(drain_seconds=10))
        server.start()
        return server

    def status() -> dict:
        assert node_cli.main(["status", "--json", "--config", str(config_path)]) == 0
        return json.loads(capsys.readouterr().out)

    # 1. ENOSPC half-way through the series: 8 outputs of 32 KiB, room for about 2
    server = start(100.0)
    try:
        filler = _fill(small_disk, 80 * 1024)
        first = write_series(tmp_path / "in", "full", "enospc", 8, rows=128, cols=128)
        assert dcmsend(server.port, first).returncode == 0
        wait_until(lambda: status()["waiting_jobs"], 30, 0.1, "the job to wait for space")
        (waiting,) = status()["waiting_jobs"]
        assert waiting["error"].startswith("waiting for disk space") and "No space left on device" in waiting["error"]
        assert status()["jobs"]["done"] == 0 and status()["jobs"]["failed"] == 0
        assert not list(server.spool.quarantine_dir.iterdir())  # a full disk is not bad input
        time.sleep(2.5)  # it keeps waiting (retried every second) while the disk stays full
        assert status()["waiting_jobs"] and not list(out.glob("*.dcm"))
        freed = time.monotonic()
        filler.unlink()
        wait_until(lambda: server.spool.ledger.jobs("done"), 30, 0.05, "the job to be retried and delivered")
        recovered = time.monotonic() - freed
    finally:
        assert server.stop()

    # 2. above the high watermark: the next job is not started at all
    server = start(90.0)
    try:
        total = os.statvfs(small_disk).f_blocks * os.statvfs(small_disk).f_frsize
        filler = _fill(small_disk, total // 20)  # 95 % full
        second = write_series(tmp_path / "in", "full", "watermark", 3, rows=64, cols=64)
        assert dcmsend(server.port, second).returncode == 0
        wait_until(lambda: status()["waiting_jobs"], 30, 0.1, "the second job to wait")
        assert "at or above storage.disk_high_watermark_percent 90%" in status()["waiting_jobs"][0]["error"]
        assert node_cli.main(["status", "--config", str(config_path)]) == 0
        assert "waiting to be retried after a storage fault" in capsys.readouterr().out
        filler.unlink()
        wait_until(lambda: len(server.spool.ledger.jobs("done")) == 2, 30, 0.05, "the second job delivered")
    finally:
        assert server.stop()
    delivered = {str(pydicom.dcmread(p).SourceImageSequence[0].ReferencedSOPInstanceUID) for p in out.glob("*.dcm")}
    assert delivered == {str(pydicom.dcmread(p).SOPInstanceUID) for p in first + second}
    assert not list((tmp_path / "var" / "quarantine").iterdir())
    print(f"\ndisk full: all 8 delivered {recovered:.1f} s after space returned (retry every 1 s)")


def test_reprocess_runs_a_failed_job_again(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spool = Spool(tmp_path / "var")
    source = write(ct_dataset("re", "ct", 0), spool.job_dir(1) / "x.dcm")
    key = SeriesKey("p", "1.2.3", "1.2.3.4")
    job, _ = spool.ledger.add_instance(key, sop_uid="1.2.3.4.5", sop_class_uid="1.2", calling_aet="M", size=1,
                                       place=lambda _j: source, now=0.0)
    spool.ledger.complete_quiet_jobs(1.0)
    spool.ledger.claim_job()
    spool.ledger.set_job_state(job, JobState.FAILED, error="boom")
    spool.close()
    config_path = tmp_path / "node.yaml"
    config_path.write_text(yaml.safe_dump(_config(tmp_path, free_port(), tmp_path / "out")))
    assert node_cli.main(["reprocess", "--config", str(config_path), "--job", str(job)]) == 0
    assert "queued to be processed again" in capsys.readouterr().out
    assert node_cli.main(["reprocess", "--config", str(config_path), "--job", str(job)]) == 1  # complete, not finished
    assert "is complete" in capsys.readouterr().err
    ledger = Ledger(tmp_path / "var" / "ledger.sqlite3", readonly=True)
    assert ledger.job(job).state == JobState.COMPLETE and ledger.job(job).error is None
    ledger.close()
    source.unlink()
    assert node_cli.main(["reprocess", "--config", str(config_path), "--job", str(job)]) == 1
    assert "1 of its source files are missing" in capsys.readouterr().err
