"""Resources and load: disk watermark against the real disk, bounded associations, parallel senders.

The watermark test configures the thresholds relative to the disk's real current usage, so it shows
the real ``statvfs`` path, not a fake. The slow test runs several dcmsend senders in parallel into
one ``dicomnode serve`` and accounts for every instance in the ledger and at the PACS.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from conftest import require_tools
from factories import ct_dataset, start_receiver
from reliability import free_port, raw_object, send_raw


def test_disk_watermark_on_the_real_disk(tmp_path: Path) -> None:
    total, used, _free = shutil.disk_usage(tmp_path)
    percent = 100.0 * used / total
    if percent < 2.0 or percent > 97.0:
        pytest.skip(f"disk at {percent:.1f}%: no room for thresholds on both sides of it")
    ds = ct_dataset("disk", "s1", 0)

    # high watermark below the current usage: full, every store refused with A700, nothing kept
    receiver, spool = start_receiver(tmp_path / "full" / "var", storage={"disk_high_watermark_percent": percent - 1.5,
                                                                         "disk_low_watermark_percent": percent - 2.0})
    try:
        statuses = send_raw(receiver.port, [raw_object(ds)] * 2, tmp_path / "raw1")
        assert statuses == [0xA700, 0xA700]
        assert not spool.ledger.all_instances()
        assert not list(spool.incoming.iterdir())  # refused before writing anything
    finally:
        receiver.stop()
        spool.close()

    # high watermark above it: accepted
    receiver, spool = start_receiver(tmp_path / "room" / "var", storage={"disk_high_watermark_percent": min(percent + 1.5, 100.0),
                                                                         "disk_low_watermark_percent": percent + 1.0})
    try:
        assert send_raw(receiver.port, [raw_object(ds)], tmp_path / "raw2") == [0]
        assert len(spool.ledger.all_instances()) == 1
    finally:
        receiver.stop()
        spool.close()


def test_bounded_associations(tmp_path: Path) -> None:
    receiver, spool = start_receiver(tmp_path / "var", max_associations=2)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    held = []
    try:
        for _ in range(2):
            assoc = ae.associate("127.0.0.1", receiver.port, ae_title="DICOMNODE")
            assert assoc.is_established
            held.append(assoc)
        third = ae.associate("127.0.0.1", receiver.port, ae_title="DICOMNODE")
        assert not third.is_established and third.is_rejected  # A-ASSOCIATE-RJ, not a hang
        held.pop().release()
        deadline = time.monotonic() + 10
        while len(receiver.ae.active_associations) > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        again = ae.associate("127.0.0.1", receiver.port, ae_title="DICOMNODE")
        assert again.is_established and again.send_c_echo().Status == 0
        again.release()
    finally:
        for assoc in held:
            assoc.release()
        receiver.stop()
        spool.close()


def test_parallel_senders_into_the_receiver(tmp_path: Path) -> None:
    """4 pynetdicom senders at once into the Receiver: every acknowledged instance is in the ledger."""
    receiver, spool = start_receiver(tmp_path / "var", max_connections_per_peer=8)  # all senders on 127.0.0.1
    statuses: dict[int, list[int | None]] = {}
    expected = set()

    def sender(k: int) -> None:
        objs = [raw_object(ct_dataset("load", f"sender{k}", i)) for i in range(10)]
        statuses[k] = send_raw(receiver.port, objs, tmp_path / f"raw{k}", aet=f"MOD{k}")

    for k in range(4):
        expected |= {ct_dataset("load", f"sender{k}", i).SOPInstanceUID for i in range(10)}
    threads = [threading.Thread(target=sender, args=(k,)) for k in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert all(s == [0] * 10 for s in statuses.values()), statuses
        assert {r.sop_uid for r in spool.ledger.all_instances()} == expected
        assert len({r.job_id for r in spool.ledger.all_instances()}) == 4
    finally:
        receiver.stop()
        spool.close()




_RSS_PROBE = r"""
import resource, sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from factories import config_data, write_series
from dicomnode.assemble import series_from_files
from dicomnode.config import parse_config
from dicomnode.pipeline import Pipeline
from dicomnode.resident import ResidentModels
from dicomnode.route import routing_keywords
n, size, work = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
paths = write_series(work / "in", "rss", f"n{{n}}", n, rows=size, cols=size)
config = parse_config(config_data(work / "var", 11112, {{"o": {{"folder": str(work / "o")}}}}), work)
pipeline = Pipeline(config, ResidentModels.load(config))
(series,), _ = series_from_files(paths, routing_keywords(config))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = pipeline.run(series, work / "out", batch_size=4)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert len(result.outputs) == n, result.failed
print(base, peak)
"""


def _enhance_peak_kb(tmp_path: Path, n: int, size: int) -> tuple[int, int]:
    import subprocess
    import sys

    code = _RSS_PROBE.format(tests=str(Path(__file__).parent))
    out = subprocess.run([sys.executable, "-c", code, str(n), str(size), str(tmp_path / f"n{n}")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    base, peak = map(int, out.stdout.split())
    return base, peak


@pytest.mark.slow
def test_memory_bounded_for_a_long_series(tmp_path: Path) -> None:
    """Peak RSS of enhancing 96 instances stays near that of 16 (streamed in batches of 4).

    Holding the series would cost 80 x 512 x 512 x (2 bytes stored + 4 bytes float) = 120 MB more.
    """
    _, small = _enhance_peak_kb(tmp_path, 16, 512)
    _, large = _enhance_peak_kb(tmp_path, 96, 512)
    grown_mb = (large - small) / 1024
    print(f"\npeak RSS enhancing 16 vs 96 CT 512x512 (CLAHE, batch 4): {small / 1024:.0f} MB vs "
          f"{large / 1024:.0f} MB (+{grown_mb:.0f} MB)")
    assert grown_mb < 60, f"peak RSS grew {grown_mb:.0f} MB for 6x the instances"


@pytest.mark.slow
def test_parallel_senders_through_the_node(tmp_path: Path) -> None:
    """4 dcmsend senders x 50 instances at once into ``dicomnode serve``: all in the ledger, all at the PACS."""
    require_tools("dcmsend", "storescp")
    import subprocess

    from reliability import LedgerView, NodeProcess, StoreSCP, node_config, pacs_sources, tool_env, wait_until, write_series

    senders, per = 4, 50
    series = [write_series(tmp_path / "in" / str(k), "load", f"sender{k}", per) for k in range(senders)]
    expected = {ct_dataset("load", f"sender{k}", i).SOPInstanceUID for k in range(senders) for i in range(per)}
    with StoreSCP(tmp_path / "pacs") as pacs:
        cfg = node_config(tmp_path / "var", free_port(), {"pacs": {"ae_title": "PACS", "host": "127.0.0.1",
                                                                  "port": pacs.port}},
                          node={"series_quiet_seconds": 1.0, "max_connections_per_peer": 2 * senders})  # one address
        ledger = LedgerView(tmp_path / "var")
        with NodeProcess(tmp_path, cfg) as node:
            t0 = time.perf_counter()
            procs = [subprocess.Popen(["dcmsend", "-aet", f"MOD{k}", "-aec", "DICOMNODE", "127.0.0.1", str(node.port),
                                       *map(str, paths)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, env=tool_env()) for k, paths in enumerate(series)]
            codes = [p.wait(120) for p in procs]
            received = time.perf_counter() - t0
            assert codes == [0] * senders, [p.stderr.read()[-500:] for p in procs if p.returncode]
            assert ledger.instances() == expected  # every acknowledged instance is on the node's books
            wait_until(lambda: ledger.settled() and ledger.deliveries().get("sent") == len(expected), 120, 0.3,
                       "all delivered")
            total = time.perf_counter() - t0
            peak_mb = int(next(line.split()[1] for line in Path(f"/proc/{node.proc.pid}/status").read_text()
                               .splitlines() if line.startswith("VmHWM"))) / 1024
    assert pacs_sources(tmp_path / "pacs") == expected
    assert ledger.jobs() == {"done": senders}
    print(f"\nload: {senders} x {per} instances received in {received:.1f} s ({len(expected) / received:.0f}/s), "
          f"enhanced and delivered in {total:.1f} s; node peak RSS {peak_mb:.0f} MB; lost 0")
