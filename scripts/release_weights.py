"""Release recipe for the shipped HQG-Net weights (run by `make weights`; not part of the installed package).

    python scripts/release_weights.py prepare --target color      # manifests, synthetic LQ, validation split
    python scripts/release_weights.py train --target color --g-steps 1500 --steps 12000
    python scripts/release_weights.py validate --target color     # checkpoint on the validation pairs
    python scripts/release_weights.py finish --target color       # export, guidance caches, cards
    python scripts/release_weights.py baseline --target ccm --kind stillgan --steps 550   # same data and CPU budget

Every stage is resumable: training runs in chunks from the last checkpoint, so an interrupted run
is continued by running the same command again.

Data: ``../shared/data/train`` only (its SOURCES.md). ``../shared/data/holdout`` is never read here:
the cards' held-out tables come from ``dicomnode evaluate --holdout``. Per target:

- **ccm** (gray, working side 384 = HRT-III native): HQ = ``ccm/hq`` + ``ccm/pairs/corrected``, LQ =
  ``ccm/lq`` + ``ccm/pairs/raw`` (unpaired use) + synthetic degradations of the HQ images
  (``models.degrade``, CCM pool). Six raw/corrected pairs of both subjects are kept out as validation.
- **color** (RGB, working side 512, field-of-view masks): two domains trained together with the guidance
  of their own modality in every batch: fundus (HQ: DRIMDB "Good", DRIVE, HRF, EyePACS, weighted by
  source as sqrt(count) so the 50 DRIMDB images of one camera do not dominate; LQ: DRIMDB "Bad", EyeQ
  "Reject", DRIVE) and endoscopy (HQ / LQ from CVC-ClinicDB and Kvasir-SEG). Synthetic degradations of
  the HQ images, restricted to the field of view, join the LQ side at half its weight.
- **fundus**, **endoscopy**: one domain each, for the one-model-per-modality comparison.

A validation split of each domain (about 12 % of the images, every source represented) is never
trained on: G's embedding probe and the checkpoint comparison use it.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.degrade import degrade  # noqa: E402
from models.fov import fov_mask  # noqa: E402
from models.io import list_images, load_image, resize_long_side, source_of, source_weights  # noqa: E402

log = logging.getLogger("release")

DEFAULT_DATA = REPO.parent / "shared" / "data" / "train"
DEFAULT_WORK = REPO / "runs" / "release"


@dataclass(frozen=True)
class Domain:
    name: str  # training domain
    modality: str  # DICOM modality whose guidance cache it feeds
    hq: tuple[str, ...]  # folders under the training data
    lq: tuple[str, ...]
    pool: str  # models.degrade preset
    fov: bool


DOMAINS = {
    "ccm": Domain("ccm", "default", ("ccm/hq", "ccm/pairs/corrected"), ("ccm/lq", "ccm/pairs/raw"), "ccm", False),
    "fundus": Domain("fundus", "OP", ("fundus/hq",), ("fundus/lq",), "fundus", True),
    "endoscopy": Domain("endoscopy", "ES", ("endoscopy/hq",), ("endoscopy/lq",), "endoscopy", True),
}
TARGETS = {  # target -> (channels, working max side, domains)
    "ccm": (1, 384, ("ccm",)),
    "color": (3, 512, ("fundus", "endoscopy")),
    "fundus": (3, 512, ("fundus",)),
    "endoscopy": (3, 512, ("endoscopy",)),
}
DOMAIN_MODALITY = {"fundus": "OP", "endoscopy": "ES", "ccm": "default"}  # the guidance cache each domain is served with
VAL_FRACTION = 0.12
SYNTHETIC_PER_HQ = 2


def split(paths: list[Path], fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """(train, validation): every source with 3+ images gives about ``fraction`` of them to validation."""
    rng = np.random.default_rng(seed)
    groups: dict[str, list[Path]] = defaultdict(list)
    for p in paths:
        groups[source_of(p)].append(p)
    train, val = [], []
    for name in sorted(groups):
        g = sorted(groups[name])
        k = int(round(len(g) * fraction)) if len(g) >= 3 else 0
        pick = set(rng.choice(len(g), size=k, replace=False).tolist()) if k else set()
        for i, p in enumerate(g):
            (val if i in pick else train).append(p)
    return train, val


def _save(path: Path, img: np.ndarray) -> None:
    from skimage.io import imsave

    path.parent.mkdir(parents=True, exist_ok=True)
    imsave(path, (np.clip(img, 0, 1) * 255).round().astype(np.uint8), check_contrast=False)


def _files(data: Path, folders: tuple[str, ...]) -> list[Path]:
    out: list[Path] = []
    for f in folders:
        folder = data / f
        if not folder.is_dir():
            raise SystemExit(f"training data not found: {folder} (pass --data pointing at shared/data/train)")
        out += list_images(folder)
    return out


def prepare(target: str, data: Path, work: Path, seed: int) -> Path:
    """Write ``work/TARGET/{train,val}.json`` manifests, synthetic LQ images and validation pairs."""
    channels, side, names = TARGETS[target]
    root = work / target
    root.mkdir(parents=True, exist_ok=True)
    train_m: dict = {"channels": channels, "max_side": side, "fov": any(DOMAINS[n].fov for n in names), "domains": {}}
    val_m: dict = {**train_m, "domains": {}}
    guidance: dict[str, list[tuple[str, float]]] = {}
    pairs_dir = root / "val_pairs"
    if pairs_dir.exists():
        shutil.rmtree(pairs_dir)
    counts: dict[str, dict[str, int]] = {}
    for n in names:
        dom = DOMAINS[n]
        hq_all, lq_all = _files(data, dom.hq), _files(data, dom.lq)
        if n == "ccm":  # keep whole raw/corrected pairs together: 6 pairs (3 per subject) for validation
            pair_names = sorted(p.name for p in (data / "ccm/pairs/raw").iterdir())
            rng = np.random.default_rng(seed)
            zx = [q for q in pair_names if q.startswith("zx")]
            sh = [q for q in pair_names if q.startswith("sh")]
            val_pairs = set(rng.choice(zx, 3, replace=False).tolist() + rng.choice(sh, 3, replace=False).tolist())
            hq_tr, hq_val = split([p for p in hq_all if "pairs" not in p.parts], VAL_FRACTION, seed)
            lq_tr, lq_val = split([p for p in lq_all if "pairs" not in p.parts], VAL_FRACTION, seed + 1)
            hq_tr += [p for p in hq_all if "pairs" in p.parts and p.name not in val_pairs]
            lq_tr += [p for p in lq_all if "pairs" in p.parts and p.name not in val_pairs]
            for q in sorted(val_pairs):
                _save(pairs_dir / "lq" / f"real_{Path(q).stem}.png", load_image(data / "ccm/pairs/raw" / q, 1))
                _save(pairs_dir / "hq" / f"real_{Path(q).stem}.png", load_image(data / "ccm/pairs/corrected" / q, 1))
        else:
            hq_tr, hq_val = split(hq_all, VAL_FRACTION, seed)
            lq_tr, lq_val = split(lq_all, VAL_FRACTION, seed + 1)
        # synthetic LQ: degraded copies of the training HQ images at the working scale, damage inside the field only
        synth: list[Path] = []
        for i, p in enumerate(hq_tr):
            img = resize_long_side(load_image(p, channels), side)
            field = fov_mask(img) if dom.fov else None
            for k in range(SYNTHETIC_PER_HQ):
                out = root / "synthetic" / n / f"{p.stem}_d{k}.png"
                if not out.is_file():
                    _save(out, degrade(img, "mixed", seed=seed * 100000 + i * 10 + k, pool=dom.pool, field=field))
                synth.append(out)
        # validation pairs: degraded validation HQ images (other seeds)
        for i, p in enumerate(hq_val):
            img = resize_long_side(load_image(p, channels), side)
            field = fov_mask(img) if dom.fov else None
            _save(pairs_dir / "hq" / f"{n}_{p.stem}.png", img)
            _save(pairs_dir / "lq" / f"{n}_{p.stem}.png", degrade(img, "mixed", seed=900000 + i, pool=dom.pool, field=field))
        hw = source_weights(hq_tr)
        lw_real = source_weights(lq_tr)
        real_total, synth_total = sum(lw_real.values()), 0.5 * sum(lw_real.values())
        lq_items = [(str(p), w) for p, w in lw_real.items()] + [(str(p), synth_total / len(synth)) for p in synth]
        del real_total
        train_m["domains"][n] = {"weight": 1.0, "modality": dom.modality, "hq": [(str(p), w) for p, w in hw.items()], "lq": lq_items}
        val_m["domains"][n] = {"weight": 1.0, "modality": dom.modality, "hq": [(str(p), 1.0) for p in hq_val] or [(str(hq_tr[0]), 1.0)],
                               "lq": [(str(p), 1.0) for p in lq_val] or [(str(lq_tr[0]), 1.0)]}
        guidance[dom.modality] = [(str(p), w) for p, w in hw.items()]
        counts[n] = {"hq_train": len(hq_tr), "lq_train_real": len(lq_tr), "lq_train_synthetic": len(synth),
                     "hq_val": len(hq_val), "lq_val": len(lq_val)}
    (root / "train.json").write_text(json.dumps(train_m, indent=1))
    (root / "val.json").write_text(json.dumps(val_m, indent=1))
    (root / "guidance.json").write_text(json.dumps(guidance, indent=1))
    (root / "counts.json").write_text(json.dumps(counts, indent=1))
    log.info("%s: prepared %s", target, counts)
    return root


def run(module: str, argv: list) -> None:
    """Run one trainer as a child process (its own threads and memory; a crash leaves the checkpoint)."""
    cmd = [sys.executable, "-m", module, *[str(a) for a in argv]]
    log.info("run %s", " ".join(cmd))
    subprocess.run(cmd, cwd=REPO, check=True)


def _resume(out: Path) -> list[str]:
    return ["--resume"] if (out / "checkpoint_last.pt").is_file() else []


def train(target: str, work: Path, *, g_steps: int, steps: int, size: int, config: str, device: str, seed: int,
          haar_weight: float, minutes: float = 0.0) -> None:
    """Pretrain G, then train HQG-Net. ``minutes`` > 0 is a time budget for both (G a quarter of it, when G
    still has to be trained): each stops there as if its last iteration had come (a GPU lease)."""
    root = work / target
    if not (root / "train.json").is_file():
        raise SystemExit(f"{root / 'train.json'} missing: run `prepare --target {target}` first")
    g_out = root / "g"
    g_weights = g_out / "g.pt"
    g_minutes = 0.25 * minutes if minutes > 0 and not g_weights.is_file() else 0.0
    budget = ["--max-minutes", f"{g_minutes:g}"] if g_minutes else []
    if not g_weights.is_file():
        run("models.train.pretrain_g", ["--manifest", root / "train.json", "--probe-manifest", root / "val.json",
                                        "--config", config, "--size", size, "--iterations", g_steps, "--batch-size", 8, "--aux-weight", 0.1,
                                        "--out", g_out, "--name", "g", "--device", device, "--seed", seed,
                                        "--checkpoint-every", 100, "--val-every", 250, *budget, *_resume(g_out)])
    budget = ["--max-minutes", f"{minutes - g_minutes:g}"] if minutes > 0 else []
    run("models.train.hqgnet", ["--manifest", root / "train.json", "--g", g_weights, "--config", config, "--size", size,
                                "--iterations", steps, "--batch-size", 4, "--out", root / "hqgnet", "--name", f"hqgnet-{target}",
                                "--device", device, "--seed", seed, "--checkpoint-every", 250, "--val-every", 500, "--keep-every", 3000,
                                "--modality", target, "--half", "--haar-weight", haar_weight, *budget, *_resume(root / "hqgnet")])


# Baselines get HQG-Net's CPU budget on the same manifest: 1 thread, seconds per step measured on this
# machine (StillGAN official network at 256: ~35 s; LaMEGAN at 256: ~14 s), so steps = budget / step time.
BASELINE_SIZE = {"stillgan": 256, "lamegan": 256}


def train_baseline(target: str, work: Path, kind: str, *, steps: int, size: int, device: str, seed: int) -> Path:
    """Train (or continue) a cycle-GAN baseline on the target's manifest; returns the exported weights."""
    root = work / target
    if not (root / "train.json").is_file():
        raise SystemExit(f"{root / 'train.json'} missing: run `prepare --target {target}` first")
    out = root / kind
    run(f"models.train.{kind}", ["--manifest", root / "train.json", "--size", size, "--iterations", steps,
                                 "--out", out, "--name", f"{kind}-{target}", "--device", device, "--seed", seed,
                                 "--checkpoint-every", 10, "--val-every", 50, "--log-every", 5,
                                 "--modality", target, *_resume(out)])
    return out / f"{kind}-{target}.pt"


# --------------------------------------------------------------------------------------------- export


MODALITIES = {"ccm": ("default",), "color": ("OP", "ES"), "fundus": ("OP",), "endoscopy": ("ES",)}
DISPLAY = {"ccm": "corneal confocal microscopy", "color": "fundus photography (OP) and endoscopy (ES)",
           "fundus": "fundus photography (OP)", "endoscopy": "endoscopy (ES)"}


def _recent_losses(log_csv: Path, n: int = 200) -> dict[str, float]:
    import csv

    rows = list(csv.DictReader(log_csv.open()))[-n:]
    keys = [k for k in rows[0] if k != "step"] if rows else []
    return {k: round(float(np.mean([float(r[k]) for r in rows if r.get(k) not in (None, "")])), 6) for k in keys}


def _val_pairs(root: Path, modality: str, channels: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The validation pairs (training split) of one modality: fundus for OP, endoscopy for ES, all for CCM."""
    from models.io import list_images, load_image

    domain = {v: k for k, v in DOMAIN_MODALITY.items()}.get(modality)
    lq = [p for p in list_images(root / "val_pairs" / "lq") if modality == "default" or p.name.startswith(f"{domain}_")]
    return ([load_image(p, channels) for p in lq], [load_image(root / "val_pairs" / "hq" / p.name, channels) for p in lq])


def export(target: str, work: Path, weights_dir: Path, *, checkpoint: Path | None = None, color_mode: str = "full",
           field_smoothing: float = 0.0, clip_guard: bool = True, keep_detail: bool = False, detail_boost: float = 0.0,
           haar_weight: float = 1000.0, haar_since: int = 0, device: str = "cpu") -> Path:
    """Weights (fp16) + card from a training checkpoint, and one guidance cache per modality from the training HQ images."""
    import torch

    from models.hqgnet import HQGNet, HQGNetConfig
    from models.registry import read_card
    from models.train.common import export_weights, hardware_description

    root = work / target
    ckpt_path = checkpoint or root / "hqgnet" / "checkpoint_last.pt"
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    cfg = HQGNetConfig.from_dict(dict(state["extra"]["config"]))
    net = HQGNet(cfg)
    net.load_state_dict(state["modules"]["net"])
    manifest = json.loads((root / "train.json").read_text())
    g_card = read_card(root / "g" / "g.pt", verify=False)
    counts = json.loads((root / "counts.json").read_text())
    # a run continued from another target's checkpoint (the one-model-per-modality runs) says so in
    # continued_from.json: {"target", "checkpoint", "iterations", "counts"}; the card carries it
    continued_path = root / "continued_from.json"
    continued = json.loads(continued_path.read_text()) if continued_path.exists() else None
    name = f"hqgnet-{target}"
    card = {
        "kind": "hqgnet", "name": "HQG-Net", "version": "2.0.0", "config": cfg.to_dict(), "channels": cfg.channels,
        "size": 192, "working_max_side": int(manifest["max_side"]), "fov": bool(manifest.get("fov", False)),
        "color_mode": color_mode, "field_smoothing": field_smoothing, "clip_guard": clip_guard, "keep_detail": keep_detail,
        **({"detail_boost": detail_boost} if detail_boost else {}),
        "for": DISPLAY[target],
        "training_data": {"source": "shared/data/train (SOURCES.md), validation split held out",
                          "counts": {d: n for d, n in counts.items() if d in TARGETS[target][2]},
                          **({"continued_from": continued} if continued else {})},
        "g": {"iterations": g_card.extra.get("iterations"), "probe": g_card.extra.get("probe"),
              "aux_classifier": g_card.extra.get("aux_classifier"), "final_losses": g_card.extra.get("final_losses")},
        "loss_weights": {"haar": haar_weight, "haar_since_step": haar_since, "lambda1": 10.0, "lambda2": 1.0,
                         **({"haar_before": 1.0} if haar_since else {})},
        "iterations": int(state["step"]), "checkpoint": ckpt_path.name,
        "hardware": _training_hardware(ckpt_path.parent, f"hqgnet-{target}") or hardware_description(torch.device("cpu")),
        "recent_losses": _recent_losses(ckpt_path.parent / "log.csv"),
        "retrain": f"python scripts/release_weights.py all --target {target}",
    }
    weights_dir.mkdir(parents=True, exist_ok=True)
    dst = weights_dir / f"{name}.pt"
    export_weights(dst, net.state_dict(), card, half=True)
    ids = build_caches(target, work, weights_dir, dst, device=device)
    log.info("%s: exported step %d -> %s, guidance %s", target, state["step"], dst, ids)
    return dst


def _training_hardware(run: Path, name: str) -> str | None:
    """What the training run's own card says it ran on (a GPU lease's card names the GPU, not this CPU)."""
    card = run / f"{name}.json"
    try:
        return str(json.loads(card.read_text())["hardware"])
    except (OSError, KeyError, ValueError):
        return None


def build_caches(target: str, work: Path, weights_dir: Path, weights: Path, *, device: str = "cpu") -> dict[str, str]:
    """One guidance cache per modality for ``weights`` from the training HQ images: the method (mean,
    single, nearest) and then the strength (vector x 0.25 ... 2) measured on this modality's validation
    pairs (training split); the best is kept and the measurements go into the cache file."""
    from dicomnode import guidance as gd
    from models.guidance import GUIDANCE_SCALES
    from models.registry import build_model

    root = work / target
    name = weights.stem
    for old in weights_dir.glob(f"{name}.guidance-*.json"):
        old.unlink()
    enhancer = build_model("hqgnet", weights=weights, device=device)
    refs = json.loads((root / "guidance.json").read_text())
    ids = {}
    for modality in MODALITIES[target]:
        source_modality = "default" if target == "ccm" else modality
        items = refs.get(source_modality) or refs[next(iter(refs))]
        paths, ws = [Path(p) for p, _ in items], [w for _, w in items]
        order = sorted(range(len(paths)), key=lambda i: paths[i])
        heldout = _val_pairs(root, modality, enhancer.info.card.channels if enhancer.info.card else 1)
        g = gd.build(enhancer, name, [paths[i] for i in order], modality=modality, method="auto", heldout=heldout,
                     weights=[ws[i] for i in order], scales=GUIDANCE_SCALES,
                     progress=lambda text, m=modality: log.info("%s %s: %s", name, m, text))
        gd.save(g, weights_dir / f"{name}.guidance-{modality}.json")
        ids[modality] = g.id
        strength = g.measurements.get("strength", {})
        log.info("%s %s: method %s, strength %s (%s)", name, modality, g.method, g.scale,
                 ", ".join(f"x{k} {v['psnr']:.2f} dB" for k, v in strength.get("scales", {}).items()))
    return ids


def validate(target: str, work: Path, weights: Path, out: Path, *, device: str = "cpu") -> dict:
    """The exported model against CLAHE and the input on the validation pairs (training split, never holdout),
    one table per domain with that domain's guidance cache, and the guidance effect between caches."""

    from dicomnode import guidance as gd
    from dicomnode.resident import DeviceQueue, GatedEnhancer
    from dicomnode.tools.holdout import guidance_effect
    from models.evaluate import EvalConfig, evaluate, markdown_table
    from models.io import list_images, load_image
    from models.registry import build_model

    root = work / target
    pairs = root / "val_pairs"
    enhancer = build_model("hqgnet", weights=weights, device=device)
    channels = enhancer.info.card.channels if enhancer.info.card else 1
    caches = {m: gd.load(weights.with_name(f"{weights.stem}.guidance-{m}.json")) for m in MODALITIES[target]}
    summary: dict = {}
    present = {p.name.split("_")[0] for p in list_images(pairs / "lq")}
    domains = ["ccm"] if target == "ccm" else [d for d in TARGETS[target][2] if d in present]
    for domain in domains:
        modality = DOMAIN_MODALITY.get(domain, "default")
        own = caches.get(modality) or next(iter(caches.values()))
        split = out / "data" / domain
        for kind in ("lq", "hq"):
            (split / kind).mkdir(parents=True, exist_ok=True)
            for path in list_images(pairs / kind):
                if target == "ccm" or path.name.startswith(domain + "_"):
                    link = split / kind / path.name
                    if not link.exists():
                        link.symlink_to(path)

        bound = GatedEnhancer(enhancer, DeviceQueue(), own)  # as the node binds it (nearest included)
        bound.uses_guidance = False  # the evaluation must not pass its own guidance
        cfg = EvalConfig(input=split / "lq", reference=split / "hq", out=out / domain, methods=["clahe"],
                         enhancers={f"hqgnet ({modality}, {own.method})": bound},
                         metrics=["psnr", "ssim", "lassim", "de", "lassim_in", "chroma", "border"],
                         size=512, device=device, fov=TARGETS[target][2] != ("ccm",), progress=False,
                         title=f"validation: {target} / {domain}")
        result = evaluate(cfg)
        print(f"\n{domain} (guidance {modality}: {own.id})\n{markdown_table(result.summary)}")
        summary[domain] = result.summary.to_json()
        if len(caches) > 1:
            other = next(g for m, g in caches.items() if g.id != own.id)
            inputs = [load_image(p, channels) for p in list_images(split / "lq")]
            refs = [load_image(p, channels) for p in list_images(split / "hq")]
            effect, own_psnr, random_psnr = guidance_effect(enhancer, own, other, inputs, refs)
            print(f"guidance effect {modality} vs {other.modality}: {effect:.3f}; PSNR own cache {own_psnr:.2f} dB, "
                  f"random vector {random_psnr:.2f} dB")
            summary[domain]["guidance_effect"] = {"effect": effect, "psnr_own": own_psnr, "psnr_random": random_psnr}
    (out / "validation.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def _eval_device(name: str) -> str:
    """Where export and validation run the model: the training device (auto = CUDA when present)."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=("prepare", "train", "export", "validate", "all", "baseline", "guidance"))
    parser.add_argument("--kind", choices=tuple(BASELINE_SIZE), default="stillgan", help="baseline: which cycle GAN")
    parser.add_argument("--weights-dir", type=Path, default=REPO / "models" / "weights")
    parser.add_argument("--checkpoint", type=Path, default=None, help="export: this checkpoint instead of the last")
    parser.add_argument("--color-mode", choices=("full", "luminance"), default="full", help="export: the card's default output mode")
    parser.add_argument("--field-smoothing", type=float, default=0.05,
                        help="export: the card's default field smoothing (Gaussian sigma / working side; 0 = none)")
    parser.add_argument("--clip-guard", choices=("on", "off"), default="on",
                        help="export: the card's default clip guard (models.hqgnet.limit_fields); the guidance strength is measured with it")
    parser.add_argument("--keep-detail", choices=("on", "off"), default="off",
                        help="export: the card's default keep_detail (gains below 1 become offsets; models.hqgnet.keep_detail_fields)")
    parser.add_argument("--detail-boost", type=float, default=0.0,
                        help="export: the card's default detail_boost (models.hqgnet_enhancer; CCM: 0.2, chosen on the validation pairs)")
    parser.add_argument("--target", choices=tuple(TARGETS), required=True)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--g-steps", type=int, default=1500)
    parser.add_argument("--steps", type=int, default=12000)
    parser.add_argument("--size", type=int, default=192, help="training crop size (a multiple of 32)")
    parser.add_argument("--config", choices=("lite", "paper"), default="lite")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=float, default=0.0,
                        help="train: time budget in minutes for G and HQG-Net together (0 = run all --steps)")
    parser.add_argument("--haar-weight", type=float, default=1000.0,
                        help="weight of L_Haar (a mean; see models.hqgnet.LossWeights); 1 leaves structure undefended")
    parser.add_argument("--haar-since", type=int, default=0,
                        help="export: the step from which the checkpoint was trained with --haar-weight (1 before), for the card")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.stage == "guidance":  # rebuild the shipped weights' caches only (weights unchanged)
        print(build_caches(args.target, args.work, args.weights_dir, args.weights_dir / f"hqgnet-{args.target}.pt",
                           device=_eval_device(args.device)))
        return 0
    if args.stage == "baseline":
        size = args.size if args.size != 192 else BASELINE_SIZE[args.kind]
        print(train_baseline(args.target, args.work, args.kind, steps=args.steps, size=size, device=args.device, seed=args.seed))
        return 0
    if args.stage in ("prepare", "all"):
        prepare(args.target, args.data, args.work, args.seed)
    if args.stage in ("train", "all"):
        train(args.target, args.work, g_steps=args.g_steps, steps=args.steps, size=args.size, config=args.config,
              device=args.device, seed=args.seed, haar_weight=args.haar_weight, minutes=args.minutes)
    if args.stage in ("export", "all"):
        export(args.target, args.work, args.weights_dir, checkpoint=args.checkpoint, color_mode=args.color_mode,
               field_smoothing=args.field_smoothing, clip_guard=args.clip_guard == "on",
               keep_detail=args.keep_detail == "on", detail_boost=args.detail_boost,
               haar_weight=args.haar_weight, haar_since=args.haar_since, device=_eval_device(args.device))
    if args.stage in ("validate", "all"):
        validate(args.target, args.work, args.weights_dir / f"hqgnet-{args.target}.pt", args.work / args.target / "validation",
                 device=_eval_device(args.device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
