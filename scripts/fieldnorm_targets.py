"""Measure the field-normalisation targets (``models/weights/fieldnorm.targets.json``) from HQ folders.

    python scripts/fieldnorm_targets.py --data ../shared/data/train [--out FILE]

Reads ``<data>/fundus/hq`` and ``<data>/endoscopy/hq`` (training data only: never the holdout) and writes each
modality's local mean/std targets at its window (sigma). The windows were chosen on synthetic degradations
of training HQ images (docs/models.md, "Field normalisation").
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.fieldnorm import TARGETS_FILE, targets_from_folder, targets_record  # noqa: E402

SIGMAS = {"fundus": 0.6, "endoscopy": 0.35}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="training data root (with fundus/hq, endoscopy/hq)")
    ap.add_argument("--out", type=Path, default=TARGETS_FILE)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    found = []
    for modality, sigma in SIGMAS.items():
        folder = args.data / modality / "hq"
        start = time.perf_counter()
        t = targets_from_folder(folder, modality, sigma)
        logging.info("%s: %d images from %d sources in %.1f s; mean %s std %s", modality, t.n_images,
                     len(t.sources), time.perf_counter() - start, t.mean, t.std)
        found.append(t)
    note = ("Local mean/std of training HQ images inside their field of view (models/fieldnorm.py); "
            "each source weighs sqrt(its count). Regenerate: python scripts/fieldnorm_targets.py --data ../shared/data/train")
    args.out.write_text(json.dumps(targets_record(found, note), indent=2) + "\n")
    logging.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
