"""Series completion by quiet time, and follow-up jobs for late instances."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomnode.assemble import Assembler
from dicomnode.ledger import SeriesKey
from dicomnode.spool import Spool


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def add(spool: Spool, series: str, sop: str, now: float) -> int:
    landed = spool.write_incoming(b"x")
    job, _ = spool.accept(landed, SeriesKey("p", "1.2", series), sop_uid=sop, sop_class_uid="1.2.840",
                          calling_aet="A", now=now)
    return job


def test_quiet_series_become_jobs_independently(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    clock = Clock(1000.0)
    seen: list[int] = []
    asm = Assembler(spool.ledger, 10.0, on_complete=seen.append, clock=clock)
    a = add(spool, "1.1", "1.1.1", 1000.0)
    b = add(spool, "2.2", "2.2.1", 1005.0)
    add(spool, "1.1", "1.1.2", 1003.0)  # a new instance restarts series 1.1's quiet clock
    clock.t = 1012.0
    assert asm.tick() == []
    clock.t = 1013.0
    assert asm.tick() == [a]
    clock.t = 1015.0
    assert asm.tick() == [b]
    assert seen == [a, b]
    late = add(spool, "1.1", "1.1.3", 1016.0)
    assert late not in (a, b)
    clock.t = 1026.0
    assert asm.tick() == [late]
    assert [i.sop_uid for i in spool.ledger.instances(late)] == ["1.1.3"]
    assert spool.ledger.job(late).follow_up_of == a
    spool.close()


def test_negative_quiet_time_is_refused(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    with pytest.raises(ValueError, match="series_quiet_seconds"):
        Assembler(spool.ledger, -1)
    spool.close()
