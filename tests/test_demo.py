"""`dicomnode demo` end to end: a real node, real C-STORE, the shipped models, an HTML page."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest


@pytest.mark.slow
def test_demo_writes_its_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dicomnode.tools.demo import run_demo

    monkeypatch.chdir(tmp_path)  # `dicomnode demo --out demo/`: a relative --out is relative to the working directory
    result = run_demo(Path("demo/"), timeout=300, show_progress=False)
    page = result.page.read_text()
    assert result.page == tmp_path / "demo" / "index.html"
    assert result.seconds < 120
    by_key = {i.sample.key: i for i in result.items}
    assert {"fundus", "ccm", "ct", "mr"} <= set(by_key)
    enhanced = [i for i in result.items if i.output is not None]
    assert {"ccm"} <= {i.sample.key for i in enhanced}
    fundus = by_key["fundus"]  # enhanced, or held back by the quality gate with that reason on the page
    assert fundus.output is not None or "quality gate" in fundus.note
    for item in enhanced:
        ds = pydicom.dcmread(item.output)
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
        # the default routes: CCM to the shipped HQG-Net (with its guidance id), fundus to field normalisation
        assert ("HQG-Net" in ds.DerivationDescription and "guidance g-" in ds.DerivationDescription) \
            if item.sample.key == "ccm" else "Field normalisation" in ds.DerivationDescription
        assert (tmp_path / "demo" / "img" / item.after_png).is_file()
        assert item.metrics_after and item.metrics_before
    assert by_key["ct"].output is None and "left alone" in by_key["ct"].note
    assert page.count("<img") == len(result.items) + len(enhanced)
    assert "NIQE" in page and "Secondary" in page
