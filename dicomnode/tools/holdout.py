"""`dicomnode evaluate --holdout`: every configured model on the held-out images, as the node would run it.

The held-out images (``shared/data/holdout``, evaluation only: nothing is trained, tuned or chosen on
them) come in three kinds per domain; each becomes one table:

* ``<domain>-degraded``: the clean references damaged with the project's own degradations
  (``models.degrade``, the domain's pool, a fixed seed, inside the field of view), paired;
* ``ccm-real-pairs``: real raw HRT-III frames and the lab's corrected versions, paired;
* ``<domain>-real-lq``: real low-quality images as captured, no reference.

Rows: the input, the reference (paired sets), CLAHE, every configured model that fits the domain (gray
or colour) bound to the guidance of the domain's modality, and any extra ``--methods`` (e.g. baseline
weights). The model the config's rules route the domain to is marked ``(default)``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from skimage.io import imsave

from dicomnode.config import NodeConfig
from dicomnode.guidance import Guidance
from dicomnode.resident import ModelUnavailable, ResidentModels
from dicomnode.route import decide
from models.degrade import degrade
from models.evaluate import EvalConfig, EvalResult, evaluate, markdown_table
from models.fov import fov_mask
from models.io import list_images, load_image
from models.registry import Enhancer

log = logging.getLogger(__name__)

__all__ = ["DOMAINS", "GuidanceEffect", "HoldoutSet", "guidance_effect", "holdout_sets", "run_holdout"]


@dataclass(frozen=True)
class Domain:
    name: str
    channels: int
    fov: bool
    pool: str  # models.degrade preset
    tags: dict[str, str]  # what a series of this domain looks like to the rules


DOMAINS = (
    Domain("ccm", 1, False, "ccm", {"Modality": "OP", "SeriesDescription": "Corneal confocal microscopy",
                                     "ManufacturerModelName": "HRT3 RCM"}),
    Domain("fundus", 3, True, "fundus", {"Modality": "OP"}),
    Domain("endoscopy", 3, True, "endoscopy", {"Modality": "ES"}),
)
SEED = 20261  # the holdout degradations, fixed so every run and every model sees the same damage
PAIRED_METRICS = ("psnr", "ssim", "lassim", "de", "lassim_in", "chroma", "border", "niqe", "illum")
UNPAIRED_METRICS = ("lassim_in", "chroma", "border", "niqe", "illum", "ag")


@dataclass(frozen=True)
class HoldoutSet:
    name: str
    domain: Domain
    input: Path
    reference: Path | None
    note: str


def _save(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    imsave(path, (np.clip(img, 0, 1) * 255).round().astype(np.uint8), check_contrast=False)


def holdout_sets(root: Path, work: Path) -> list[HoldoutSet]:
    """The evaluation sets found under ``root`` (shared/data/holdout); degraded inputs are written to ``work``."""
    if not root.is_dir():
        raise FileNotFoundError(f"held-out images not found at {root} (pass --holdout-dir; they are not shipped)")
    sets: list[HoldoutSet] = []
    for dom in DOMAINS:
        clean = root / dom.name / "clean"
        if clean.is_dir():
            out = work / f"{dom.name}-degraded"
            for i, path in enumerate(list_images(clean)):
                img = load_image(path, dom.channels)
                field = fov_mask(img) if dom.fov else None
                _save(out / "input" / f"{path.stem}.png", degrade(img, "mixed", seed=SEED + i, pool=dom.pool, field=field))
                _save(out / "reference" / f"{path.stem}.png", img)
            sets.append(HoldoutSet(f"{dom.name}-degraded", dom, out / "input", out / "reference",
                                   f"{dom.name} clean references, degraded with the '{dom.pool}' pool (seed {SEED} + i)"))
        pairs = root / dom.name / "real_pairs"
        if (pairs / "raw").is_dir():
            sets.append(HoldoutSet(f"{dom.name}-real-pairs", dom, pairs / "raw", pairs / "corrected",
                                   "real raw frames and the lab's corrected versions"))
        real = root / dom.name / "real_lq"
        if real.is_dir():
            sets.append(HoldoutSet(f"{dom.name}-real-lq", dom, real, None, "real low-quality images as captured, no reference"))
    return sets


def _methods(config: NodeConfig, models: ResidentModels, dom: Domain) -> tuple[dict[str, Enhancer], str | None]:
    """CLAHE and the configured models that fit ``dom``, bound to its modality's guidance; and the routed default."""
    decision = decide(config, [dom.tags], "")
    default = decision.model if decision.action == "enhance" else None
    chosen: dict[str, Enhancer] = {}
    for name in config.models:
        try:
            bound = models.bind(name, dom.tags["Modality"])
        except ModelUnavailable as exc:
            log.warning("holdout %s: model %s not evaluated: %s", dom.name, name, exc)
            continue
        card = bound.enhancer.info.card
        channels = card.channels if card is not None else None
        if name != default and channels is not None and channels != dom.channels:
            continue  # a gray model on colour photographs (or the reverse) is not what the node would run
        chosen[f"{name} (default)" if name == default else name] = bound.enhancer
    return chosen, default


@dataclass(frozen=True)
class GuidanceEffect:
    """What the HQ guidance does to one model on one set (the paper's mechanism, measured).

    ``effect``: mean |out(own cache) - out(other cache)| / mean |out(own cache) - input|, the share of the
    model's own change that depends on which modality's HQ images guide it (0 = guidance ignored).
    ``psnr_own`` / ``psnr_random``: PSNR to the reference with the modality's cache and with a random
    vector of the same norm (paired sets only).
    """

    model: str
    own: str
    other: str
    effect: float
    psnr_own: float | None
    psnr_random: float | None
    n: int


def guidance_effect(enhancer: Enhancer, own: Guidance | np.ndarray, other: Guidance | np.ndarray,
                    inputs: Sequence[np.ndarray], references: Sequence[np.ndarray] | None = None, *,
                    seed: int = 0) -> tuple[float, float | None, float | None]:
    """(effect, PSNR with ``own``, PSNR with a random vector of ``own``'s norm) over ``inputs`` (see GuidanceEffect).

    ``own`` and ``other`` are cache records (used as the node uses them: a ``nearest`` record gives each
    image its nearest exemplar) or plain vectors.
    """
    from models.metrics.fullref import psnr

    def vector(g: Guidance | np.ndarray, query: np.ndarray | None) -> np.ndarray:
        return g.vector_for(query) if isinstance(g, Guidance) else np.asarray(g, dtype=np.float32)

    def needs_query(g: Guidance | np.ndarray) -> bool:
        return isinstance(g, Guidance) and g.method == "nearest" and g.exemplars is not None

    base = own.vector if isinstance(own, Guidance) else np.asarray(own, dtype=np.float32)
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(base.shape).astype(np.float32)
    random = noise / np.linalg.norm(noise) * float(np.linalg.norm(base))
    moved = between = 0.0
    own_scores: list[float] = []
    random_scores: list[float] = []
    for i, img in enumerate(inputs):
        query = enhancer.extract_guidance([img])[0] if needs_query(own) or needs_query(other) else None
        a = enhancer.enhance([img], guidance=vector(own, query))[0]
        b = enhancer.enhance([img], guidance=vector(other, query))[0]
        moved += float(np.abs(a - img).mean())
        between += float(np.abs(a - b).mean())
        if references is not None:
            r = enhancer.enhance([img], guidance=random)[0]
            own_scores.append(psnr(a, references[i]))
            random_scores.append(psnr(r, references[i]))
    effect = between / moved if moved > 0 else 0.0
    if references is None:
        return effect, None, None
    return effect, float(np.mean(own_scores)), float(np.mean(random_scores))


def _guidance_rows(config: NodeConfig, models: ResidentModels, hs: HoldoutSet, limit: int = 8) -> list[GuidanceEffect]:
    """Guidance effect of every guided model with more than one cache, on the first ``limit`` images of ``hs``."""
    rows: list[GuidanceEffect] = []
    modality = hs.domain.tags["Modality"]
    inputs_paths = list_images(hs.input)[:limit]
    for name in config.models:
        try:
            resident = models.get(name)
        except ModelUnavailable:
            continue
        caches = resident.guidance
        own = resident.guidance_record(modality)
        card = resident.enhancer.info.card
        if not resident.enhancer.uses_guidance or own is None or len(caches) < 2:
            continue
        if card is not None and card.channels != hs.domain.channels:
            continue
        other = next(g for key, g in sorted(caches.items()) if g.id != own.id)
        inputs = [load_image(p, hs.domain.channels) for p in inputs_paths]
        refs = None
        if hs.reference is not None:
            refs = [load_image(hs.reference / p.name, hs.domain.channels) if (hs.reference / p.name).exists()
                    else load_image(next(hs.reference.glob(p.stem + ".*")), hs.domain.channels) for p in inputs_paths]
        effect, own_psnr, random_psnr = guidance_effect(resident.enhancer, own, other, inputs, refs)
        rows.append(GuidanceEffect(name, f"{own.modality} ({own.id})", f"{other.modality} ({other.id})", effect, own_psnr,
                                   random_psnr, len(inputs)))
    return rows


def run_holdout(config: NodeConfig, models: ResidentModels, root: Path, out: Path, *, extra_methods: Sequence[str] = (),
                progress: bool = True, report: Callable[[str], None] = print) -> dict[str, EvalResult]:
    """Evaluate every set; writes ``out/<set>/results.*`` and ``out/holdout.md`` + ``out/holdout.json``."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, EvalResult] = {}
    guidance: dict[str, list[dict[str, object]]] = {}
    sections = ["# Held-out evaluation", "",
                f"Images: `{root}` (evaluation only). Each table: mean ± std (n images); the input and reference rows "
                "are the baseline and the target; ↑/↓ direction, ≈ closest to the reference. Metrics inside the field "
                "of view for fundus and endoscopy; Border = change of the input's black surround.", ""]
    for hs in holdout_sets(root, out / "data"):
        enhancers, default = _methods(config, models, hs.domain)
        paired = hs.reference is not None
        cfg = EvalConfig(input=hs.input, reference=hs.reference, out=out / hs.name, methods=["clahe", *extra_methods],
                         enhancers=enhancers, metrics=list(PAIRED_METRICS if paired else UNPAIRED_METRICS), size=512,
                         device="cpu", montage_images=3, fov=hs.domain.fov, progress=progress,
                         title=f"Held-out: {hs.name}", notes=[hs.note])
        result = evaluate(cfg)
        results[hs.name] = result
        table = markdown_table(result.summary)
        sections += [f"## {hs.name}", "", hs.note + (f"; default model: {default}" if default else "; no rule enhances this domain"),
                     "", table, ""]
        report(f"\n{hs.name} ({hs.note})\n{table}")
        effects = _guidance_rows(config, models, hs)
        if effects:
            lines = ["| Model | Guidance | Other cache | Effect | PSNR own | PSNR random | n |", "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
            for e in effects:
                fmt = (lambda v: f"{v:.2f}" if v is not None else "-")  # noqa: E731
                lines.append(f"| {e.model} | {e.own} | {e.other} | {e.effect:.3f} | {fmt(e.psnr_own)} | {fmt(e.psnr_random)} | {e.n} |")
            text = "\n".join(lines)
            sections += ["Guidance effect: mean |out(own) - out(other)| / mean |out(own) - input| (≥ 0.10: the HQ guidance "
                         "matters); PSNR with the cache vs a random vector of the same norm.", "", text, ""]
            guidance[hs.name] = [e.__dict__ for e in effects]
            report(text)
    (out / "holdout.md").write_text("\n".join(sections))
    (out / "holdout.json").write_text(json.dumps({**{name: r.summary.to_json() for name, r in results.items()},
                                                  "guidance_effect": guidance}, indent=1))
    report(f"\nheld-out evaluation of {len(results)} set(s) in {time.perf_counter() - started:.0f} s: {out / 'holdout.md'}")
    return results
