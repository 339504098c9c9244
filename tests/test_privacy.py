"""Privacy: no patient name, ID or birth date in any log line, and owner-only files under storage.root.

Studies with known, distinctive PHI go through a real ``dicomnode serve`` (good series, a series with
non-conformant values that make pydicom complain, and objects the node refuses or fails), then every
line of the log file, the node's stderr and ``dicomnode status`` output is searched for them.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from pydicom.uid import MRImageStorage

from conftest import require_tools
from reliability import (
    LedgerView,
    NodeProcess,
    Patient,
    StoreSCP,
    ct_dataset,
    dcmsend,
    encoded_body,
    free_port,
    node_config,
    raw_object,
    send_raw,
    wait_until,
    write_series,
)

pytestmark = pytest.mark.slow

PATIENTS = [
    Patient("Zyxwvut^Quintessa^Marie", "PHI-ID-784512", "19440229"),
    Patient("Oberholzer-Fanshawe^Bartholomew", "MRN00991177", "20011231"),
    # non-conformant values as real modalities send them (pydicom quotes some such values in its warnings)
    Patient("Invalidlongname" * 5 + "^Evangelina", "PID/WITH\\BACKSLASH", "1962-07-14"),
]


def _needles(patients: list[Patient]) -> list[str]:
    """Every form a PHI value could take in a log: whole, per name component, reformatted dates."""
    out: set[str] = set()
    for p in patients:
        out.add(p.name)
        out.add(p.name.replace("^", " "))
        out |= {part for part in p.name.split("^") if len(part) >= 5}
        out.add(p.patient_id)
        out |= {part for part in p.patient_id.replace("\\", "/").split("/") if len(part) >= 6}
        digits = p.birth_date.replace("-", "")
        out |= {p.birth_date, digits, f"{digits[:4]}-{digits[4:6]}-{digits[6:]}",
                f"{digits[6:]}.{digits[4:6]}.{digits[:4]}"}
    return sorted(out)


def test_no_phi_in_logs_and_owner_only_files(tmp_path: Path) -> None:
    require_tools("dcmsend", "storescp")
    log_file = tmp_path / "logs" / "node.log"
    with StoreSCP(tmp_path / "pacs") as pacs:
        cfg = node_config(tmp_path / "var", free_port(),
                          {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}},
                          node={"series_quiet_seconds": 1.0, "max_object_bytes": 200_000},
                          log_file=log_file,
                          # a rule on a PHI tag makes the node read (and route by) it for every
                          # series, including the non-conformant birth date below
                          rules=[{"name": "newborns", "match": {"PatientBirthDate": {"regex": "2025.*"}},
                                  "model": "clahe", "destinations": ["pacs"]},
                                 {"name": "ct", "match": {"Modality": "CT"}, "model": "clahe",
                                  "destinations": ["pacs"]}])
        cfg["logging"]["level"] = "DEBUG"  # the most talkative setting must still be clean
        ledger = LedgerView(tmp_path / "var")
        with NodeProcess(tmp_path, cfg) as node:
            expected = 0
            for i, patient in enumerate(PATIENTS):
                paths = write_series(tmp_path / "in" / str(i), f"phi{i}", "s1", 3, patient=patient)
                result = dcmsend(node.port, paths)
                assert result.returncode == 0, result.stderr
                expected += 3
            # refused and quarantined objects carry PHI too: their reasons and log lines must not
            p = PATIENTS[0]
            mismatch = ct_dataset("phi-bad", "s1", 0, patient=p)
            mismatch.SOPClassUID = MRImageStorage
            big = ct_dataset("phi-bad", "big", 0, patient=p, rows=320, cols=320)  # just over the limit: refused 0xA700 (far over aborts the association)
            truncated = ct_dataset("phi-bad", "trunc", 0, patient=p)
            statuses = send_raw(node.port, [raw_object(mismatch), raw_object(big),
                                            raw_object(truncated, encoded_body(truncated)[:400])], tmp_path / "raw")
            assert all(s not in (None, 0) for s in statuses), statuses
            wait_until(lambda: ledger.settled() and ledger.deliveries().get("sent", 0) >= expected, 90, 0.3,
                       "all series delivered")
            status = node.cli("status")
            assert status.returncode == 0
        texts = {
            "log file": log_file.read_text(errors="replace"),
            "stderr": node.stderr(),
            "status": status.stdout + status.stderr,
        }
        for reason in (tmp_path / "var" / "quarantine").glob("*.reason.txt"):
            texts[f"quarantine {reason.name}"] = reason.read_text()
    assert len(texts["log file"].splitlines()) > 10  # the node did log: the search below means something
    leaks = [(where, needle, next(line for line in text.splitlines() if needle in line))
             for where, text in texts.items() for needle in _needles(PATIENTS) if needle in text]
    assert not leaks, "PHI in logs:\n" + "\n".join(f"{w}: {n!r} in: {line[:200]}" for w, n, line in leaks)

    # everything under storage.root is owner-only
    root = tmp_path / "var"
    loose = []
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if mode & 0o077:
            loose.append(f"{oct(mode)} {path.relative_to(tmp_path)}")
    assert not loose, "group/other may read:\n" + "\n".join(loose)
    assert any(p.suffix == ".dcm" for p in (root / "outgoing").rglob("*"))  # derived files were checked too
