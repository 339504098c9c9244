"""Evaluation runner behind `dicomnode evaluate`: enhancers x images x metrics -> tables and a montage.

One loop serves three situations. With only low-quality images it reports no-reference quality
(AG, EN, NIQE, BRISQUE, PIQE, illumination non-uniformity) and structure preservation against the
input (LaSSIM, the LaMEGAN paper's reason for it). With clean references (same file stems) it adds
PSNR, SSIM and LaSSIM against the truth; with masks, StillGAN's SNR_r on the mask's centre lines and
downstream-segmentation scores. The built-in benchmarks make the references themselves: clean CCM
images or fundus crops, damaged with ``models.degrade`` under a fixed seed, so anyone can reproduce
the paired numbers without private data.

Every method runs on the same images (the longer side scaled to ``size`` so NR-IQA costs stay
bounded); the input is reported as its own row, which is the baseline a method has to beat, and with
references the clean reference is a row too, the target. A metric with a direction (PSNR up, NIQE
down) marks the best method by it; a metric without one (AG, EN, illumination: more is not better)
marks the method closest to the reference, or nothing when there is no reference.

With ``fov`` (fundus, endoscopy) every metric is computed inside the field of view (found from the
reference, or from the input when there is none), the no-reference ones on the largest centred
rectangle inside it, and the border-damage column says how much a method changed the black surround.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models import metrics as M
from models.degrade import PRESETS, degrade, plan
from models.metrics._common import LUMA_709
from models.registry import MODELS, Enhancer, build_model, load_checkpoint

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
INPUT_ROW = "input"
BENCHMARKS = ("ccm", "fundus")


def shared_data_root() -> Path:
    """The public sample images: $DICOMNODE_SHARED_DATA, else ../shared/data beside the repository."""
    env = os.environ.get("DICOMNODE_SHARED_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


# ------------------------------------------------------------------------------------- metrics


@dataclass
class Sample:
    """One image as the metrics see it: the method's output and what it may be compared with.

    ``view`` is the field of view (True inside; the reference's where there is one); None means the whole
    frame. ``surround_of_input`` is the input's own field: the border figure is about what the method did
    where *its input* was black (a degradation may spread content past the clean frame's rim).
    """

    output: np.ndarray
    input: np.ndarray
    reference: np.ndarray | None = None
    mask: np.ndarray | None = None
    lassim_level: int = 3
    view: np.ndarray | None = None
    surround_of_input: np.ndarray | None = None
    _cache: dict = field(default_factory=dict)

    def crop(self) -> np.ndarray:
        """The output on the largest centred rectangle inside the field of view (for no-reference metrics)."""
        if self.view is None:
            return self.output
        if "crop" not in self._cache:
            self._cache["crop"] = inside_rectangle(self.view)
        top, bottom, left, right = self._cache["crop"]
        return self.output[top:bottom, left:right]

    def centerlines(self) -> np.ndarray:
        if "centerlines" not in self._cache:
            from skimage.morphology import skeletonize

            self._cache["centerlines"] = skeletonize(self.mask)
        return self._cache["centerlines"]

    def segmentation(self) -> tuple[np.ndarray, np.ndarray]:
        """A fixed, training-free downstream segmenter: Sato ridge filter + Otsu threshold.

        Nerves and vessels are bright or dark curvilinear structures; how well a fixed ridge
        detector finds them tells whether an enhancer made them easier to segment, without
        tying the benchmark to one trained network.
        """
        if "seg" not in self._cache:
            from skimage.filters import sato, threshold_otsu

            if self.mask is None or not self.mask.any() or self.mask.all():
                raise ValueError("segmentation scores need a mask with both structure and background")

            gray = self.output if self.output.ndim == 2 else self.output @ LUMA_709
            bright = sato(gray, sigmas=(1, 2, 3), black_ridges=False)
            dark = sato(gray, sigmas=(1, 2, 3), black_ridges=True)
            # Choose the polarity the mask's structures have in the input.
            inp = self.input if self.input.ndim == 2 else self.input @ LUMA_709
            inside, outside = inp[self.mask].mean(), inp[~self.mask].mean()
            score = bright if inside >= outside else dark
            thr = threshold_otsu(score) if score.max() > score.min() else np.inf
            self._cache["seg"] = (score, score > thr)
        return self._cache["seg"]


def inside_rectangle(field: np.ndarray, coverage: float = 0.995) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the largest rectangle, centred on the field's bounding box, that is
    (nearly) all inside the field: a disc's inscribed rectangle, an octagon's inner box."""
    rows, cols = np.nonzero(field)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    for _ in range(100):
        if field[top:bottom, left:right].mean() >= coverage or bottom - top < 8 or right - left < 8:
            break
        dh, dw = max(1, (bottom - top) // 50), max(1, (right - left) // 50)
        top, bottom, left, right = top + dh, bottom - dh, left + dw, right - dw
    return int(top), int(bottom), int(left), int(right)


@dataclass(frozen=True)
class Metric:
    name: str  # column key
    label: str  # table header
    direction: str  # "up" (higher is better), "down" (lower is better), "ref" (closest to the reference)
    needs: str  # "", "reference" or "mask"
    fn: Callable[[Sample], float]
    help: str

    @property
    def higher_is_better(self) -> bool:
        return self.direction == "up"

    @property
    def arrow(self) -> str:
        return {"up": "↑", "down": "↓", "ref": "≈"}[self.direction]


def _snr(r: int) -> Callable[[Sample], float]:
    return lambda s: M.snr(s.output, s.centerlines(), r)


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("psnr", "PSNR", "up", "reference", lambda s: M.psnr(s.output, s.reference, s.view), "dB against the clean reference"),
        Metric("ssim", "SSIM", "up", "reference", lambda s: M.ssim(s.output, s.reference, s.view), "against the clean reference"),
        Metric("lassim", "LaSSIM", "up", "reference", lambda s: M.lassim(s.output, s.reference, s.lassim_level, s.view),
               "level-3 Laplacian SSIM against the reference"),
        Metric("de", "ΔE00", "down", "reference", lambda s: M.delta_e(s.output, s.reference, s.view),
               "mean CIEDE2000 colour difference to the reference"),
        Metric("lassim_in", "LaSSIM(in)", "up", "", lambda s: M.lassim(s.output, s.input, s.lassim_level, s.view),
               "structure kept from the input (1 = identical)"),
        Metric("chroma", "Chroma", "down", "", lambda s: M.chroma_shift(s.output, s.input, s.view),
               "colour shift from the input, lightness removed (CIEDE2000)"),
        Metric("border", "Border", "down", "",
               lambda s: M.border_damage(s.output, s.input, s.view if s.surround_of_input is None else s.surround_of_input),
               "mean change (0-255) of the input's black surround"),
        Metric("ag", "AG", "ref", "", lambda s: M.average_gradient(s.crop()), "average gradient, 8-bit scale (noise raises it too)"),
        Metric("en", "EN", "ref", "", lambda s: M.entropy(s.crop()), "entropy of the 8-bit histogram, bits"),
        Metric("niqe", "NIQE", "down", "", lambda s: M.niqe(s.crop()), "naturalness (pristine model)"),
        Metric("brisque", "BRISQUE", "down", "", lambda s: M.brisque(s.crop()), "BRISQUE, original LIVE model"),
        Metric("piqe", "PIQE", "down", "", lambda s: M.piqe(s.crop()), "perception-based, 0-100"),
        Metric("illum", "Illum", "ref", "", lambda s: M.illumination_uniformity(s.crop()), "illumination non-uniformity (StillGAN Eq. 5)"),
        *(Metric(f"snr{r}", f"SNR{r}", "up", "mask", _snr(r), f"StillGAN SNR, background outside radius {r}") for r in M.SNR_RADII),
        Metric("auc", "AUC", "up", "mask", lambda s: M.auc(s.segmentation()[0], s.mask), "ridge-filter ROC AUC against the mask"),
        Metric("dice", "Dice", "up", "mask", lambda s: M.dice(s.segmentation()[1], s.mask), "ridge filter + Otsu vs mask"),
        Metric("sens", "Sens", "up", "mask", lambda s: M.sensitivity(s.segmentation()[1], s.mask), "ridge filter + Otsu vs mask"),
        Metric("gmean", "G-mean", "up", "mask", lambda s: M.g_mean(s.segmentation()[1], s.mask), "ridge filter + Otsu vs mask"),
    )
}


def select_metrics(requested: Sequence[str] | None, *, have_reference: bool, have_masks: bool) -> list[Metric]:
    """The metrics to compute: ``requested`` (checked) or every one the inputs allow."""
    available = {"": True, "reference": have_reference, "mask": have_masks}
    if not requested:
        return [m for m in METRICS.values() if available[m.needs]]
    unknown = [n for n in requested if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(METRICS)}")
    chosen = [METRICS[n] for n in dict.fromkeys(requested)]
    for m in chosen:
        if not available[m.needs]:
            flag = "--reference" if m.needs == "reference" else "--masks"
            raise ValueError(f"metric {m.name} needs {flag} (a folder with one file per input image, same names)")
    return chosen


# ---------------------------------------------------------------------------------- image I/O


def _load(path: Path, size: int | None) -> np.ndarray:
    """float32 [0, 1] image, gray when all channels agree, longer side scaled down to ``size``."""
    from skimage.transform import resize

    from models.io import load_image

    img = load_image(path, 3)
    if np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 0], img[..., 2]):
        img = img[..., 0]
    h, w = img.shape[:2]
    if size and max(h, w) > size:
        scale = size / max(h, w)
        shape = (max(1, round(h * scale)), max(1, round(w * scale)))
        img = resize(img, shape + img.shape[2:], order=1, anti_aliasing=True, preserve_range=True)
    return np.clip(img, 0, 1).astype(np.float32)


def _match_to(img: np.ndarray, like: np.ndarray, *, order: int = 1) -> np.ndarray:
    """``img`` with the shape (size and channels) of ``like``."""
    from skimage.transform import resize

    if img.ndim == 3 and like.ndim == 2:
        img = img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    elif img.ndim == 2 and like.ndim == 3:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.shape[:2] != like.shape[:2]:
        img = resize(img, like.shape[:2] + img.shape[2:], order=order, anti_aliasing=order > 0, preserve_range=True)
    return img.astype(np.float32)


def _by_stem(folder: Path, stems: Sequence[str], what: str) -> dict[str, Path]:
    from models.io import list_images

    files = {p.stem: p for p in list_images(folder)}
    missing = [s for s in stems if s not in files]
    if missing:
        raise ValueError(f"no {what} in {folder} for {len(missing)} input image(s), e.g. {missing[0]!r} (names must match)")
    return files


# ------------------------------------------------------------------------------------ methods


def method_label(spec: str, enhancer: Enhancer) -> str:
    if spec in MODELS:
        return spec
    return Path(spec).stem


def load_method(spec: str, device: str = "auto") -> Enhancer:
    """A registry kind (``clahe``) or a weights file with its model card (``path/to/x.pt``)."""
    path = Path(spec)
    if spec in MODELS and not path.exists():
        return build_model(spec, device=device)
    if path.suffix == ".pt" or path.exists():
        return load_checkpoint(path, device=device)
    raise ValueError(f"method {spec!r} is neither a model kind ({', '.join(MODELS)}) nor an existing weights file")


def guidance_vector(enhancer: Enhancer, folder: Path | None, size: int | None, name: str) -> np.ndarray | None:
    """The mean HQ guidance vector for guided models (HQG-Net), from a folder of HQ images."""
    if not enhancer.uses_guidance:
        return None
    if folder is None:
        raise ValueError(f"method {name} is guided: pass --guidance DIR with high-quality images of the modality")
    from models.io import list_images

    images = [_load(p, size) for p in list_images(folder)]
    return np.asarray(enhancer.extract_guidance(images)).mean(axis=0)


# ------------------------------------------------------------------------------------- runner


@dataclass
class EvalConfig:
    input: Path
    out: Path
    methods: Sequence[str] = ("clahe", "histeq", "retinex")
    reference: Path | None = None
    masks: Path | None = None
    guidance: Path | None = None
    metrics: Sequence[str] | None = None
    size: int | None = 384  # longer side; None keeps the original size
    device: str = "auto"
    montage_images: int = 4
    lassim_level: int = 3
    title: str = ""
    notes: Sequence[str] = ()
    progress: bool = True
    fov: bool = False  # fundus/endoscopy: metrics inside the field of view, border damage outside it
    enhancers: Mapping[str, Enhancer] | None = None  # already built (and guidance-bound) methods, beside ``methods``
    crop: int = 160  # side of the full-resolution crop each montage panel shows


REFERENCE_ROW = "reference"


@dataclass
class Summary:
    """Per method (input first, then the reference when there is one) and metric: mean, std, image count."""

    methods: list[str]
    metrics: list[Metric]
    mean: dict[str, dict[str, float]]
    std: dict[str, dict[str, float]]
    count: dict[str, dict[str, int]]
    seconds_per_image: dict[str, float]

    def cell(self, method: str, metric: str, digits: int = 3) -> str:
        mu, sd = self.mean[method][metric], self.std[method][metric]
        if math.isnan(mu):
            return "n/a"
        if math.isinf(mu):
            return "inf"
        return f"{mu:.{digits}f} ± {sd:.{digits}f}"

    def best(self, metric: Metric) -> str | None:
        """The best method for ``metric``: by its direction, or closest to the reference row for metrics
        without one (None when there is no reference). Input and reference rows are never "best"."""
        rows = [(self.mean[m][metric.name], m) for m in self.methods
                if m not in (INPUT_ROW, REFERENCE_ROW) and not math.isnan(self.mean[m][metric.name])]
        if not rows:
            return None
        if metric.direction == "ref":
            if REFERENCE_ROW not in self.mean or math.isnan(self.mean[REFERENCE_ROW][metric.name]):
                return None
            target = self.mean[REFERENCE_ROW][metric.name]
            return min(rows, key=lambda r: abs(r[0] - target))[1]
        return (max if metric.direction == "up" else min)(rows)[1]

    def to_json(self) -> dict[str, object]:
        return {"methods": self.methods, "metrics": {m.name: {"label": m.label, "direction": m.direction, "help": m.help}
                                                     for m in self.metrics},
                "mean": self.mean, "std": self.std, "count": self.count, "seconds_per_image": self.seconds_per_image}


@dataclass
class EvalResult:
    summary: Summary
    per_image: list[dict[str, object]]
    files: dict[str, Path]


def _digits(metric: Metric) -> int:
    return 2 if metric.name in {"psnr", "ag", "en", "niqe", "brisque", "piqe", "de", "chroma", "border"} or metric.name.startswith("snr") else 3


def summarize(per_image: Sequence[Mapping[str, object]], methods: Sequence[str], metrics: Sequence[Metric], seconds: Mapping[str, float]) -> Summary:
    mean: dict[str, dict[str, float]] = {}
    std: dict[str, dict[str, float]] = {}
    count: dict[str, dict[str, int]] = {}
    for method in methods:
        rows = [r for r in per_image if r["method"] == method]
        mean[method], std[method], count[method] = {}, {}, {}
        for m in metrics:
            vals = np.array([float(r[m.name]) for r in rows], dtype=np.float64)  # type: ignore[arg-type]
            vals = vals[~np.isnan(vals)]
            count[method][m.name] = int(vals.size)
            if vals.size == 0:
                mean[method][m.name] = std[method][m.name] = float("nan")
            elif np.isinf(vals).any():  # e.g. PSNR of an untouched image
                mean[method][m.name], std[method][m.name] = float(vals.mean()), float("nan")
            else:
                mean[method][m.name], std[method][m.name] = float(vals.mean()), float(vals.std())
    return Summary(list(methods), list(metrics), mean, std, count, dict(seconds))


def format_table(summary: Summary) -> str:
    """Plain-text table for the terminal: one row per method, mean ± std per metric, the image count."""
    headers = ["method", "n"] + [f"{m.label}{m.arrow}" for m in summary.metrics] + ["s/img"]
    rows = [
        [method, str(max(summary.count[method].values(), default=0))]
        + [summary.cell(method, m.name, _digits(m)) for m in summary.metrics]
        + [f"{summary.seconds_per_image[method]:.3f}" if method in summary.seconds_per_image else "-"]
        for method in summary.methods
    ]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _write_csv(path: Path, summary: Summary) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["method", "n_images"] + [f"{m.name}_{s}" for m in summary.metrics for s in ("mean", "std")] + ["seconds_per_image"])
        for method in summary.methods:
            n = max(summary.count[method].values(), default=0)
            values = [f"{getattr(summary, s)[method][m.name]:.6g}" for m in summary.metrics for s in ("mean", "std")]
            secs = summary.seconds_per_image.get(method)
            writer.writerow([method, n, *values, f"{secs:.4f}" if secs is not None else ""])


def _write_per_image(path: Path, per_image: Sequence[Mapping[str, object]], metrics: Sequence[Metric]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["method", "image"] + [m.name for m in metrics])
        for r in per_image:
            writer.writerow([r["method"], r["image"]] + [f"{float(r[m.name]):.6g}" for m in metrics])  # type: ignore[arg-type]


def markdown_table(summary: Summary) -> str:
    """The summary as a Markdown table: mean ± std (n), best per metric in bold."""
    header = ["Method", "n"] + [f"{m.label} {m.arrow}" for m in summary.metrics] + ["s/img"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([" --- "] + [" ---: "] * (len(header) - 1)) + "|"]
    best = {m.name: summary.best(m) for m in summary.metrics}
    contenders = [m for m in summary.methods if m not in (INPUT_ROW, REFERENCE_ROW)]
    for method in summary.methods:
        cells = []
        for m in summary.metrics:
            c = summary.cell(method, m.name, _digits(m))
            cells.append(f"**{c}**" if best[m.name] == method and len(contenders) > 1 else c)
        secs = f"{summary.seconds_per_image[method]:.3f}" if method in summary.seconds_per_image else "-"
        n = max(summary.count[method].values(), default=0)
        lines.append(f"| {method} | {n} | " + " | ".join(cells) + f" | {secs} |")
    return "\n".join(lines)


def _write_markdown(path: Path, summary: Summary, cfg: EvalConfig, n_images: int) -> None:
    lines = [f"# {cfg.title or 'Enhancement evaluation'}", ""]
    lines.append(f"{n_images} image(s) from `{cfg.input}`" + (f", references from `{cfg.reference}`" if cfg.reference else "")
                 + (f", masks from `{cfg.masks}`" if cfg.masks else "") + f"; longer side scaled to {cfg.size or 'original'} px"
                 + ("; metrics inside the field of view" if cfg.fov else "") + ".")
    lines += [f"{note}" for note in cfg.notes]
    lines += ["", "Mean ± std over images (n = images with a value); ↑ higher is better, ↓ lower is better, ≈ closest to "
              "the reference is best; best method in bold (input and reference rows are the baseline and the target).", ""]
    lines.append(markdown_table(summary))
    lines += ["", "Metrics:", ""] + [f"- **{m.label}**: {m.help}" for m in summary.metrics] + [""]
    path.write_text("\n".join(lines))


def _crop_box(shape: tuple[int, ...], field: np.ndarray | None, side: int) -> tuple[int, int, int, int]:
    """A square crop of ``side`` px at full resolution, centred in the field of view."""
    h, w = shape[:2]
    side = min(side, h, w)
    if field is not None:
        top, bottom, left, right = inside_rectangle(field)
        cy, cx = (top + bottom) // 2, (left + right) // 2
    else:
        cy, cx = h // 2, w // 2
    y0 = int(np.clip(cy - side // 2, 0, h - side))
    x0 = int(np.clip(cx - side // 2, 0, w - side))
    return y0, y0 + side, x0, x0 + side


def _write_montage(path: Path, rows: Sequence[tuple[str, list[tuple[str, np.ndarray, str]]]]) -> None:
    """One row per image: full-resolution crops (no resampling) of each panel, with its scores."""
    import matplotlib  # noqa: PLC0415 - plotting only for the report

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    n_rows, n_cols = len(rows), max(len(r[1]) for r in rows)
    side = max(max(p[1].shape[0], p[1].shape[1]) for r in rows for p in r[1])
    dpi = 100
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(n_cols * (side / dpi + 0.2), n_rows * (side / dpi + 0.55)),
                             squeeze=False, dpi=dpi)
    for i, (name, panels) in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(panels):
                ax.axis("off")
                continue
            label, img, scores = panels[j]
            ax.imshow(np.clip(img, 0, 1), cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(label, fontsize=9)
            ax.set_xlabel(scores, fontsize=7)
            if j == 0:
                ax.set_ylabel(name, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def _panel_scores(sample: Sample) -> str:
    parts = []
    if sample.reference is not None:
        for label, fn in (("PSNR", lambda: M.psnr(sample.output, sample.reference, sample.view)),
                          ("SSIM", lambda: M.ssim(sample.output, sample.reference, sample.view)),
                          ("ΔE", lambda: M.delta_e(sample.output, sample.reference, sample.view))):
            try:
                v = fn()
                parts.append(f"{label} {v:.2f}" if math.isfinite(v) else f"{label} inf")
            except ValueError:
                pass
    else:
        try:
            parts.append(f"LaSSIM(in) {M.lassim(sample.output, sample.input, sample.lassim_level, sample.view):.2f}")
            parts.append(f"chroma {M.chroma_shift(sample.output, sample.input, sample.view):.2f}")
        except ValueError:
            pass
    return "  ".join(parts)


def evaluate(cfg: EvalConfig) -> EvalResult:
    """Run every method over every input image, score them, and write the report files."""
    from tqdm import tqdm  # noqa: PLC0415

    from models.fov import fov_mask  # noqa: PLC0415
    from models.io import list_images  # noqa: PLC0415

    paths = list_images(cfg.input)
    stems = [p.stem for p in paths]
    if len(set(stems)) != len(stems):
        raise ValueError(f"input folder {cfg.input} has several files with the same name stem; references cannot be matched")
    metrics = select_metrics(cfg.metrics, have_reference=cfg.reference is not None, have_masks=cfg.masks is not None)
    if not cfg.methods and not cfg.enhancers:
        raise ValueError("no methods to evaluate: pass --methods clahe,histeq,... or weights files")
    refs = _by_stem(cfg.reference, stems, "reference") if cfg.reference else {}
    masks = _by_stem(cfg.masks, stems, "mask") if cfg.masks else {}

    enhancers: dict[str, tuple[Enhancer, np.ndarray | None]] = {}
    for label, enhancer in (cfg.enhancers or {}).items():
        enhancers[label] = (enhancer, None)  # built and bound by the caller (guidance included)
    for spec in cfg.methods:
        enhancer = load_method(spec, cfg.device)
        label = method_label(spec, enhancer)
        while label in enhancers or label in (INPUT_ROW, REFERENCE_ROW):
            label += "'"
        enhancers[label] = (enhancer, guidance_vector(enhancer, cfg.guidance, cfg.size, label))
    methods = [INPUT_ROW, *([REFERENCE_ROW] if refs else []), *enhancers]
    log.info("evaluating %d method(s) on %d image(s) with %d metric(s)", len(enhancers), len(paths), len(metrics))

    cfg.out.mkdir(parents=True, exist_ok=True)
    per_image: list[dict[str, object]] = []
    seconds = {label: 0.0 for label in enhancers}
    montage: list[tuple[str, list[tuple[str, np.ndarray, str]]]] = []
    failures: dict[tuple[str, str], str] = {}
    bar = tqdm(total=len(paths) * len(methods), desc="evaluate", unit="img", disable=not cfg.progress)
    for idx, path in enumerate(paths):
        image = _load(path, cfg.size)
        ref = _match_to(_load(refs[path.stem], None), image) if refs else None
        mask = _match_to(_load(masks[path.stem], None), image[..., 0] if image.ndim == 3 else image, order=0) > 0.5 if masks else None
        input_field = fov_mask(image) if cfg.fov else None
        field_of_view = fov_mask(ref) if cfg.fov and ref is not None else input_field
        box = _crop_box(image.shape, field_of_view, cfg.crop)
        panels: list[tuple[str, np.ndarray, str]] = []
        for method in methods:
            bar.set_postfix_str(method)
            if method == INPUT_ROW:
                output = image
            elif method == REFERENCE_ROW:
                output = ref  # type: ignore[assignment]
            else:
                enhancer, guidance = enhancers[method]
                t0 = time.perf_counter()
                output = np.asarray(enhancer.enhance([image], guidance)[0], dtype=np.float32)
                seconds[method] += time.perf_counter() - t0
                if output.shape != image.shape:
                    raise RuntimeError(f"method {method} returned shape {output.shape} for an input of {image.shape}")
            sample = Sample(output=output, input=image, reference=ref, mask=mask, lassim_level=cfg.lassim_level, view=field_of_view,
                            surround_of_input=input_field)
            panels.append((method, output[box[0]:box[1], box[2]:box[3]], _panel_scores(sample) if idx < cfg.montage_images else ""))
            row: dict[str, object] = {"method": method, "image": path.name}
            for m in metrics:
                try:
                    row[m.name] = float(m.fn(sample))
                except ValueError as exc:  # e.g. an image too small for NIQE: record n/a, say why once
                    row[m.name] = float("nan")
                    if (m.name, method) not in failures:
                        failures[(m.name, method)] = str(exc)
                        log.warning("%s on %s (%s): %s; reported as n/a", m.name, path.name, method, exc)
            per_image.append(row)
            bar.update(1)
        if idx < cfg.montage_images:
            montage.append((path.stem, panels))
    bar.close()

    summary = summarize(per_image, methods, metrics, {k: v / len(paths) for k, v in seconds.items()})
    files = {
        "results.md": cfg.out / "results.md",
        "results.csv": cfg.out / "results.csv",
        "results.json": cfg.out / "results.json",
        "per_image.csv": cfg.out / "per_image.csv",
        "montage.png": cfg.out / "montage.png",
    }
    _write_markdown(files["results.md"], summary, cfg, len(paths))
    _write_csv(files["results.csv"], summary)
    files["results.json"].write_text(json.dumps({"title": cfg.title, "input": str(cfg.input), "fov": cfg.fov,
                                                 "summary": summary.to_json(), "per_image": per_image}, indent=1, default=str))
    _write_per_image(files["per_image.csv"], per_image, metrics)
    if montage:
        _write_montage(files["montage.png"], montage)
    return EvalResult(summary, per_image, files)


# --------------------------------------------------------------------------------- benchmarks


def _benchmark_clean_images(name: str, limit: int | None) -> list[tuple[str, np.ndarray]]:
    """The clean images of a built-in benchmark, as (name, float image) pairs at 384 px."""
    from skimage.transform import resize

    if name == "ccm":
        folder = shared_data_root() / "ccm" / "vignetting_corrected"
        if not folder.is_dir():
            raise FileNotFoundError(
                f"the CCM benchmark needs the vignetting-corrected CCMID images at {folder} (public sample data, "
                "not shipped; set DICOMNODE_SHARED_DATA), or run --benchmark fundus, which needs nothing"
            )
        from models.io import list_images

        images = [(p.stem, _load(p, 384)) for p in list_images(folder)]
    elif name == "fundus":
        from skimage import data

        retina = resize(data.retina(), (768, 768), order=1, anti_aliasing=True).astype(np.float32)
        images = []
        for top in (0, 192, 384):
            for left in (0, 192, 384):
                crop = retina[top : top + 384, left : left + 384]
                if (crop.mean(axis=2) > 0.08).mean() > 0.7:  # skip crops that are mostly black surround
                    images.append((f"retina_{top:03d}_{left:03d}", crop))
    else:
        raise ValueError(f"unknown benchmark {name!r}; choose from: {', '.join(BENCHMARKS)}")
    return images[:limit] if limit else images


def prepare_benchmark(name: str, workdir: Path, *, seed: int = 0, severity: float = 1.0, limit: int | None = None) -> tuple[Path, Path]:
    """Write clean references and their seeded degradations as PNGs; return (input_dir, reference_dir).

    Image ``i`` is damaged with ``degrade(clean, "mixed", seed + i, pool=name)``: two or three of
    the degradations typical of the modality (``models.degrade.PRESETS``).
    """
    from skimage.io import imsave

    clean = _benchmark_clean_images(name, limit)
    inp, ref = workdir / "input", workdir / "reference"
    inp.mkdir(parents=True, exist_ok=True)
    ref.mkdir(parents=True, exist_ok=True)
    with open(workdir / "manifest.csv", "w", newline="") as fh:  # what was done to each image
        writer = csv.writer(fh)
        writer.writerow(["image", "seed", "severity", "degradations"])
        for i, (stem, img) in enumerate(clean):
            bad = degrade(img, "mixed", seed + i, severity=severity, pool=name)
            imsave(ref / f"{stem}.png", np.round(img * 255).astype(np.uint8), check_contrast=False)
            imsave(inp / f"{stem}.png", np.round(bad * 255).astype(np.uint8), check_contrast=False)
            writer.writerow([f"{stem}.png", seed + i, severity, "+".join(plan("mixed", seed + i, name))])
    return inp, ref


def run_benchmark(name: str, cfg: EvalConfig, *, seed: int = 0, severity: float = 1.0, limit: int | None = None) -> EvalResult:
    """Prepare a built-in paired benchmark under ``cfg.out/data`` and evaluate it."""
    inp, ref = prepare_benchmark(name, cfg.out / "data", seed=seed, severity=severity, limit=limit)
    cfg.input, cfg.reference = inp, ref
    cfg.title = cfg.title or f"Built-in {name.upper()} benchmark (synthetic degradations, seed {seed})"
    source = ("CCMID vignetting-corrected images (../shared/data/ccm/vignetting_corrected)" if name == "ccm"
              else "crops of skimage.data.retina()")
    cfg.notes = [*cfg.notes, "", f"Clean images: {source}; inputs: `degrade(clean, 'mixed', seed + i, pool='{name}')` "
                 f"with severity {severity}, kinds drawn from {', '.join(PRESETS[name])}."]
    return evaluate(cfg)
