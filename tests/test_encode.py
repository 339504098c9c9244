"""Storage encoding of derived outputs (derive.transfer_syntax): lossless round trips, read-back by dcmtk and
dicom3tools, the pipeline writing the configured syntax, the fallback for a PACS that refuses it (real
sockets), and the size of real fundus outputs."""

from __future__ import annotations

import io
import subprocess
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import yaml
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE, evt

from dicomnode.config import DEFAULT_CONFIG, DerivePolicy, parse_config
from dicomnode.derive import DeriveSettings
from dicomnode.destinations.dicom import DicomDestination
from dicomnode.domain import Instance, Series, SeriesOutcome
from dicomnode.encode import SYNTAXES, UNCOMPRESSED, decompress_for, encode
from dicomnode.pipeline import Pipeline
from dicomnode.resident import ResidentModels
from models.registry import build_model

from conftest import require_tools
from factories import image_dataset, write, write_series

COMPRESSED = [name for name in SYNTAXES if name != "uncompressed"]
MULTI_FRAME_CLASSES = {
    "rgb": MultiFrameTrueColorSecondaryCaptureImageStorage,
    "gray8": MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    "gray16": MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
}
KINDS = ["gray8", "gray16", "rgb", "gray8-multiframe", "gray16-multiframe", "rgb-multiframe"]


# --------------------------------------------------------------------------- helpers


def pixels(kind: str, seed: int = 0, shape: tuple[int, int] = (48, 40), noise: float = 0.02) -> np.ndarray:
    """A smooth gradient plus noise (compressible, not trivially): (H, W) or (H, W, 3)."""
    rng = np.random.default_rng(seed)
    rows, cols = shape
    ramp = np.add.outer(np.linspace(0, 0.6, rows), np.linspace(0, 0.3, cols))
    top = 65535 if kind.startswith("gray16") else 255
    dtype = np.uint16 if kind.startswith("gray16") else np.uint8
    if kind.startswith("rgb"):
        ramp = np.stack([ramp, ramp[::-1], ramp[:, ::-1]], axis=-1)
    noisy = ramp + rng.normal(0, noise, ramp.shape)
    return np.clip(noisy * top, 0, top).astype(dtype)


def frames_for(kind: str) -> list[np.ndarray]:
    if not kind.endswith("multiframe"):
        return [pixels(kind)]
    # 3 frames of 35x33 8-bit: an odd number of bytes, so the uncompressed Pixel Data carries a pad byte
    return [pixels(kind, seed=i, shape=(35, 33)) for i in range(3)]


def dataset(frames: Sequence[np.ndarray], *, index: int = 0, lossy: str = "00", **attrs: Any) -> Dataset:
    """An uncompressed Secondary Capture of ``frames`` (multi-frame SC classes for several frames)."""
    ds = image_dataset(frames[0], index=index, **attrs)
    if len(frames) > 1:
        kind = "rgb" if frames[0].ndim == 3 else ("gray16" if frames[0].dtype == np.uint16 else "gray8")
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MULTI_FRAME_CLASSES[kind]
        ds.NumberOfFrames = len(frames)
        data = b"".join(np.ascontiguousarray(f).tobytes() for f in frames)
        ds.PixelData = data + b"\x00" * (len(data) % 2)
        ds["PixelData"].VR = "OW" if frames[0].dtype == np.uint16 else "OB"
    ds.LossyImageCompression = lossy
    return ds


def expected(frames: Sequence[np.ndarray]) -> np.ndarray:
    return np.stack(frames) if len(frames) > 1 else frames[0]


def saved(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def encoded_bytes(ds: Dataset) -> int:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return len(buf.getvalue())


def run_pipeline(sources: Sequence[Path], out: Path, transfer_syntax: str, enhancer: Any = None) -> SeriesOutcome:
    """``sources`` as one series through CLAHE with ``derive.transfer_syntax`` set."""
    models = ResidentModels.single("m", enhancer or build_model("clahe"))
    settings = DeriveSettings(policy=DerivePolicy(transfer_syntax=transfer_syntax))
    series = Series("p", "1.2", "1.2.3", tuple(Instance(Path(p), {}) for p in sources))
    return Pipeline(None, models, settings).run(series, out, model="m")


def pipeline_sources(folder: Path) -> list[Path]:
    """A single-frame RGB, a multi-frame RGB and a 16-bit CT source: derive's three output shapes."""
    rgb = write(image_dataset(pixels("rgb", 1), index=0, modality="XC"), folder / "rgb.dcm")
    multi = write(dataset([pixels("rgb", s) for s in range(3)], index=1, modality="XC"), folder / "multi.dcm")
    (ct,) = write_series(folder / "ct", "study", "ct", 1, rows=48, cols=40)
    return [rgb, multi, ct]


class Peer:
    """A pynetdicom C-STORE SCP on loopback taking the SC classes in ``syntaxes`` only."""

    def __init__(self, port: int, syntaxes: Sequence[str]) -> None:
        self.port = port
        self.received: list[tuple[Dataset, UID]] = []
        self.lock = threading.Lock()
        ae = AE(ae_title="PACS")
        for sop in (SecondaryCaptureImageStorage, *MULTI_FRAME_CLASSES.values()):
            ae.add_supported_context(sop, list(syntaxes))
        self.ae = ae
        self.server: Any = None

    def _on_store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self.lock:
            self.received.append((ds, UID(str(event.context.transfer_syntax))))
        return 0x0000

    def __enter__(self) -> Peer:
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()


def destination(port: int) -> DicomDestination:
    return DicomDestination("pacs", "PACS", "127.0.0.1", port, calling_ae_title="DICOMNODE", timeout_seconds=5)


def compressed_file(tmp_path: Path, name: str, kind: str = "rgb") -> tuple[Path, np.ndarray]:
    frames = frames_for(kind)
    return saved(encode(dataset(frames), name), tmp_path / f"{name}-{kind}.dcm"), expected(frames)


# --------------------------------------------------------------------------- encode / decompress_for


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(SYNTAXES))
def test_round_trip_is_bit_exact(tmp_path: Path, name: str, kind: str) -> None:
    frames = frames_for(kind)
    lossy = "01" if "rgb" in kind else "00"  # what derive recorded is kept either way
    ds = dataset(frames, lossy=lossy)
    sop_uid = ds.SOPInstanceUID
    assert encode(ds, name) is ds
    assert ds.file_meta.TransferSyntaxUID == SYNTAXES[name]
    back = pydicom.dcmread(saved(ds, tmp_path / "out.dcm"))
    assert back.file_meta.TransferSyntaxUID == SYNTAXES[name]
    assert back.SOPInstanceUID == back.file_meta.MediaStorageSOPInstanceUID == sop_uid  # not regenerated
    assert back.LossyImageCompression == lossy
    if "rgb" in kind:
        assert back.PlanarConfiguration == 0
        # JPEG 2000 lossless colour is stored with the reversible colour transform (PS3.5 8.2.4)
        assert back.PhotometricInterpretation == ("YBR_RCT" if name == "jpeg2000-lossless" else "RGB")
    assert np.array_equal(back.pixel_array, expected(frames))


@pytest.mark.parametrize("name", COMPRESSED)
def test_compression_makes_smooth_images_smaller(name: str) -> None:
    frames = [pixels("rgb", shape=(128, 96), noise=0) // 32 * 32]  # posterized: runs for RLE too
    assert encoded_bytes(encode(dataset(frames), name)) < 0.8 * encoded_bytes(dataset(frames))


def test_jpeg2000_keeps_images_under_32_pixels_uncompressed(tmp_path: Path) -> None:
    frames = [pixels("gray16", shape=(20, 48))]
    ds = encode(dataset(frames), "jpeg2000-lossless")  # pylibjpeg-openjpeg cannot encode it
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(pydicom.dcmread(saved(ds, tmp_path / "small.dcm")).pixel_array, frames[0])
    assert encode(dataset(frames), "jpeg-ls-lossless").file_meta.TransferSyntaxUID == JPEGLSLossless


def test_compressed_dataset_is_reencoded(tmp_path: Path) -> None:
    frames = frames_for("rgb")
    ds = encode(encode(dataset(frames), "rle-lossless"), "jpeg-ls-lossless")
    assert ds.file_meta.TransferSyntaxUID == JPEGLSLossless
    assert np.array_equal(pydicom.dcmread(saved(ds, tmp_path / "x.dcm")).pixel_array, frames[0])
    assert encode(ds, "uncompressed").file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def test_unknown_syntax_name_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown transfer syntax 'jpeg-xl'"):
        encode(dataset(frames_for("gray8")), "jpeg-xl")


@pytest.mark.parametrize("name", COMPRESSED)
def test_decompress_for_a_peer_that_refuses_the_syntax(tmp_path: Path, name: str) -> None:
    path, pixels_in = compressed_file(tmp_path, name)
    ds = pydicom.dcmread(path)
    same, decoded_from = decompress_for(ds, [SYNTAXES[name], ExplicitVRLittleEndian])
    assert same is ds and decoded_from is None and ds.file_meta.TransferSyntaxUID == SYNTAXES[name]

    plain, decoded_from = decompress_for(ds, [ImplicitVRLittleEndian])
    assert decoded_from == SYNTAXES[name]
    assert plain.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert plain.SOPInstanceUID == pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
    assert plain.PhotometricInterpretation == "RGB"
    assert np.array_equal(plain.pixel_array, pixels_in)

    with pytest.raises(ValueError, match="neither is an uncompressed"):
        decompress_for(pydicom.dcmread(path), [RLELossless if name != "rle-lossless" else JPEGLSLossless])


# --------------------------------------------------------------------------- other readers: dcmtk, dicom3tools


@pytest.mark.parametrize("kind", ["rgb", "gray16", "rgb-multiframe"])
@pytest.mark.parametrize(("name", "tool"), [("jpeg-ls-lossless", "dcmdjpls"), ("rle-lossless", "dcmdrle")])
def test_dcmtk_decodes_outputs_bit_exact(tmp_path: Path, name: str, tool: str, kind: str) -> None:
    require_tools("dcmdump", tool)
    frames = frames_for(kind)
    path = saved(encode(dataset(frames), name), tmp_path / "in.dcm")
    dump = subprocess.run(["dcmdump", "-q", str(path)], capture_output=True, text=True, check=True).stdout
    assert "(7fe0,0010) OB (PixelSequence" in dump
    subprocess.run([tool, str(path), str(tmp_path / "out.dcm")], capture_output=True, check=True)
    back = pydicom.dcmread(tmp_path / "out.dcm")
    assert not back.file_meta.TransferSyntaxUID.is_compressed
    assert np.array_equal(back.pixel_array, expected(frames))


@pytest.mark.parametrize("name", COMPRESSED)
def test_pipeline_writes_the_configured_syntax(tmp_path: Path, name: str) -> None:
    """Same pixels as the uncompressed output, in the configured syntax; dciodvfy finds no error in them."""
    sources = pipeline_sources(tmp_path / "src")
    plain = run_pipeline(sources, tmp_path / "plain", "uncompressed")
    outcome = run_pipeline(sources, tmp_path / name, name)
    assert not outcome.failed and len(outcome.outputs) == len(plain.outputs) == 3
    assert "encode" in outcome.timings
    for got, ref in zip(outcome.outputs, plain.outputs):
        ds, ref_ds = pydicom.dcmread(got), pydicom.dcmread(ref)
        assert ds.file_meta.TransferSyntaxUID == SYNTAXES[name]
        assert ref_ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.SOPInstanceUID == ref_ds.SOPInstanceUID
        assert ds.LossyImageCompression == ref_ds.LossyImageCompression
        assert np.array_equal(ds.pixel_array, ref_ds.pixel_array)
    if name == "jpeg2000-lossless":
        return  # dciodvfy reads JPEG 2000 headers too; one run per syntax below is enough
    require_tools("dciodvfy")
    for got in outcome.outputs:
        report = subprocess.run(["dciodvfy", "-new", str(got)], capture_output=True, text=True)
        errors = [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
        assert not errors, f"{got.name}: {errors}"


def test_dciodvfy_accepts_jpeg2000_colour(tmp_path: Path) -> None:
    require_tools("dciodvfy")
    (rgb, multi, _ct) = pipeline_sources(tmp_path / "src")
    outcome = run_pipeline([rgb, multi], tmp_path / "out", "jpeg2000-lossless")
    for got in outcome.outputs:
        report = subprocess.run(["dciodvfy", "-new", str(got)], capture_output=True, text=True)
        errors = [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
        assert not errors, f"{got.name}: {errors}"


def test_encode_failure_fails_that_instance_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dicomnode.pipeline as pipeline_module

    sources = pipeline_sources(tmp_path / "src")
    real = pipeline_module.encode

    def flaky(ds: Dataset, name: str) -> Dataset:
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise RuntimeError("encoder exploded")
        return real(ds, name)

    monkeypatch.setattr(pipeline_module, "encode", flaky)
    outcome = run_pipeline(sources, tmp_path / "out", "jpeg-ls-lossless")
    assert [(p.name, reason) for p, reason in outcome.failed] == [("multi.dcm", "encode: RuntimeError: encoder exploded")]
    assert len(outcome.outputs) == 2 and sorted((tmp_path / "out").rglob("*.dcm")) == sorted(outcome.outputs)


# --------------------------------------------------------------------------- the PACS fallback, real sockets


@pytest.mark.parametrize("name", COMPRESSED)
def test_peer_accepting_only_uncompressed_gets_identical_pixels(tmp_path: Path, free_port: int, name: str) -> None:
    path, pixels_in = compressed_file(tmp_path, name, "rgb-multiframe")
    with Peer(free_port, UNCOMPRESSED) as peer:
        (outcome,) = destination(free_port).send([path])
    assert outcome.ok, outcome.detail
    assert f"decompressed from {SYNTAXES[name].name}" in outcome.detail
    ((ds, context),) = peer.received
    assert context in UNCOMPRESSED
    assert ds.SOPInstanceUID == pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
    assert ds.PhotometricInterpretation == "RGB"
    assert np.array_equal(ds.pixel_array, pixels_in)


def test_peer_accepting_jpeg_ls_gets_it_compressed(tmp_path: Path, free_port: int) -> None:
    path, pixels_in = compressed_file(tmp_path, "jpeg-ls-lossless", "gray16")
    with Peer(free_port, [JPEGLSLossless, *UNCOMPRESSED]) as peer:
        (outcome,) = destination(free_port).send([path])
    assert outcome.ok and outcome.detail == "stored"
    ((ds, context),) = peer.received
    assert context == JPEGLSLossless and ds.file_meta.TransferSyntaxUID == JPEGLSLossless
    assert ds.PixelData == pydicom.dcmread(path).PixelData  # sent as stored
    assert np.array_equal(ds.pixel_array, pixels_in)


@contextmanager
def dcmtk_peer(folder: Path, port: int, *args: str) -> Iterator[None]:
    from test_dispatch import storescp  # the one storescp harness (waits for the port, kills the process group)

    with storescp(folder, port, *args):
        yield


@pytest.mark.slow
@pytest.mark.parametrize(("args", "stored_as"), [((), ExplicitVRLittleEndian), (("+xt",), JPEGLSLossless)])
def test_storescp_gets_outputs_as_it_accepts_them(tmp_path: Path, free_port: int, args: tuple[str, ...],
                                                  stored_as: UID) -> None:
    """storescp by default accepts uncompressed only (the node decompresses); with +xt it takes JPEG-LS."""
    from test_dispatch import wait_for_files

    path, pixels_in = compressed_file(tmp_path, "jpeg-ls-lossless", "rgb")
    out = tmp_path / "pacs"
    with dcmtk_peer(out, free_port, *args):
        (outcome,) = destination(free_port).send([path])
        wait_for_files(out, 1)
    assert outcome.ok, outcome.detail
    (received,) = [pydicom.dcmread(p) for p in out.iterdir()]
    assert received.file_meta.TransferSyntaxUID == stored_as
    assert received.SOPInstanceUID == pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
    assert np.array_equal(received.pixel_array, pixels_in)


# --------------------------------------------------------------------------- the criterion, real images


@pytest.fixture(scope="module")
def default_config(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The embedded default (models, rules, derive: the default transfer syntax) plus CLAHE as a rule-less model."""
    root = tmp_path_factory.mktemp("site")
    data = yaml.safe_load(DEFAULT_CONFIG.read_text())
    data["storage"] = {"root": str(root / "var")}
    data["destinations"] = {"out": {"folder": str(root / "out")}}
    data["rules"] = [{**r, "destinations": ["out"]} for r in data["rules"]]
    data["models"]["clahe"] = {"kind": "clahe"}
    return parse_config(data, root)


@pytest.mark.parametrize(("folder", "model"), [
    ("fundus/hq", "clahe"),
    pytest.param("fundus/hq", None, marks=pytest.mark.slow),  # None: the default rules (Modality OP: fieldnorm-fundus)
    pytest.param("fundus/hq", "hqgnet-color", marks=pytest.mark.slow),
    pytest.param("fundus/lq", "hqgnet-color", marks=pytest.mark.slow),
])
def test_fundus_outputs_are_at_most_1_5x_a_lossless_encoding_of_the_input(
        tmp_path: Path, shared_data: Path, default_config: Any, folder: str, model: str | None) -> None:
    """Issue criterion: 8-bit RGB fundus outputs at most 1.5x a lossless encoding (same syntax) of the input pixels.

    Not covered: CLAHE (the default route for OP) on the dark low-quality frames of fundus/lq amplifies their
    noise, and those outputs are about 1.5x (1.33-1.77x over the 63 frames) whatever the lossless syntax.
    """
    from PIL import Image

    from dicomnode.assemble import series_from_files
    from dicomnode.route import routing_keywords

    paths = sorted((shared_data / "train" / folder).glob("*.png"))[:2]
    if not paths:
        pytest.skip(f"no fundus images in {shared_data / 'train' / folder}")
    syntax = default_config.derive.transfer_syntax
    assert syntax == "jpeg-ls-lossless"
    sources, reference = [], 0
    for i, png in enumerate(paths):
        rgb = np.asarray(Image.open(png).convert("RGB"))
        src = image_dataset(rgb, study="fundus", series=folder, index=i, modality="OP", description="Fundus photography")
        sources.append(write(src, tmp_path / "in" / f"{i}.dcm"))
        reference += encoded_bytes(encode(pydicom.dcmread(sources[-1]), syntax))
    (series,), _ = series_from_files(sources, routing_keywords(default_config))
    models = ResidentModels.load(default_config, only=[model] if model else None)
    if models.failures:
        pytest.skip(f"models unavailable: {models.failures}")
    outcome = Pipeline(default_config, models).run(series, tmp_path / "out", model=model)
    assert not outcome.failed and len(outcome.outputs) == len(paths), outcome.failed
    output = sum(p.stat().st_size for p in outcome.outputs)  # held back by the quality gate or not
    assert all(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID == JPEGLSLossless
               for p in outcome.outputs)
    assert output <= 1.5 * reference, f"outputs {output} bytes, lossless input {reference} bytes ({output / reference:.2f}x)"


def test_an_image_the_encoder_refuses_is_kept_uncompressed_not_lost() -> None:
    """pyjpegls cannot encode a 4 x 4 frame: the output stays lossless, uncompressed, with its pixels."""
    from factories import image_dataset

    pixels = np.arange(16, dtype=np.uint8).reshape(4, 4)
    ds = encode(image_dataset(pixels), "jpeg-ls-lossless")
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(ds.pixel_array, pixels)
