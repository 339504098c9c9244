"""`dicomnode evaluate`: tables, montage, metric selection, guidance, DICOM input and benchmarks."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence

import numpy as np
import pytest
from skimage import data, transform
from skimage.io import imread, imsave

from dicomnode.cli import main as cli
from models import evaluate as E
from models import metrics as M
from models.registry import Enhancer, ModelInfo

from factories import bundled

SIZE = (192, 200)  # two NIQE blocks, small enough to keep the test quick


def _u8(img: np.ndarray) -> np.ndarray:
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


@pytest.fixture
def folders(tmp_path):
    """3 degraded images, their clean references and a traced line mask each."""
    base = transform.resize(data.camera(), SIZE, anti_aliasing=True)
    inp, ref, msk = (tmp_path / n for n in ("in", "ref", "masks"))
    for d in (inp, ref, msk):
        d.mkdir()
    for i in range(3):
        clean = np.roll(base, 25 * i, axis=1)
        bad = 0.3 + 0.4 * clean + np.random.default_rng(i).normal(0, 0.02, SIZE)
        mask = np.zeros(SIZE, np.uint8)
        mask[60 + 20 * i, 20:180] = 255
        imsave(ref / f"img{i}.png", _u8(clean), check_contrast=False)
        imsave(inp / f"img{i}.png", _u8(bad), check_contrast=False)
        imsave(msk / f"img{i}.png", mask, check_contrast=False)
    return inp, ref, msk


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_evaluate_writes_tables_and_montage(folders, tmp_path, capsys):
    inp, ref, msk = folders
    out = tmp_path / "out"
    rc = cli(["evaluate", "--input", str(inp), "--reference", str(ref), "--masks", str(msk),
              "--methods", "clahe,histeq", "--metrics", "psnr,ssim,lassim,lassim_in,ag,en,niqe,snr3,auc,dice",
              "--out", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "PSNR↑" in printed and "clahe" in printed and "3 image(s) x 2 method(s)" in printed

    rows = _read_csv(out / "results.csv")
    assert [r["method"] for r in rows] == ["input", "reference", "clahe", "histeq"]
    assert all(r["n_images"] == "3" for r in rows)
    # The input row is the untouched input: its PSNR is the mean of the direct per-image PSNRs.
    expected = np.mean([M.psnr(imread(inp / f"img{i}.png"), imread(ref / f"img{i}.png")) for i in range(3)])
    assert float(rows[0]["psnr_mean"]) == pytest.approx(expected, rel=1e-5)
    assert float(rows[0]["lassim_in_mean"]) == pytest.approx(1.0)
    assert rows[1]["psnr_mean"] == "inf" and float(rows[1]["ssim_mean"]) == pytest.approx(1.0)  # the target
    # Contrast stretching sharpens the washed-out input's gradients and moves away from it.
    assert float(rows[3]["ag_mean"]) > float(rows[0]["ag_mean"])
    assert float(rows[3]["lassim_in_mean"]) < 1.0
    for r in rows:
        for key in ("snr3_mean", "auc_mean", "dice_mean", "niqe_mean"):
            assert math.isfinite(float(r[key])), (r["method"], key)

    per_image = _read_csv(out / "per_image.csv")
    assert len(per_image) == 12 and {r["image"] for r in per_image} == {"img0.png", "img1.png", "img2.png"}

    md = (out / "results.md").read_text()
    assert "| Method | n | PSNR ↑ | SSIM ↑ |" in md and "| input | 3 |" in md and "| reference | 3 |" in md
    assert " ± " in md and "**" in md
    assert (out / "results.json").is_file()

    montage = imread(out / "montage.png")
    assert montage.ndim == 3 and montage.shape[0] > 450 and montage.shape[1] > 600  # 3 rows x 4 full-size 160 px crops


def test_metric_selection():
    names = [m.name for m in E.select_metrics(None, have_reference=False, have_masks=False)]
    assert "niqe" in names and "lassim_in" in names and "psnr" not in names and "snr3" not in names
    assert "psnr" in [m.name for m in E.select_metrics(None, have_reference=True, have_masks=False)]
    with pytest.raises(ValueError, match="--reference"):
        E.select_metrics(["psnr"], have_reference=False, have_masks=False)
    with pytest.raises(ValueError, match="--masks"):
        E.select_metrics(["snr5"], have_reference=True, have_masks=False)
    with pytest.raises(ValueError, match="unknown metric.*sharpness"):
        E.select_metrics(["sharpness"], have_reference=True, have_masks=True)


def test_clear_errors(folders, tmp_path, capsys):
    inp, ref, _ = folders
    (ref / "img2.png").unlink()
    with pytest.raises(ValueError, match="no reference .* 'img2'"):
        E.evaluate(E.EvalConfig(input=inp, reference=ref, out=tmp_path / "o", metrics=["psnr"], progress=False))
    assert cli(["evaluate", "--input", str(inp), "--methods", "sharpen", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "neither a model kind" in capsys.readouterr().out
    assert cli(["evaluate", "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2


def test_weights_files_go_through_their_model_card(folders, tmp_path, capsys):
    inp, _, _ = folders
    out = str(tmp_path / "o")
    assert cli(["evaluate", "--input", str(inp), "--methods", str(tmp_path / "missing.pt"), "--out", out, "--no-progress"]) == 2
    assert "weights file not found" in capsys.readouterr().out
    weights = tmp_path / "odd.pt"
    weights.write_bytes(b"not a model")
    (tmp_path / "odd.json").write_text('{"kind": "no-such-kind"}')
    assert cli(["evaluate", "--input", str(inp), "--methods", str(weights), "--out", out, "--no-progress"]) == 2
    assert "unknown model kind 'no-such-kind'" in capsys.readouterr().out


class _Guided(Enhancer):
    """Adds the guidance vector's first entry: shows which vector evaluate passed."""

    uses_guidance = True

    def __init__(self):
        self.info = ModelInfo(kind="fake", name="Guided", version="0")
        self.seen: list[np.ndarray | None] = []

    def extract_guidance(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return np.array([[float(img.mean()), 1.0] for img in images])

    def enhance(self, images, guidance=None):
        self.seen.append(guidance)
        return [np.clip(img * 0 + float(guidance[0]), 0, 1).astype(np.float32) for img in images]


def test_guided_models_get_the_mean_guidance_vector(folders, tmp_path, monkeypatch):
    inp, ref, _ = folders
    fake = _Guided()
    monkeypatch.setattr(E, "load_method", lambda spec, device="auto": fake)
    cfg = E.EvalConfig(input=inp, out=tmp_path / "o", methods=["fake.pt"], metrics=["en"], progress=False)
    with pytest.raises(ValueError, match="--guidance"):
        E.evaluate(cfg)
    cfg.guidance = ref
    result = E.evaluate(cfg)
    expected = np.mean([imread(ref / f"img{i}.png").mean() / 255.0 for i in range(3)])
    assert len(fake.seen) == 3
    for g in fake.seen:
        assert g.shape == (2,) and g[0] == pytest.approx(expected, abs=1e-3) and g[1] == 1.0
    assert result.summary.mean["fake"]["en"] == 0.0  # a flat output has zero entropy


def test_dicom_input(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    src = bundled("CT_small.dcm")
    inp = tmp_path / "dicom"
    inp.mkdir()
    ds = pydicom.dcmread(src)
    ds.save_as(inp / "ct.dcm")
    result = E.evaluate(E.EvalConfig(input=inp, out=tmp_path / "o", methods=["clahe"], metrics=["ag", "en", "lassim_in"], progress=False))
    assert result.summary.count["clahe"]["ag"] == 1
    assert result.summary.mean["clahe"]["ag"] > result.summary.mean["input"]["ag"]


def test_fundus_benchmark_makes_pairs(tmp_path):
    out = tmp_path / "bench"
    rc = cli(["evaluate", "--benchmark", "fundus", "--limit", "2", "--methods", "clahe",
              "--metrics", "psnr,ssim,lassim", "--out", str(out), "--no-progress"])
    assert rc == 0
    inputs = sorted((out / "data" / "input").glob("*.png"))
    refs = sorted((out / "data" / "reference").glob("*.png"))
    assert len(inputs) == len(refs) == 2 and [p.name for p in inputs] == [p.name for p in refs]
    a, b = imread(inputs[0]), imread(refs[0])
    assert a.shape == b.shape == (384, 384, 3) and 5 < M.psnr(a, b) < 30
    # Same seed = same damage: the benchmark is reproducible.
    E.prepare_benchmark("fundus", tmp_path / "again", limit=1)
    np.testing.assert_array_equal(imread(tmp_path / "again" / "input" / inputs[0].name), a)
    assert "Built-in FUNDUS benchmark" in (out / "results.md").read_text()
    manifest = _read_csv(out / "data" / "manifest.csv")
    assert [r["image"] for r in manifest] == [p.name for p in inputs]
    assert all(set(r["degradations"].split("+")) <= {"illumination", "haze", "blur", "low_contrast"} for r in manifest)


def test_ccm_benchmark_uses_shared_images(shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("DICOMNODE_SHARED_DATA", str(shared_data))
    result = E.run_benchmark("ccm", E.EvalConfig(input=None, out=tmp_path, methods=["clahe"], metrics=["psnr"], progress=False), limit=2)
    assert result.summary.count["input"]["psnr"] == 2
    assert math.isfinite(result.summary.mean["clahe"]["psnr"])


def test_ccm_benchmark_without_data_says_where(tmp_path, monkeypatch):
    monkeypatch.setenv("DICOMNODE_SHARED_DATA", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="vignetting_corrected"):
        E.prepare_benchmark("ccm", tmp_path / "b")


def test_border_is_measured_on_the_inputs_own_surround() -> None:
    """A degradation can spread content past the clean frame's rim (blur, haze); a method that keeps its
    input's black surround must score 0, and one that lifts it must not. The full-reference metrics keep
    the reference's field; the border figure uses the input's, as the issue defines it."""
    from scipy import ndimage as ndi

    from models.fov import fov_mask, keep_surround

    yy, xx = np.mgrid[:160, :160]
    disc = ((yy - 80) ** 2 + (xx - 80) ** 2) < 60**2
    clean = np.where(disc[..., None], np.array([0.7, 0.35, 0.2], np.float32), 0.0).astype(np.float32)
    spread = np.stack([ndi.gaussian_filter(clean[..., c], 3.0) for c in range(3)], axis=-1)  # blur past the rim
    assert fov_mask(spread).sum() > fov_mask(clean).sum()
    kept = keep_surround(spread, np.clip(spread * 1.2, 0, 1))
    lifted = np.clip(spread + 0.1, 0, 1).astype(np.float32)
    border = E.METRICS["border"].fn
    view, own = fov_mask(clean), fov_mask(spread)
    assert border(E.Sample(output=kept, input=spread, reference=clean, view=view, surround_of_input=own)) == 0.0
    assert border(E.Sample(output=kept, input=spread, reference=clean, view=view)) > 0.0  # judged on the clean rim
    assert border(E.Sample(output=lifted, input=spread, reference=clean, view=view, surround_of_input=own)) > 20.0
