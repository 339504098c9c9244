"""Series enhancement through the pipeline: batching, failures isolated per instance, atomic output."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from dicomnode.config import DerivePolicy
from dicomnode.derive import DeriveSettings, read_private
from dicomnode.domain import Instance, Series, SeriesOutcome
from dicomnode.guidance import Guidance
from dicomnode.pipeline import Pipeline
from dicomnode.resident import ResidentModels
from models.registry import Enhancer, ModelInfo, build_model

from factories import bundled as sample_path
from factories import decode


def run(sources: Sequence[Path], enhancer: Enhancer, out: Path, *, batch_size: int = 4, guidance: np.ndarray | None = None,
        progress=None, min_size: int = 16) -> SeriesOutcome:
    """One series of ``sources`` through the pipeline with ``enhancer`` as its resident model."""
    record = None
    if guidance is not None:
        record = Guidance(id="gid", model="m", modality="default", vector=np.asarray(guidance).reshape(-1),
                          method="mean", weights_sha256="", refs_sha256="", n_refs=1)
    models = ResidentModels.single("m", enhancer, batch_size=batch_size, guidance=record)
    series = Series("p", "1.2", "1.2.3", tuple(Instance(Path(p), {"Modality": "CT"}) for p in sources))
    derive = DeriveSettings(policy=DerivePolicy(min_size=min_size))
    return Pipeline(None, models, derive).run(series, out, model="m", progress=progress)


class Recording(Enhancer):
    """Wraps an enhancer; records batch sizes and can fail on frames of a given shape."""

    def __init__(self, inner: Enhancer, fail_shape: tuple[int, ...] | None = None):
        self.inner = inner
        self.info = inner.info
        self.fail_shape = fail_shape
        self.uses_guidance = inner.uses_guidance
        self.batches: list[int] = []
        self.guidance_seen: list[object] = []

    def enhance(self, images: Sequence[np.ndarray], guidance: np.ndarray | None = None) -> list[np.ndarray]:
        self.batches.append(len(images))
        self.guidance_seen.append(guidance)
        if self.fail_shape is not None and any(img.shape == self.fail_shape for img in images):
            raise RuntimeError("model exploded")
        return self.inner.enhance(images)


@pytest.fixture(scope="module")
def clahe() -> Enhancer:
    return build_model("clahe")


def make_series(folder: Path, count: int, name: str = "CT_small.dcm") -> list[Path]:
    """``count`` instances of one series (copies of a bundled file with their own SOP UIDs)."""
    folder.mkdir(parents=True, exist_ok=True)
    template = pydicom.dcmread(sample_path(name))
    paths = []
    for i in range(count):
        template.SOPInstanceUID = generate_uid()
        template.InstanceNumber = i + 1
        path = folder / f"{name}-{i}.dcm"
        template.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_series_is_enhanced_in_batches(tmp_path: Path, clahe):
    sources = make_series(tmp_path / "in", 5)
    model = Recording(clahe)
    model.uses_guidance = True  # stands in for a guided model: the pipeline binds the cached vector
    guidance = np.ones(8, np.float32)
    result = run(sources, model, tmp_path / "out", batch_size=2, guidance=guidance)
    assert model.batches == [2, 2, 1]  # batched across instances, never more than batch_size
    assert all(np.array_equal(g, guidance) for g in model.guidance_seen)  # the bound guidance, every batch
    assert result.failed == [] and len(result.outputs) == 5
    assert set(result.timings) == {"read", "decode", "model", "gate", "encode", "write", "total"}
    assert result.timings["model"] > 0 and result.timings["total"] >= result.timings["model"]
    series_uids = set()
    for path, src in zip(result.outputs, sources):
        ds = pydicom.dcmread(path)
        assert path.name == f"{ds.SOPInstanceUID}.dcm" and path.parent == tmp_path / "out"
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == pydicom.dcmread(src).SOPInstanceUID
        assert read_private(ds)["guidance_id"] == "gid"
        series_uids.add(ds.SeriesInstanceUID)
    assert len(series_uids) == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in result.outputs)  # no temp files


def test_rerun_rewrites_the_same_files(tmp_path: Path, clahe):
    sources = make_series(tmp_path / "in", 2)
    first = run(sources, clahe, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in first.outputs}
    second = run(sources, clahe, tmp_path / "out")
    assert first.outputs == second.outputs
    assert {p.name: p.read_bytes() for p in second.outputs} == before  # the same bytes under the same UIDs
    assert len(list((tmp_path / "out").iterdir())) == 2


def test_multiframe_instance_spans_batches(tmp_path: Path, clahe):
    src = sample_path("rtdose.dcm")  # 15 frames of 10 x 10
    model = Recording(clahe)
    result = run([src], model, tmp_path / "out", batch_size=4, min_size=8)
    assert model.batches == [4, 4, 4, 3]
    (out,) = result.outputs
    ds = pydicom.dcmread(out)
    assert int(ds.NumberOfFrames) == 15 and ds.pixel_array.shape == (15, 10, 10)


def test_bad_instances_fail_alone(tmp_path: Path, clahe):
    good = make_series(tmp_path / "in", 3)
    truncated = tmp_path / "in" / "truncated.dcm"
    shutil.copy(sample_path("MR_truncated.dcm"), truncated)
    not_dicom = tmp_path / "in" / "notes.txt"
    not_dicom.write_text("not a DICOM file")
    missing = tmp_path / "in" / "gone.dcm"
    no_pixels = tmp_path / "in" / "plan.dcm"
    shutil.copy(sample_path("rtplan.dcm"), no_pixels)
    sources = [good[0], truncated, good[1], not_dicom, missing, no_pixels, good[2]]
    result = run(sources, clahe, tmp_path / "out", batch_size=2)
    assert len(result.outputs) == 3
    reasons = dict(result.failed)
    assert set(reasons) == {truncated, not_dicom, missing, no_pixels}
    assert "less than expected" in reasons[truncated]
    assert "no PixelData" in reasons[no_pixels]
    assert "cannot read" in reasons[not_dicom] and "cannot read" in reasons[missing]


def test_model_failure_is_isolated_to_its_instance(tmp_path: Path, clahe):
    ct = make_series(tmp_path / "ct", 3)  # 128 x 128
    mr = make_series(tmp_path / "mr", 1, "MR_small.dcm")  # 64 x 64: the model fails on these
    model = Recording(clahe, fail_shape=(64, 64))
    result = run([ct[0], mr[0], ct[1], ct[2]], model, tmp_path / "out", batch_size=4)
    assert len(result.outputs) == 3
    ((failed, reason),) = result.failed
    assert failed == mr[0] and "model exploded" in reason


class ShapeBreaker(Enhancer):
    info = ModelInfo(kind="test", name="Breaker", version="0")

    def enhance(self, images, guidance=None):
        return [np.zeros((2, 2), np.float32) for _ in images]


def test_model_returning_wrong_shapes_fails_cleanly(tmp_path: Path):
    sources = make_series(tmp_path / "in", 2)
    result = run(sources, ShapeBreaker(), tmp_path / "out")
    assert result.outputs == [] and len(result.failed) == 2
    assert all("shape" in reason for _, reason in result.failed)


def test_unwritable_output_fails_each_instance(tmp_path: Path, clahe):
    sources = make_series(tmp_path / "in", 2)
    blocker = tmp_path / "out"
    blocker.write_text("a file where the folder should be")
    result = run(sources, clahe, blocker)
    assert result.outputs == [] and len(result.failed) == 2
    assert all(reason.startswith("write:") for _, reason in result.failed)


def test_progress_called_once_per_source(tmp_path: Path, clahe):
    sources = make_series(tmp_path / "in", 3) + [tmp_path / "missing.dcm"]
    ticks: list[int] = []
    run(sources, clahe, tmp_path / "out", progress=ticks.append)
    assert ticks == [1, 1, 1, 1]


def test_real_images_through_img2dcm(tmp_path: Path, clahe, shared_data: Path):
    """Real gray (confocal microscopy) and colour (endoscopy, YBR JPEG) photos as a camera sends them."""
    import subprocess

    from conftest import require_tools

    require_tools("img2dcm", "dciodvfy", "dcml2pnm")
    picks = [
        sorted((shared_data / "ccm" / "raw").glob("*.jpg"))[:1],
        sorted((shared_data / "endoscopy" / "frames").glob("*.jpg"))[:1],
    ]
    if not all(picks):
        pytest.skip("expected ccm/raw and endoscopy/frames JPEGs in the shared data")
    sources = []
    for i, (jpg,) in enumerate(picks):
        dcm = tmp_path / "in" / f"{i}.dcm"
        dcm.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["img2dcm", "-k", "Modality=XC", "-k", "SeriesNumber=7", str(jpg), str(dcm)], check=True,
                       capture_output=True)
        sources.append(dcm)
    result = run(sources, clahe, tmp_path / "out")
    assert result.failed == [] and len(result.outputs) == 2
    for src_path, out_path in zip(sources, result.outputs):
        src, out = pydicom.dcmread(src_path), pydicom.dcmread(out_path)
        assert (out.Rows, out.Columns) == (src.Rows, src.Columns) and out.SeriesNumber == 1007
        assert out.LossyImageCompression == "01"  # the camera's JPEG stays on record
        before, after = decode(src).frames[0], decode(out).frames[0]
        expected = clahe.enhance([before])[0]
        assert float(np.abs(after - expected).max()) <= 1 / 255 + 1e-6  # stored 8-bit, nothing else lost
        assert float(np.abs(after - before).mean()) > 0.01  # CLAHE changed the picture
        check = subprocess.run(["dciodvfy", "-new", str(out_path)], capture_output=True, text=True)
        assert [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")] == []
        subprocess.run(["dcml2pnm", "+on", str(out_path), str(tmp_path / "r.png")], check=True, capture_output=True)


def test_images_below_the_minimum_size_are_left_alone_with_the_reason(tmp_path: Path, clahe):
    """A 10 x 10 dose grid is not an image to enhance: nothing is derived, nothing fails, the outcome says why."""
    tiny, normal = sample_path("rtdose.dcm"), make_series(tmp_path / "in", 1)[0]
    result = run([tiny, normal], Recording(clahe), tmp_path / "out")
    assert result.failed == [] and result.error is None and len(result.outputs) == 1
    assert [p for p, _ in result.skipped] == [tiny]
    assert "10x10 pixels is below the minimum size 16" in result.skipped[0][1]
    only_tiny = run([tiny], Recording(clahe), tmp_path / "out2")
    assert only_tiny.outputs == [] and only_tiny.error is None and len(only_tiny.skipped) == 1
