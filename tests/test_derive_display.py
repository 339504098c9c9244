"""The derived SC series shows, in a standard viewer, exactly the enhanced picture the node intended.

DCMTK's renderer (dcmj2pnm; dcml2pnm for JPEG-LS) stands in for the PACS viewer and renders as a viewer does by
default: the first stored window when the object has one, else the full range for 8-bit data, else min-max;
overlays off. Every source is decoded the way the node decodes it, changed visibly (gamma and a gradient, so
an identity cannot pass by accident), derived, encoded in each storage syntax DCMTK reads (its open-source
build has no JPEG 2000 decoder; test_encode checks that syntax bit-exact through pydicom) and compared.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from dicomnode.derive import DeriveSettings, derive_sc
from dicomnode.encode import encode
from dicomnode.imaging import iter_frames
from models.registry import ModelInfo

from conftest import require_tools
from factories import read_ascii_pnm, sample

MODEL = ModelInfo(kind="hqgnet", name="HQG-Net", version="2.1", weights_sha256="ab" * 32)
SETTINGS = DeriveSettings()
JPEG_LS = ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81")


def source(pixels: np.ndarray, *, color: bool = False, frames: bool = False, **attrs: object) -> Dataset:
    """A native source around ``pixels`` ((frames,) rows, columns(, 3)) with a full identity."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID = "Test^Display", "D1"
    ds.Rows, ds.Columns = pixels.shape[1:3] if frames else pixels.shape[:2]
    ds.SamplesPerPixel = 3 if color else 1
    ds.PhotometricInterpretation = "RGB" if color else "MONOCHROME2"
    if color:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = pixels.dtype.itemsize * 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    if frames:
        ds.NumberOfFrames = pixels.shape[0]
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    ds.PixelData = pixels.tobytes()
    return ds


def ramp(lo: int, hi: int, dtype: str, nframes: int = 0) -> np.ndarray:
    """A diagonal ramp with a little noise; each frame shifted, so frames are told apart."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:40, 0:48]
    base = lo + (hi - lo) * (0.6 * xx / 47 + 0.4 * yy / 39)
    shifted = [np.roll(base, 5 * i, axis=1) for i in range(max(nframes, 1))]
    out = np.stack([(f + rng.normal(0, (hi - lo) * 0.01, f.shape)).clip(lo, hi) for f in shifted]).astype(dtype)
    return out if nframes else out[0]


def case(name: str) -> Dataset:
    if name == "ct16_signed_rescale_window_padding":
        pixels = ramp(-1024, 2000, "i2")
        pixels[:4] = -2000
        return source(pixels, Modality="CT", RescaleIntercept=-1024, RescaleSlope=1, WindowCenter=40,
                      WindowWidth=400, PixelPaddingValue=-2000, VOILUTFunction="LINEAR")
    if name == "mr12_no_window_3frames":
        return source(ramp(0, 4095, "u2", 3), frames=True, Modality="MR", BitsStored=12, HighBit=11)
    if name == "cr_monochrome1_window":
        return source(ramp(0, 4095, "u2"), Modality="CR", BitsStored=12, HighBit=11,
                      PhotometricInterpretation="MONOCHROME1", WindowCenter=2000, WindowWidth=3000)
    if name == "dx_presentation_lut_inverse":
        return source(ramp(0, 4095, "u2"), Modality="DX", BitsStored=12, HighBit=11, PresentationLUTShape="INVERSE",
                      WindowCenter=2000, WindowWidth=3000)
    if name == "us8_gray_4frames":
        return source(ramp(0, 255, "u1", 4), frames=True, Modality="US", FrameTime=33.3)
    if name == "rgb_3frames":
        gray = ramp(0, 255, "u1", 3)
        return source(np.stack([gray, gray[:, ::-1], 255 - gray], -1), color=True, frames=True, Modality="ES")
    return sample(name)  # PALETTE COLOR; YBR_FULL_422 JPEG baseline


CASES = ["ct16_signed_rescale_window_padding", "mr12_no_window_3frames", "cr_monochrome1_window",
         "dx_presentation_lut_inverse", "us8_gray_4frames", "rgb_3frames", "examples_palette.dcm",
         "SC_rgb_dcmtk_+eb+cy+np.dcm"]


def enhanced(frame: np.ndarray, index: int) -> np.ndarray:
    """A visible, known change: gamma 0.7, a horizontal gradient (opposite per colour channel) and a per-frame step."""
    out = np.clip(frame, 0.0, 1.0) ** 0.7
    gradient = np.linspace(-0.08, 0.08, out.shape[1], dtype=np.float32)[None, :]
    if out.ndim == 3:
        gradient = gradient[..., None] * np.array([1.0, -1.0, 0.5], np.float32)
    return np.clip(out + gradient + 0.01 * index, 0.0, 1.0).astype(np.float32)


def viewer_options(ds: Dataset) -> list[str]:
    """What a viewer does by default: the first stored window, else full range (8-bit, colour), else min-max."""
    if "WindowCenter" in ds and "WindowWidth" in ds:
        return ["+Wi", "1"]
    return ["-W"] if int(ds.SamplesPerPixel) == 3 or int(ds.BitsStored) <= 8 else ["+Wm"]


def render(path: Path, frame: int, out: Path) -> np.ndarray:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    tool = "dcml2pnm" if str(ds.file_meta.TransferSyntaxUID) in JPEG_LS else "dcmj2pnm"
    depth = "--write-8-bit-pnm" if int(ds.BitsStored) <= 8 else "--write-16-bit-pnm"  # DCMTK widens 8 bits as x256
    subprocess.run([tool, "--no-overlays", depth, "--frame", str(frame + 1), *viewer_options(ds), str(path), str(out)],
                   check=True, capture_output=True)
    return read_ascii_pnm(out)


@pytest.mark.parametrize("syntax", ["uncompressed", "jpeg-ls-lossless", "rle-lossless"])
@pytest.mark.parametrize("name", CASES)
def test_derived_sc_renders_as_the_intended_frames(tmp_path: Path, name: str, syntax: str) -> None:
    """Each frame, as DCMTK shows the written SC and as the node decodes it, is the intended frame to within the
    output's quantisation (half a step of 8 or 16 bits): no window, LUT, inversion or palette of the source
    re-applied, frames in order, colour channels in place."""
    require_tools("dcmj2pnm", "dcml2pnm")
    src = case(name)
    intended = [enhanced(frame, i) for i, (frame, _) in enumerate(iter_frames(src))]
    derived = encode(derive_sc(src, intended, MODEL, SETTINGS, None), syntax)
    path = tmp_path / "sc.dcm"
    derived.save_as(path, enforce_file_format=True)
    written = pydicom.dcmread(path)
    step = 0.5 / (255 if int(written.BitsStored) == 8 else 65535) + 1e-6
    own = [frame for frame, _ in iter_frames(written)]
    assert len(own) == len(intended)
    for i, want in enumerate(intended):
        shown = render(path, i, tmp_path / f"frame{i}.pnm")
        assert shown.shape == want.shape, f"frame {i}: rendered {shown.shape}, intended {want.shape}"
        difference = np.abs(shown - want)
        assert float(difference.max()) <= step, f"{name} {syntax} frame {i}: max {difference.max():.5f} from dcmj2pnm"
        assert float(np.abs(own[i].astype(np.float64) - want).max()) <= step


# ------------------------------------------------------------------ pixel aspect ratio


@pytest.mark.parametrize(("attrs", "expected"), [
    ({"PixelAspectRatio": [4, 3]}, [4, 3]),  # ultrasound with non-square pixels
    ({"ImagerPixelSpacing": [0.2, 0.15]}, [4, 3]),  # projection radiograph: a viewer takes the ratio from it
    ({"SharedFunctionalGroupsSequence": [Dataset()]}, [3, 2]),  # enhanced multi-frame: Pixel Measures (below)
    ({"ImagerPixelSpacing": [0.139, 0.139]}, None),  # square: nothing to state
    ({"PixelSpacing": [0.3, 0.2], "PixelAspectRatio": [3, 2]}, None),  # Pixel Spacing is copied and carries it
])
def test_non_square_pixels_keep_their_aspect_ratio(attrs: dict[str, object], expected: list[int] | None) -> None:
    """A source whose pixels are not square, stated other than by Pixel Spacing, gives a derived object with
    Pixel Aspect Ratio; it carried none, so viewers showed the enhanced picture squashed beside the source."""
    if "SharedFunctionalGroupsSequence" in attrs:
        measures = Dataset()
        measures.PixelSpacing = [0.3, 0.2]
        attrs["SharedFunctionalGroupsSequence"][0].PixelMeasuresSequence = [measures]  # type: ignore[index]
    for src in (source(ramp(0, 255, "u1"), Modality="US", **attrs),
                source(ramp(0, 255, "u1", 2), frames=True, Modality="US", **attrs)):
        frames = [frame for frame, _ in iter_frames(src)]
        derived = derive_sc(src, frames, MODEL, SETTINGS, None)
        if expected is None:
            assert "PixelAspectRatio" not in derived
        else:
            assert [int(v) for v in derived.PixelAspectRatio] == expected


def test_non_square_pixels_render_with_the_source_shape(tmp_path: Path) -> None:
    """Scaled to one width, DCMTK shows the derived object with the source's height (not 4:3 squashed to 1:1)."""
    require_tools("dcmj2pnm")
    shapes = []
    for label, attrs in (("aspect", {"PixelAspectRatio": [4, 3]}), ("imager", {"ImagerPixelSpacing": [0.2, 0.15]})):
        src = source(ramp(0, 4095, "u2"), Modality="DX", BitsStored=12, HighBit=11, WindowCenter=2000,
                     WindowWidth=4000, **attrs)
        derived = derive_sc(src, [f for f, _ in iter_frames(src)], MODEL, SETTINGS, None)
        for kind, ds in (("source", src), ("derived", derived)):
            path, out = tmp_path / f"{label}-{kind}.dcm", tmp_path / f"{label}-{kind}.pgm"
            ds.save_as(path, enforce_file_format=True)
            subprocess.run(["dcmj2pnm", "--no-overlays", "--scale-x-size", "96", str(path), str(out)], check=True,
                           capture_output=True)
            shapes.append((label, kind, out.read_bytes().split(b"\n")[1]))
    # 40 x 48 pixels 4:3 tall, 96 wide: 106 rows (80 when shown square)
    assert [shape for _, _, shape in shapes] == [b"96 106"] * 4, shapes
