"""Receive throughput of `dicomnode serve` by `node.max_pdu_size`: is a bounded PDU slower than "unlimited"?

The node announces ``node.max_pdu_size`` as its maximum PDU length; the sender fragments each object
into P-DATA PDUs of at most that length, and the node buffers one whole PDU before writing it to the
spool. 0 (no limit) lets a sender put a whole object in one PDU, which is also how a PDU bomb makes
the node buffer gigabytes. This sends the same multi-instance series (default 50 CT of 2 MB, 100 MB)
with dcmtk's ``dcmsend`` and with a pynetdicom sender (which, unlike dcmsend, fills whatever PDU size
the node allows) to a node per setting; rounds alternate between settings to share background load;
median and best MB/s per setting and sender are printed.

    .venv/bin/python benchmarks/bench_pdu.py --count 50 --size 1024 --rounds 3 --pdu 0 16384 1048576 4194304
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_receive import env, free_port, make_series, start_node, stop
from tqdm import tqdm

PYNETDICOM_SENDER = """
import sys
from pathlib import Path
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage
from pydicom.uid import ExplicitVRLittleEndian
_config.STORE_SEND_CHUNKED_DATASET = True  # stream from the files, as the node's own destinations do
port, folder = int(sys.argv[1]), Path(sys.argv[2])
ae = AE(ae_title="BENCH")
ae.maximum_pdu_size = 0
ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
assert assoc.is_established, "association refused"
bad = [p.name for p in sorted(folder.glob("*.dcm")) if assoc.send_c_store(p).Status != 0]
assoc.release()
sys.exit(f"not stored: {bad}" if bad else 0)
"""


def send(sender: str, port: int, folder: Path, count: int) -> float:
    if sender == "dcmsend":
        cmd = ["dcmsend", "-v", "-aec", "DICOMNODE", "127.0.0.1", str(port), "+sd", str(folder)]
    else:
        cmd = [sys.executable, "-c", PYNETDICOM_SENDER, str(port), str(folder)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=3600)
    seconds = time.perf_counter() - start
    out = proc.stdout + proc.stderr
    if proc.returncode != 0 or (sender == "dcmsend" and f"with status SUCCESS  : {count}" not in out):
        raise RuntimeError(f"{sender} did not store all {count} instances:\n{out[-2000:]}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=50, help="instances per transfer (default 50)")
    parser.add_argument("--size", type=int, default=1024, help="rows = columns of each 16-bit CT (default 1024: 2 MB)")
    parser.add_argument("--rounds", type=int, default=3, help="transfers per setting and sender (default 3)")
    parser.add_argument("--pdu", type=int, nargs="+", default=[0, 16384, 1 << 20, 4 << 20],
                        help="node.max_pdu_size values to compare (default 0 16384 1048576 4194304)")
    parser.add_argument("--senders", nargs="+", default=["dcmsend", "pynetdicom"], choices=["dcmsend", "pynetdicom"])
    args = parser.parse_args(argv)
    for tool in ("dcmsend", "echoscu"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} not found: apt-get install dcmtk")
    with tempfile.TemporaryDirectory(prefix="bench_pdu_") as tmp:
        work = Path(tmp)
        total = make_series(work / "data", args.count, args.size)
        print(f"{args.count} CT instances {args.size}x{args.size} 16-bit: {total / 1e6:.1f} MB per transfer")
        times: dict[tuple[int, str], list[float]] = {(p, s): [] for p in args.pdu for s in args.senders}
        with tqdm(total=args.rounds * len(args.pdu), desc="node runs", unit="run") as bar:
            for _ in range(args.rounds):
                for pdu in args.pdu:
                    port = free_port()
                    proc = start_node(work, port, max_pdu_size=pdu)
                    try:
                        for sender in args.senders:
                            times[pdu, sender].append(send(sender, port, work / "data", args.count))
                    finally:
                        stop(proc)
                    bar.update()
        print(f"{'max_pdu_size':>12} {'sender':>10} {'median MB/s':>12} {'best MB/s':>10}  (seconds per transfer)")
        for (pdu, sender), secs in times.items():
            print(f"{pdu:>12} {sender:>10} {total / 1e6 / statistics.median(secs):>12.1f} {total / 1e6 / min(secs):>10.1f}"
                  f"  ({', '.join(f'{s:.2f}' for s in secs)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
