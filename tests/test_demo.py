"""`dicomnode demo` end to end: a real node, real C-STORE, the shipped models, an HTML page."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest


@pytest.mark.slow
def test_demo_writes_its_page(tmp_path: Path) -> None:
    from dicomnode.demo import run_demo

    result = run_demo(tmp_path / "demo", timeout=300, show_progress=False)
    page = result.page.read_text()
    assert result.page == tmp_path / "demo" / "index.html"
    by_key = {i.sample.key: i for i in result.items}
    assert {"fundus", "ccm", "ct", "mr"} <= set(by_key)
    enhanced = [i for i in result.items if i.output is not None]
    assert {i.sample.key for i in enhanced} == {"fundus", "ccm"} and len(enhanced) == 3
    for item in enhanced:
        ds = pydicom.dcmread(item.output)
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and "guidance g-" in ds.DerivationDescription
        assert (tmp_path / "demo" / "img" / item.after_png).is_file()
        assert item.metrics_after and item.metrics_before
    assert by_key["ct"].output is None and "left alone" in by_key["ct"].note
    assert page.count("<img") == len(result.items) + len(enhanced)
    assert "NIQE" in page and "Secondary" in page
