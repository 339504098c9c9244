"""Load benchmark: several modalities sending in parallel into one ``dicomnode serve``, delivered to a PACS.

    .venv/bin/python benchmarks/bench_load.py                      # 8 senders x 200 CT 256x256, CLAHE
    .venv/bin/python benchmarks/bench_load.py --senders 4 --instances 50 --size 512 --forward

Everything runs on loopback with real processes: dcmsend (one per sender) -> dicomnode serve -> storescp.
It prints receive throughput (until every instance is in the ledger), end-to-end throughput (until every
output is at the PACS), the node's peak resident memory (VmHWM) and the accounting: instances sent,
in the ledger, distinct at the PACS (must all be equal; "lost" must be 0).
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tqdm import tqdm  # noqa: E402

from reliability import NodeProcess, StoreSCP, free_port, node_config, tool_env, write_series  # noqa: E402


def ledger_counts(db_path: Path) -> tuple[int, int, int, int]:
    """(instances, sent deliveries, unfinished jobs, pending deliveries) from the node's ledger."""
    if not db_path.exists():
        return 0, 0, 0, 0
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        instances = db.execute("SELECT COUNT(*) FROM instances").fetchone()[0]
        sent = db.execute("SELECT COUNT(*) FROM deliveries WHERE state='sent'").fetchone()[0]
        unfinished = db.execute(
            "SELECT COUNT(*) FROM jobs WHERE state IN ('collecting','complete','processing','derived')").fetchone()[0]
        pending = db.execute("SELECT COUNT(*) FROM deliveries WHERE state='pending'").fetchone()[0]
        return instances, sent, unfinished, pending
    except sqlite3.OperationalError:
        return 0, 0, 0, 0
    finally:
        db.close()


def retried_deliveries(db_path: Path) -> int:
    """Deliveries that needed more than one attempt (a failed or timed-out batch was resent)."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        return db.execute("SELECT COUNT(*) FROM deliveries WHERE attempts > 1").fetchone()[0]
    finally:
        db.close()


def peak_rss_mb(pid: int) -> float:
    """VmHWM (peak resident set) of a live process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def distinct_at_pacs(folder: Path) -> tuple[int, int]:
    import pydicom

    uids = []
    for path in folder.iterdir():
        if path.is_file():
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
                uids.append(ds.SOPInstanceUID)
            except Exception:  # noqa: BLE001
                continue
    return len(set(uids)), len(uids)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--senders", type=int, default=8, help="parallel dcmsend processes (default 8)")
    parser.add_argument("--instances", type=int, default=200, help="instances per sender (default 200)")
    parser.add_argument("--size", type=int, default=256, help="image rows = columns (default 256)")
    parser.add_argument("--forward", action="store_true", help="forward untouched instead of enhancing (CLAHE)")
    parser.add_argument("--workers", type=int, default=1, help="node.workers (default 1)")
    parser.add_argument("--timeout", type=float, default=1800, help="give up after this many seconds")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    if shutil.which("dcmsend") is None or shutil.which("storescp") is None:
        print("needs dcmtk (dcmsend, storescp)", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="dicomnode-bench-load-"))
    total = args.senders * args.instances
    print(f"work folder {work}; generating {args.senders} x {args.instances} CT {args.size}x{args.size} ...")
    series = [write_series(work / "in" / f"s{k}", "bench", f"sender{k}", args.instances, rows=args.size,
                           cols=args.size) for k in range(args.senders)]
    mb = sum(p.stat().st_size for s in series for p in s) / 1e6
    pacs = StoreSCP(work / "pacs").start()
    port = free_port()
    rules = [{"name": "ct", "match": {"Modality": "CT"}, "model": None if args.forward else "clahe",
              "destinations": ["pacs"]}]
    cfg = node_config(work / "var", port, {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}},
                      rules=rules, node={"series_quiet_seconds": 2.0, "max_associations": args.senders + 2,
                                         "max_connections_per_peer": args.senders + 2,  # every sender is 127.0.0.1
                                         "workers": args.workers},
                      log_file=work / "node.log")
    node = NodeProcess(work, cfg).start()
    assert node.proc is not None
    ledger = work / "var" / "ledger.sqlite3"
    rc = 0
    try:
        t0 = time.perf_counter()
        senders = [subprocess.Popen(["dcmsend", "-aet", f"MOD{k}", "-aec", "DICOMNODE", "127.0.0.1", str(port),
                                     *map(str, paths)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    env=tool_env()) for k, paths in enumerate(series)]
        received_at = delivered_at = None
        with tqdm(total=2 * total, desc="received + delivered", unit="obj") as bar:
            while time.perf_counter() - t0 < args.timeout:
                instances, sent, unfinished, pending = ledger_counts(ledger)
                bar.n = instances + sent
                bar.refresh()
                if received_at is None and instances >= total:
                    received_at = time.perf_counter() - t0
                if (received_at is not None and sent >= total and not unfinished and not pending):
                    delivered_at = time.perf_counter() - t0
                    break
                if all(s.poll() is not None for s in senders) and received_at is None and instances < total:
                    time.sleep(1.0)  # let the last stores commit, then check once more
                    if ledger_counts(ledger)[0] < total:
                        break
                time.sleep(0.2)
        failed_senders = [s.returncode for s in senders if s.wait(60) != 0]
        peak = peak_rss_mb(node.proc.pid)
    finally:
        node.stop()
        pacs.stop()
    instances, sent, _u, _p = ledger_counts(ledger)
    distinct, files = distinct_at_pacs(work / "pacs")
    lost = total - distinct
    print(f"\nload: {args.senders} senders x {args.instances} instances = {total} objects, {mb:.0f} MB, "
          f"{'forward' if args.forward else 'CLAHE'}, workers {args.workers}")
    if received_at:
        print(f"receive:     {received_at:7.2f} s  {total / received_at:7.1f} obj/s  {mb / received_at:7.1f} MB/s")
    if delivered_at:
        print(f"end to end:  {delivered_at:7.2f} s  {total / delivered_at:7.1f} obj/s (incl. {2.0:.0f} s quiet time)")
    print(f"node peak RSS (VmHWM): {peak:.0f} MB")
    print(f"accounting: sent {total}, in ledger {instances}, deliveries sent {sent}, distinct at PACS {distinct} "
          f"({files} files; {retried_deliveries(ledger)} deliveries retried), lost {lost}; "
          f"failed senders {len(failed_senders)}")
    if lost or failed_senders or not delivered_at:
        rc = 1
    if args.keep or rc:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
