"""The admin web page: server-rendered HTML (Jinja2) over the same operations as the API, a little plain JS.

Pages: the dashboard (``/``: throughput, queues, jobs in progress, recent jobs), a job (``/jobs/ID``: timings,
quality-gate figures, before/after thumbnails fetched with the token), rules with the rule test dialog,
deliveries (dead letters with resend), destinations with echo, models with their cards, the audit log.
Viewing follows the API's read rule (loopback, or the token); every button posts to the API with the token
the admin typed into the page (kept in the browser tab's session storage). No build step: the templates
and ``static/`` are files in this package.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape

from dicomnode import __version__
from dicomnode.admin import ops
from dicomnode.ledger import DeliveryState, JobState

__all__ = ["register"]

HERE = Path(__file__).resolve().parent
STAGE_ORDER = ("read", "decode", "model", "gate", "encode", "write")


def _when(ts: float | None) -> str:
    if not ts:
        return "–"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _ago(ts: float | None) -> str:
    if not ts:
        return "–"
    seconds = max(0.0, time.time() - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


def _short(uid: str | None, keep: int = 18) -> str:
    uid = uid or ""
    return uid if len(uid) <= keep + 3 else "…" + uid[-keep:]


def _size(n: float | None) -> str:
    n = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def environment() -> Environment:
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters.update(when=_when, ago=_ago, short=_short, size=_size,
                       tojson_pretty=lambda v: json.dumps(v, indent=2, sort_keys=True, default=str))
    env.globals.update(version=__version__, stage_order=STAGE_ORDER, job_states=[s.value for s in JobState])
    return env


def register(app: FastAPI, ctx: Any, reader: Callable[..., Any]) -> None:
    """Add the pages and ``/static`` to ``app``; ``reader`` is the API's read-access dependency."""
    env = environment()
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    def page(name: str, request: Request, **values: Any) -> HTMLResponse:
        cfg = ctx.config
        html = env.get_template(name).render(request=request, node=cfg.node, path=request.url.path, **values)
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def dashboard(request: Request, _actor: Any = Depends(reader)) -> HTMLResponse:
        ledger = ctx.ledger
        now = time.time()
        counts = ledger.counts()
        recent = ops.list_jobs(ledger, None, 1, 15, ctx.progress())
        models = ops.models(ctx.config, ctx.models)
        metrics = ctx.metrics
        received = metrics.registry.get_sample_value("dicomnode_instances_received_total") if metrics is not None else None
        return page("dashboard.html", request, counts=counts, hour=ledger.activity(now - 3600),
                    day=ledger.activity(now - 86400), jobs=recent["items"], total_jobs=recent["total"],
                    progress=ctx.progress(), models=models, received_since_start=received,
                    up_seconds=now - ctx.started, audit=ctx.audit.recent(5))

    @app.get("/jobs", response_class=HTMLResponse, include_in_schema=False)
    def jobs(request: Request, state: str | None = None, page_no: int = Query(1, alias="page", ge=1),
             _actor: Any = Depends(reader)) -> HTMLResponse:
        listing = ops.list_jobs(ctx.ledger, state, page_no, 50, ctx.progress())
        return page("jobs.html", request, listing=listing, state=state or "")

    @app.get("/jobs/{job_id}", response_class=HTMLResponse, include_in_schema=False)
    def job(request: Request, job_id: int, _actor: Any = Depends(reader)) -> HTMLResponse:
        view = ops.show_job(ctx.ledger, job_id, ctx.progress().get(job_id))
        return page("job.html", request, job=view)

    @app.get("/rules", response_class=HTMLResponse, include_in_schema=False)
    def rules(request: Request, _actor: Any = Depends(reader)) -> HTMLResponse:
        return page("rules.html", request, rules=ops.rules(ctx.config))

    @app.get("/deliveries", response_class=HTMLResponse, include_in_schema=False)
    def deliveries(request: Request, _actor: Any = Depends(reader)) -> HTMLResponse:
        ledger = ctx.ledger
        dead = ops.deliveries(ledger, DeliveryState.DEAD_LETTER.value, limit=500)
        pending = ops.deliveries(ledger, DeliveryState.PENDING.value, limit=200)
        gated = [ops.job_view(j) for j in ledger.jobs(JobState.GATED, limit=100, newest_first=True)]
        by_job: dict[int, int] = {}
        for d in dead["items"]:
            by_job[d["job"]] = by_job.get(d["job"], 0) + 1
        return page("deliveries.html", request, dead=dead, pending=pending, gated=gated, dead_jobs=by_job)

    @app.get("/destinations", response_class=HTMLResponse, include_in_schema=False)
    def destinations(request: Request, _actor: Any = Depends(reader)) -> HTMLResponse:
        return page("destinations.html", request, destinations=ops.destinations(ctx.config, ctx.ledger))

    @app.get("/models", response_class=HTMLResponse, include_in_schema=False)
    def models(request: Request, _actor: Any = Depends(reader)) -> HTMLResponse:
        return page("models.html", request, models=ops.models(ctx.config, ctx.models))

    @app.get("/audit", response_class=HTMLResponse, include_in_schema=False)
    def audit(request: Request, _actor: Any = Depends(reader)) -> HTMLResponse:
        return page("audit.html", request, entries=ctx.audit.recent(500))
