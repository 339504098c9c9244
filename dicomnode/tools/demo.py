"""`dicomnode demo`: the whole node, end to end, on images that ship inside the installed packages.

It starts the node in this process (temporary storage, a free port, the models and rules of the
embedded default configuration, or of ``--config``), builds sample studies at run time (scikit-image's retina
photograph as OP, pydicom's bundled CT and MR files, a synthetic corneal confocal image drawn with
numpy), sends them over real DICOM (pynetdicom C-STORE), waits for the enhanced Secondary Capture
series to arrive in the results folder, and writes an HTML page with before/after images and
metrics. Nothing is read from outside the installed packages, so it works on a fresh install.
"""

from __future__ import annotations

import html
import logging
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import yaml
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from pynetdicom import AE
from scipy.ndimage import gaussian_filter, zoom
from skimage import data as skdata
from skimage.io import imsave
from skimage.transform import resize
from tqdm import tqdm

from dicomnode.config import DEFAULT_CONFIG, NodeConfig, parse_config
from dicomnode.imaging import iter_frames, pixel_info
from dicomnode.ledger import JobState
from dicomnode.server import Server, ServerOptions
from models import metrics as M

log = logging.getLogger(__name__)

DEMO_AE = "DEMO_SCU"
PATIENT = {"PatientName": "DEMO^SAMPLE", "PatientID": "DEMO0001", "PatientBirthDate": "", "PatientSex": "O"}


# --------------------------------------------------------------------------------------------
# sample studies


@dataclass
class Sample:
    """One sample series to send: its files and what the page says about it."""

    key: str
    title: str
    modality: str
    expect_enhanced: bool
    files: list[Path] = field(default_factory=list)
    series_uid: str = ""


def synthetic_ccm(size: int = 384, seed: int = 0) -> np.ndarray:
    """A corneal-confocal-like image: bright curved nerves on a dark field, vignetting, speckle noise.

    Sub-basal nerves in CCM run roughly in parallel, gently curving, with thinner branches; the
    HRT-III's illumination falls off towards the corners (what vignetting correction removes).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    img = np.zeros((size, size), np.float32)
    angle = rng.uniform(-0.5, 0.5)
    for k in range(7):
        width = rng.uniform(1.2, 2.6) if k < 5 else rng.uniform(0.7, 1.1)
        offset = rng.uniform(-0.45, 0.45) * size
        amp, freq, phase = rng.uniform(8, 25), rng.uniform(0.6, 1.6) * 2 * np.pi / size, rng.uniform(0, 2 * np.pi)
        # distance to the curve x' = offset + amp*sin(freq*y' + phase) in a rotated frame
        u = (xx - size / 2) * np.cos(angle) - (yy - size / 2) * np.sin(angle)
        v = (xx - size / 2) * np.sin(angle) + (yy - size / 2) * np.cos(angle)
        d = np.abs(u - offset - amp * np.sin(freq * v + phase))
        img += rng.uniform(0.5, 0.9) * np.exp(-(d**2) / (2 * width**2))
    cells = rng.random((size // 8, size // 8)).astype(np.float32)
    img += 0.12 * gaussian_filter(zoom(cells, 8, order=1), 2.0)  # epithelial texture
    r2 = ((xx - size / 2) ** 2 + (yy - size / 2) ** 2) / (size / 2) ** 2
    img *= np.exp(-0.9 * r2)  # vignetting
    img += rng.normal(0, 0.04, img.shape).astype(np.float32)
    img = gaussian_filter(img, 0.6)
    return np.clip(img / max(float(img.max()), 1e-6) * 0.85, 0, 1).astype(np.float32)


def degraded_retina(size: int = 512) -> np.ndarray:
    """scikit-image's retina photograph, downscaled, darkened and unevenly lit (a poor acquisition)."""
    img = resize(skdata.retina().astype(np.float32) / 255.0, (size, size, 3), anti_aliasing=True).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    light = 0.2 + 0.8 * np.exp(-(((xx - 0.3) ** 2 + (yy - 0.3) ** 2) / 0.08))  # uneven illumination
    haze = 0.06
    out = img * light[..., None] * 0.8 + haze
    return np.clip(out, 0, 1).astype(np.float32)


def _base_dataset(study_uid: str, series_uid: str, modality: str, number: int, description: str) -> Dataset:
    ds = Dataset()
    for k, v in PATIENT.items():
        setattr(ds, k, v)
    now = datetime.now()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "DEMO", "", ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, number, 1
    ds.SeriesDescription = description
    ds.ConversionType = "WSD"
    ds.Manufacturer = "dicomnode demo"
    return ds


def _with_pixels(ds: Dataset, img: np.ndarray) -> Dataset:
    arr = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    ds.Rows, ds.Columns = arr.shape[:2]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if arr.ndim == 3:
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    else:
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = arr.tobytes()
    return ds


def write_sample(path: Path, img: np.ndarray, *, study_uid: str, series_uid: str, modality: str, series_number: int,
                 description: str, instance: int = 1, **attrs: Any) -> Path:
    """One sample image (float [0, 1], gray or RGB) as a Secondary Capture file of the demo patient."""
    ds = _base_dataset(study_uid, series_uid, modality, series_number, description)
    ds.InstanceNumber = instance
    for key, value in attrs.items():
        setattr(ds, key, value)
    return _write(_with_pixels(ds, img), path)


def _write(ds: Dataset, path: Path) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def build_samples(folder: Path) -> list[Sample]:
    """Write the sample series into ``folder``; one study, one series per sample."""
    study = generate_uid()
    samples: list[Sample] = []

    op = Sample("fundus", "Fundus photograph (scikit-image retina, unevenly lit)", "OP", True)
    op.series_uid = generate_uid()
    op.files.append(write_sample(folder / "op" / "retina.dcm", degraded_retina(), study_uid=study, series_uid=op.series_uid,
                                 modality="OP", series_number=1, description="Colour fundus photograph"))
    samples.append(op)

    ccm = Sample("ccm", "Corneal confocal microscopy (synthetic, numpy)", "OP", True)
    ccm.series_uid = generate_uid()
    for i in range(2):
        ccm.files.append(write_sample(folder / "ccm" / f"ccm{i}.dcm", synthetic_ccm(seed=i), study_uid=study,
                                      series_uid=ccm.series_uid, modality="OP", series_number=2, instance=i + 1,
                                      description="Corneal confocal microscopy (CCM)", ManufacturerModelName="HRT3 RCM (synthetic)"))
    samples.append(ccm)

    for key, name, title in (("ct", "CT_small.dcm", "CT (pydicom test file)"), ("mr", "MR_small.dcm", "MR (pydicom test file)")):
        src = get_testdata_file(name, download=False)
        if src is None:
            log.warning("pydicom test file %s is not installed; skipping that sample", name)
            continue
        ds = pydicom.dcmread(src)
        s = Sample(key, title, str(ds.Modality), False)
        s.series_uid = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, s.series_uid, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        for k, v in PATIENT.items():
            setattr(ds, k, v)
        s.files.append(_write(ds, folder / key / name))
        samples.append(s)
    return samples


# --------------------------------------------------------------------------------------------
# the node, the sender, the page

def demo_config(config_path: Path | None, storage: Path, results: Path, port: int) -> NodeConfig:
    """The models and rules of ``config_path`` (default: the embedded default) with demo plumbing:
    loopback, ``port``, temporary storage, one results folder. ``storage`` and ``results`` are absolute."""
    source = config_path or DEFAULT_CONFIG
    data = yaml.safe_load(Path(source).read_text()) or {}
    base = Path(config_path).resolve().parent if config_path else Path.cwd()
    rules = [{**rule, "destinations": ["results"]} for rule in data.get("rules") or []]
    node = dict(data.get("node") or {})
    node.update({"ae_title": node.get("ae_title", "DICOMNODE"), "host": "127.0.0.1", "port": port,
                 "series_quiet_seconds": 1.0, "allowed_calling_aets": [], "tls": None})
    demo = {
        "node": node,
        "storage": {"root": str(Path(storage).resolve())},
        "destinations": {"results": {"folder": str(Path(results).resolve())}},
        "models": data.get("models") or {},
        "rules": rules,
        "unmatched": {"action": "ignore", "destinations": []},
        "derive": data.get("derive") or {},
        "logging": {"level": "WARNING", "file": None},
    }
    return parse_config(demo, base)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def send(files: Sequence[Path], host: str, port: int, called_ae: str, calling_ae: str = DEMO_AE) -> list[int]:
    """C-STORE ``files`` over one association; returns the status of each (-1: no response)."""
    datasets = [pydicom.dcmread(f) for f in files]
    ae = AE(ae_title=calling_ae)
    for sop in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop, [ExplicitVRLittleEndian, "1.2.840.10008.1.2"])
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        raise RuntimeError(f"the node at {host}:{port} refused or did not answer the association")
    statuses = []
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            statuses.append(int(status.Status) if status else -1)
    finally:
        assoc.release()
    return statuses


@dataclass
class DemoItem:
    """One input image and what became of it."""

    sample: Sample
    source: Path
    output: Path | None = None
    before_png: str = ""
    after_png: str = ""
    metrics_before: dict[str, float] = field(default_factory=dict)
    metrics_after: dict[str, float] = field(default_factory=dict)
    note: str = ""
    provenance: str = ""


@dataclass
class DemoResult:
    page: Path
    items: list[DemoItem]
    seconds: float
    jobs: dict[str, str]

    @property
    def enhanced(self) -> int:
        return sum(1 for i in self.items if i.output is not None)


def _frame(path: Path) -> np.ndarray:
    """The first frame as the node sees it (the same decoding as enhancement)."""
    ds = pydicom.dcmread(path)
    frame, _voi = next(iter_frames(ds, pixel_info(ds)))
    return frame


def _png(img: np.ndarray, path: Path, max_side: int = 512) -> str:
    h, w = img.shape[:2]
    scale = max_side / max(h, w)
    if scale < 1:
        img = resize(img, (round(h * scale), round(w * scale)) + img.shape[2:], anti_aliasing=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    imsave(path, (np.clip(img, 0, 1) * 255).round().astype(np.uint8), check_contrast=False)
    return path.name


def image_metrics(img: np.ndarray, reference: np.ndarray | None = None) -> dict[str, float]:
    """No-reference quality and, against ``reference`` (the input), structure kept."""
    measures: dict[str, Callable[[], float]] = {
        "NIQE ↓": lambda: M.niqe(img), "AG ↑": lambda: M.average_gradient(img), "EN ↑": lambda: M.entropy(img),
        "illumination ↓": lambda: M.illumination_uniformity(img),
    }
    if reference is not None and reference.shape == img.shape:
        measures["LaSSIM(in,out) ↑"] = lambda: M.lassim(reference, img)
    out = {}
    for name, fn in measures.items():
        try:
            out[name] = float(fn())
        except ValueError as exc:  # e.g. NIQE needs two 96 px blocks: a 64 px MR has none
            log.info("metric %s not computed: %s", name, exc)
    return out


def _wait(server: Any, n_series: int, expected_outputs: int, results: Path, timeout: float,
          progress: Callable[[int], None]) -> dict[str, str]:
    """Until every sent series has a finished job and every expected output was delivered."""
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline:
        jobs = server.spool.ledger.jobs()
        states = {j.series_uid: j.state for j in jobs}
        outputs = len(list(results.glob("*.dcm"))) if results.is_dir() else 0
        if outputs > seen:
            progress(outputs - seen)
            seen = outputs
        finished = [s for s in states.values() if s in (JobState.DONE, JobState.FAILED, JobState.GATED)]
        if len(finished) >= n_series and (outputs >= expected_outputs or any(s != JobState.DONE for s in finished)):
            return states
        time.sleep(0.25)
    raise TimeoutError(f"the node did not finish within {timeout:.0f} s (jobs: {states}, outputs {outputs}/{expected_outputs})")


def run_demo(out: Path, *, config_path: Path | None = None, timeout: float = 600.0, show_progress: bool = True,
             samples: Sequence[Sample] | None = None) -> DemoResult:
    """Start the node, send the samples, wait for the enhanced series, write ``out/index.html``.

    ``samples`` replaces the built-in sample studies (each Sample one series of existing files).
    """
    t0 = time.perf_counter()
    out = Path(out).resolve()  # relative to where the command runs, never to the config's folder
    out.mkdir(parents=True, exist_ok=True)
    results = out / "dicom"
    if results.exists():
        shutil.rmtree(results)
    work = Path(tempfile.mkdtemp(prefix="dicomnode-demo-"))
    bar = tqdm(total=4, desc="demo", unit="step", disable=not show_progress)
    try:
        bar.set_postfix_str("building sample studies")
        samples = list(samples) if samples is not None else build_samples(work / "samples")
        bar.update(1)
        bar.set_postfix_str("starting the node (loading models)")
        config = demo_config(config_path, work / "var", results, free_port())
        server = Server(config, options=ServerOptions(drain_seconds=10.0, dispatch_poll_seconds=0.2))
        server.start()
        failed_models = dict(server.models.failures) if server.models else {}
        bar.update(1)
        try:
            bar.set_postfix_str("sending over DICOM C-STORE")
            for s in samples:
                statuses = send(s.files, "127.0.0.1", server.port, config.node.ae_title)
                bad = [f"{st:#06x}" for st in statuses if st != 0]
                if bad:
                    raise RuntimeError(f"the node refused {s.key} instances: statuses {', '.join(bad)}")
            bar.update(1)
            expected = sum(len(s.files) for s in samples if s.expect_enhanced)
            bar.set_postfix_str(f"waiting for {expected} enhanced images")
            states = _wait(server, len(samples), expected, results, timeout, lambda n: None)
        finally:
            server.stop()
        items = _collect(samples, results, out, states)
        page = write_page(out, items, failed_models, states, time.perf_counter() - t0)
        bar.update(1)
    finally:
        bar.close()
        shutil.rmtree(work, ignore_errors=True)
    by_series = {s.series_uid: s.key for s in samples}
    return DemoResult(page, items, time.perf_counter() - t0, {by_series.get(k, k): v for k, v in states.items()})


def _collect(samples: Sequence[Sample], results: Path, out: Path, states: dict[str, str] | None = None) -> list[DemoItem]:
    outputs: dict[str, Path] = {}
    for p in sorted(results.glob("*.dcm")) if results.is_dir() else []:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        for ref in ds.get("SourceImageSequence", []):
            outputs[str(ref.ReferencedSOPInstanceUID)] = p
    items = []
    for s in samples:
        for f in s.files:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            item = DemoItem(s, f)
            before = _frame(f)
            item.before_png = _png(before, out / "img" / f"{s.key}_{f.stem}_before.png")
            item.metrics_before = image_metrics(before)
            produced = outputs.get(str(ds.SOPInstanceUID))
            if produced is None:
                state = (states or {}).get(s.series_uid)
                if not s.expect_enhanced:
                    item.note = "no rule of the configuration matches this series: left alone"
                elif state == JobState.GATED:
                    item.note = "enhanced, but held back by the quality gate (the node log and `dicomnode jobs show` say why)"
                else:
                    item.note = f"expected an enhanced image but none arrived (job {state or 'not found'}; see the node log)"
            else:
                item.output = produced
                after = _frame(produced)
                item.after_png = _png(after, out / "img" / f"{s.key}_{f.stem}_after.png")
                ref = before if before.shape == after.shape else None
                item.metrics_after = image_metrics(after, ref)
                o = pydicom.dcmread(produced, stop_before_pixels=True)
                item.provenance = f"{o.get('SeriesDescription', '')} | {o.get('DerivationDescription', '')}"
            items.append(item)
    return items


def write_page(out: Path, items: Sequence[DemoItem], failed_models: dict[str, str], states: dict[str, str], seconds: float) -> Path:
    esc = html.escape
    rows = []
    for it in items:
        keys = list(dict.fromkeys([*it.metrics_before, *it.metrics_after]))
        fmt = lambda d, k: f"{d[k]:.3f}" if k in d else "–"  # noqa: E731
        mt = "".join(f"<tr><td>{esc(k)}</td><td>{fmt(it.metrics_before, k)}</td><td>{fmt(it.metrics_after, k)}</td></tr>" for k in keys)
        after = f'<img src="img/{esc(it.after_png)}" alt="enhanced">' if it.after_png else f"<p class=note>{esc(it.note)}</p>"
        rows.append(
            f"<section><h2>{esc(it.sample.title)} <small>({esc(it.sample.modality)}, {esc(it.source.name)})</small></h2>"
            f'<div class=pair><figure><img src="img/{esc(it.before_png)}" alt="input"><figcaption>received</figcaption></figure>'
            f"<figure>{after}<figcaption>{'enhanced: ' + esc(it.provenance) if it.output else 'not enhanced'}</figcaption></figure></div>"
            f"<table><tr><th>metric</th><th>input</th><th>output</th></tr>{mt}</table></section>"
        )
    problems = "".join(f"<li>{esc(k)}: {esc(v)}</li>" for k, v in failed_models.items())
    page = out / "index.html"
    page.write_text(
        "<!doctype html><meta charset=utf-8><title>dicomnode demo</title><style>"
        "body{font-family:sans-serif;max-width:1100px;margin:auto}img{max-width:512px;width:100%}"
        ".pair{display:flex;gap:1em}figure{margin:0;flex:1}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px}.note{color:#a40}</style>"
        f"<h1>dicomnode demo</h1><p>{len(items)} images in {len({i.sample.key for i in items})} series sent over DICOM "
        f"C-STORE to a node started for this page; {sum(1 for i in items if i.output)} came back enhanced as Secondary "
        f"Capture images, in {seconds:.1f} s. Metrics: NIQE (lower is better), average gradient, entropy, illumination "
        "uniformity (lower is more even), LaSSIM between input and output (1 = structure kept). All images are "
        "built from files inside the installed packages; outputs are research results, not for diagnosis.</p>"
        + (f"<p class=note>Models that failed to load:</p><ul>{problems}</ul>" if problems else "")
        + "".join(rows)
    )
    return page
