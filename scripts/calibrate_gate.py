"""Calibrate the quality gate's defaults: figures of good outputs against those of known failures.

Usage::

    python scripts/calibrate_gate.py [--config node.yaml] [--holdout ../shared/data/holdout] [--limit 12]

For every held-out image (clean references, the same degraded as `dicomnode evaluate --holdout` degrades
them, and real low-quality images of the three domains) this runs
CLAHE and the model the config routes the domain to (the node's good outputs), and applies the failures
the gate must stop to the input itself: a red tint, erased structure (Gaussian blur, sigma 1.5 % of the
longer side), a flat frame, a clipped (over-exposed) frame, a burnt-out corner and a lifted field-of-view surround. It
prints, per figure, the range of the good outputs and of the failures, and what the current defaults
(``GatePolicy()``) pass and stop. The issue asks for the defaults to be calibrated on the holdout; nothing
else is chosen on it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dicomnode import gate  # noqa: E402
from dicomnode.config import GatePolicy, load_config  # noqa: E402
from dicomnode.resident import ResidentModels  # noqa: E402
from dicomnode.route import decide  # noqa: E402
from dicomnode.tools.holdout import DOMAINS, SEED  # noqa: E402
from models.degrade import degrade  # noqa: E402
from models.fov import fov_mask  # noqa: E402
from models.io import list_images, load_image, resize_long_side  # noqa: E402
from models.registry import build_model  # noqa: E402


def red_tint(img: np.ndarray) -> np.ndarray:
    if img.ndim == 2:
        return img
    out = img.copy()
    out[..., 0] = np.clip(out[..., 0] * 1.25 + 0.15, 0, 1)
    out[..., 1:] *= 0.8
    return out


def erase(img: np.ndarray) -> np.ndarray:
    sigma = 0.015 * max(img.shape[:2])
    return ndi.gaussian_filter(img, (sigma, sigma, 0) if img.ndim == 3 else sigma).astype(np.float32)


def burn_corner(img: np.ndarray) -> np.ndarray:
    """The top-left fifth by fifth of the frame burnt to white (4 % of the pixels): a local over-correction."""
    out = img.copy()
    h, w = img.shape[:2]
    out[: max(1, h // 5), : max(1, w // 5)] = 1.0
    return out


def lift(img: np.ndarray) -> np.ndarray:
    return np.clip(img + 0.12, 0, 1).astype(np.float32)


DAMAGES = {
    "red tint": red_tint,
    "erased structure": erase,
    "flat": lambda img: np.full_like(img, float(img.mean())),
    "clipped": lambda img: np.clip(img * 4.0, 0, 1),
    "burnt corner": burn_corner,
    "surround lifted": lift,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=None, help="node config (default: the embedded default)")
    parser.add_argument("--holdout", type=Path, default=ROOT.parent / "shared" / "data" / "holdout")
    parser.add_argument("--limit", type=int, default=12, help="images per folder")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = parser.parse_args(argv)
    if not args.holdout.is_dir():
        print(f"held-out images not found at {args.holdout}", file=sys.stderr)
        return 2
    config = load_config(args.config)
    models = ResidentModels.load(config)
    policy = GatePolicy()
    clahe = build_model("clahe")
    good: dict[str, list[dict[str, float]]] = defaultdict(list)
    bad: dict[str, list[dict[str, float]]] = defaultdict(list)
    for dom in DOMAINS:
        decision = decide(config, [dom.tags], "")
        methods = {"clahe": clahe}
        if decision.action == "enhance" and decision.model:
            methods[decision.model] = models.bind(decision.model, dom.tags["Modality"]).enhancer
        for folder in ("clean", "degraded", "real_lq"):
            source = args.holdout / dom.name / ("clean" if folder == "degraded" else folder)
            paths = list_images(source)[: args.limit] if source.is_dir() else []
            for i, path in enumerate(paths):
                img = load_image(path, dom.channels)
                if folder == "degraded":  # as `evaluate --holdout` degrades them: the inputs a model must correct
                    img = degrade(img, "mixed", seed=SEED + i, pool=dom.pool, field=fov_mask(img) if dom.fov else None)
                img = resize_long_side(img, 1024)
                for name, method in methods.items():
                    out = method.enhance([img])[0]
                    good[f"{dom.name}/{name}"].append(gate.measure(img, out))
                for name, damage in DAMAGES.items():
                    if name == "red tint" and img.ndim == 2:
                        continue
                    bad[f"{dom.name}/{name}"].append(gate.measure(img, damage(img)))
                print(f"  {dom.name}/{folder}/{path.name}", file=sys.stderr)

    def stopped(rows: list[dict[str, float]]) -> str:
        return f"{sum(bool(gate.reasons(r, policy)) for r in rows)}/{len(rows)}"

    keys = ("lassim", "detail", "chroma_shift", "saturated", "saturated_region", "border_change", "std")
    print(f"defaults: {policy.model_dump()}\n")
    print("| outputs | n | stopped | " + " | ".join(keys) + " |")
    print("| --- | ---: | ---: | " + " | ".join("---" for _ in keys) + " |")
    for label, table in (("good", good), ("failure", bad)):
        for name, rows in table.items():
            cells = []
            for k in keys:
                values = [r[k] for r in rows if k in r]
                cells.append(f"{min(values):.3f}–{max(values):.3f}" if values else "-")
            print(f"| {label}: {name} | {len(rows)} | {stopped(rows)} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"good": good, "failure": bad}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
