"""The admin HTTP API (FastAPI; its OpenAPI page is ``/docs``, the schema ``/openapi.json``).

Every change (``POST``) needs ``Authorization: Bearer TOKEN`` (:mod:`dicomnode.admin.auth`): without a valid
token it is refused with 401 before anything is touched, and the attempt is audited. Read-only views are
open to loopback clients; from other addresses they need the token too. ``/healthz`` and ``/readyz`` are
always open (they say nothing but up/ready). The work is done by :mod:`dicomnode.admin.ops`, the same
functions the CLI calls.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from dicomnode import __version__
from dicomnode.admin import ops
from dicomnode.admin.auth import Audit, Tokens, is_loopback
from dicomnode.admin.metrics import CONTENT_TYPE, Metrics
from dicomnode.config import ConfigError, NodeConfig
from dicomnode.ledger import Ledger

log = logging.getLogger(__name__)

__all__ = ["AdminContext", "Actor", "create_app"]

MAX_UPLOAD_BYTES = 1024**3  # a rule test's uploaded files together
TOKEN_COOKIE = "dicomnode_token"  # set by the web page; accepted for viewing only, never for a change


class AdminContext:
    """What the API works on: the running node (config, ledger, models, destinations) or, without one, a
    config and a ledger (tests, tools)."""

    def __init__(self, server: Any = None, *, config: NodeConfig | None = None, ledger: Ledger | None = None,
                 tokens: Tokens | None = None, audit: Audit | None = None, metrics: Metrics | None = None) -> None:
        self.server = server
        self._config = config
        self._ledger = ledger
        cfg = self.config
        self.tokens = tokens or Tokens(cfg.admin.token_file)
        self.audit = audit or Audit(None)
        self.metrics = metrics
        self.started = time.time()

    @property
    def config(self) -> NodeConfig:
        if self.server is not None:
            return self.server.config
        assert self._config is not None
        return self._config

    @property
    def ledger(self) -> Ledger:
        if self.server is not None and self.server.spool is not None:
            return self.server.spool.ledger
        if self._ledger is None:
            raise HTTPException(503, "the node is not running: no ledger")
        return self._ledger

    @property
    def models(self) -> Any:
        return self.server.models if self.server is not None else None

    def progress(self) -> dict[int, dict[str, Any]]:
        return self.server.progress.snapshot() if self.server is not None else {}


@dataclass(frozen=True)
class Actor:
    """Who asked: the token's name (None: no valid token) and the peer address."""

    who: str | None
    peer: str | None


def _peer(request: Request) -> str | None:
    return request.client.host if request.client else None


class ResendRequest(BaseModel):
    job: int | None = None
    all_dead: bool = False
    force: bool = False  # a gated job: send its outputs despite the quality gate, once


class CancelRequest(BaseModel):
    reason: str | None = None


def create_app(ctx: AdminContext) -> FastAPI:
    """The admin application: the JSON API, /metrics and the web page (:mod:`dicomnode.admin.web`)."""
    app = FastAPI(title="dicomnode admin", version=__version__,
                  description="Jobs, deliveries, rules, destinations, models and live configuration of a dicomnode. "
                              "Changes need `Authorization: Bearer TOKEN` (admin.token_file). No patient data is shown.")
    app.state.ctx = ctx

    @app.exception_handler(ops.OpError)
    async def _op_error(_request: Request, exc: ops.OpError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    def reader(request: Request) -> Actor:
        """Loopback, or the token (header, or the page's cookie: reading only, so a forged request changes nothing)."""
        cookie = request.cookies.get(TOKEN_COOKIE)
        presented = request.headers.get("authorization") or (f"Bearer {cookie}" if cookie else None)
        actor = Actor(ctx.tokens.who(presented), _peer(request))
        if actor.who is None and not is_loopback(actor.peer):
            raise HTTPException(401, "a bearer token is needed from this address", headers={"WWW-Authenticate": "Bearer"})
        return actor

    def token_holder(request: Request) -> Actor:
        actor = Actor(ctx.tokens.who(request.headers.get("authorization")), _peer(request))
        if actor.who is None:
            raise HTTPException(401, "a valid bearer token is needed" + ("" if ctx.tokens.configured else
                                " (admin.token_file is not set: nothing can be changed)"),
                                headers={"WWW-Authenticate": "Bearer"})
        return actor

    def changer(action: str) -> Callable[[Request], Actor]:
        def check(request: Request) -> Actor:
            try:
                return token_holder(request)
            except HTTPException as exc:
                ctx.audit.record(who=None, peer=_peer(request), action=action, target=dict(request.path_params) or None,
                                 status=exc.status_code, result="refused: no valid token")
                raise
        return check

    may_config_reload = changer("config.reload")
    may_deliveries_resend = changer("deliveries.resend")
    may_destination_echo = changer("destination.echo")
    may_job_cancel = changer("job.cancel")
    may_job_reprocess = changer("job.reprocess")

    def audited(actor: Actor, action: str, target: Any, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        try:
            result = work()
        except ops.OpError as exc:
            ctx.audit.record(who=actor.who, peer=actor.peer, action=action, target=target, status=exc.status, result=exc.message)
            raise
        except ConfigError as exc:
            ctx.audit.record(who=actor.who, peer=actor.peer, action=action, target=target, status=422,
                             result=f"invalid config: {len(exc.errors)} problems")
            raise
        ctx.audit.record(who=actor.who, peer=actor.peer, action=action, target=target, status=200,
                         result=str(result.get("message", "ok")))
        return result

    # -- health ----------------------------------------------------------------------------
    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, Any]:
        """The process answers."""
        return {"status": "ok", "version": __version__}

    @app.get("/readyz", tags=["health"])
    def readyz() -> JSONResponse:
        """Ready to receive: the node started, its DICOM port listens and the spool's disk accepts stores."""
        server = ctx.server
        checks: dict[str, Any] = {"started": bool(server is not None and getattr(server, "_started", False))}
        receiver = getattr(server, "receiver", None)
        checks["listening"] = bool(receiver is not None and receiver.listening)
        checks["disk_accepting"] = not bool(receiver is not None and receiver.disk_full)
        models = ctx.models
        if models is not None:
            checks["models_failed"] = sorted(models.failures)
        ready = checks["started"] and checks["listening"] and checks["disk_accepting"]
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["health"], response_class=Response)
    def metrics(_actor: Actor = Depends(reader)) -> Response:
        """Prometheus text format (docs/admin.md lists the metrics)."""
        if ctx.metrics is None:
            raise HTTPException(404, "metrics are not collected by this process")
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)

    # -- overview --------------------------------------------------------------------------
    @app.get("/api/status", tags=["overview"])
    def status(_actor: Actor = Depends(reader)) -> dict[str, Any]:
        """Jobs and deliveries by state, the last hour's activity, jobs in progress, the node's identity."""
        cfg = ctx.config
        ledger = ctx.ledger
        counts = ledger.counts()
        now = time.time()
        return {"node": {"ae_title": cfg.node.ae_title, "port": getattr(ctx.server, "port", cfg.node.port),
                         "version": __version__, "up_seconds": round(now - ctx.started, 1)},
                "jobs": counts["jobs"], "deliveries": counts["deliveries"],
                "last_hour": ledger.activity(now - 3600), "last_day": ledger.activity(now - 86400),
                "in_progress": {str(k): v for k, v in ctx.progress().items()},
                "audit": ctx.audit.recent(10)}

    @app.get("/api/audit", tags=["overview"])
    def audit(limit: int = Query(50, ge=1, le=1000), _actor: Actor = Depends(reader)) -> dict[str, Any]:
        """The latest admin actions: when, who (token name), from where, what, the result. No patient data."""
        return {"items": ctx.audit.recent(limit)}

    # -- jobs ------------------------------------------------------------------------------
    @app.get("/api/jobs", tags=["jobs"])
    def jobs(state: str | None = Query(None, description="collecting, complete, processing, derived, done, failed, gated"),
             page: int = Query(1, ge=1), per_page: int = Query(50, ge=1, le=500),
             _actor: Actor = Depends(reader)) -> dict[str, Any]:
        """Jobs newest first: UIDs, rule, model, counts, per-stage seconds, quality-gate figures, progress."""
        return ops.list_jobs(ctx.ledger, state, page, per_page, ctx.progress())

    @app.get("/api/jobs/{job_id}", tags=["jobs"])
    def job(job_id: int, _actor: Actor = Depends(reader)) -> dict[str, Any]:
        """One job with its instances (SOP Instance UIDs), outputs and deliveries."""
        return ops.show_job(ctx.ledger, job_id, ctx.progress().get(job_id))

    @app.post("/api/jobs/{job_id}/reprocess", tags=["jobs"])
    def reprocess(job_id: int, actor: Actor = Depends(may_job_reprocess)) -> dict[str, Any]:
        """Run a finished job again from its spooled sources with the current config (a waiting one: now)."""
        result = audited(actor, "job.reprocess", {"job": job_id}, lambda: ops.reprocess_job(ctx.ledger, job_id))
        if ctx.server is not None:
            ctx.server._notify_workers()
        return result

    @app.post("/api/jobs/{job_id}/cancel", tags=["jobs"])
    def cancel(job_id: int, actor: Actor = Depends(may_job_cancel)) -> dict[str, Any]:
        """Stop a job that is not being processed: it fails; a derived job's pending deliveries are dead-lettered."""
        return audited(actor, "job.cancel", {"job": job_id}, lambda: ops.cancel_job(ctx.ledger, job_id, actor.who or "admin"))

    @app.get("/api/jobs/{job_id}/thumbnail/{which}", tags=["jobs"], response_class=Response)
    def thumbnail(job_id: int, which: str, size: int = Query(256, ge=32, le=1024),
                  actor: Actor = Depends(token_holder)) -> Response:
        """The first frame of the job's first source (``before``) or first output (``after``) as PNG. Always needs
        the token: these are patient images."""
        from dicomnode.admin.thumbs import job_thumbnail  # noqa: PLC0415 - decoders only when an image is asked for

        png = job_thumbnail(ctx.ledger, job_id, which, size)
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})

    # -- deliveries ------------------------------------------------------------------------
    @app.get("/api/deliveries", tags=["deliveries"])
    def deliveries(state: str | None = Query(None, description="pending, sent, dead_letter"), destination: str | None = None,
                   job: int | None = None, limit: int = Query(200, ge=1, le=5000),
                   _actor: Actor = Depends(reader)) -> dict[str, Any]:
        """Deliveries newest first, with totals by destination and state."""
        return ops.deliveries(ctx.ledger, state, destination, job, limit)

    @app.post("/api/deliveries/resend", tags=["deliveries"])
    def resend(body: ResendRequest, actor: Actor = Depends(may_deliveries_resend)) -> dict[str, Any]:
        """Dead letters of one job (``job``) or all (``all_dead``) back to pending; ``force`` with ``job`` sends a job the
        quality gate held back."""
        target = {"job": body.job, "all_dead": body.all_dead, "force": body.force}
        result = audited(actor, "deliveries.resend", target,
                         lambda: ops.resend(ctx.ledger, body.job, all_dead=body.all_dead, force=body.force))
        if ctx.server is not None:
            ctx.server._wake_all_dispatch()
        return result

    # -- rules -----------------------------------------------------------------------------
    @app.get("/api/rules", tags=["rules"])
    def rules(_actor: Actor = Depends(reader)) -> dict[str, Any]:
        """The rules in the order they are tried, and the unmatched policy."""
        return ops.rules(ctx.config)

    @app.post("/api/rules/test", tags=["rules"])
    async def rules_test(files: list[UploadFile] | None = File(None), job: int | None = Form(None),
                         calling_aet: str | None = Form(None), _actor: Actor = Depends(reader)) -> dict[str, Any]:
        """Which rule, model and destinations DICOM files (multipart ``files``) or a job's spooled series (``job``) get,
        and why each earlier rule did not match. Sends nothing, stores nothing."""
        config = ctx.config
        if job is not None:
            return ops.rule_test_job(config, ctx.ledger, job, calling_aet or None)
        if not files:
            raise ops.OpError(422, "send DICOM files (multipart field 'files') or a job id (field 'job')")
        folder = Path(tempfile.mkdtemp(prefix="dicomnode-ruletest-"))
        try:
            total = 0
            paths = []
            for i, upload in enumerate(files):
                path = folder / f"{i:05d}.dcm"
                with path.open("wb") as fh:
                    while chunk := await upload.read(1 << 20):
                        total += len(chunk)
                        if total > MAX_UPLOAD_BYTES:
                            raise ops.OpError(413, f"more than {MAX_UPLOAD_BYTES >> 20} MiB uploaded")
                        fh.write(chunk)
                paths.append(path)
            result = ops.rule_test_files(config, paths, calling_aet or "")
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        for item, upload in zip(result["skipped"], files):  # name skipped files as uploaded, not as stored here
            item["file"] = Path(upload.filename or item["file"]).name
        return result

    # -- destinations ----------------------------------------------------------------------
    @app.get("/api/destinations", tags=["destinations"])
    def destinations(_actor: Actor = Depends(reader)) -> dict[str, Any]:
        """Configured destinations (TLS shown as yes/no) with their deliveries by state."""
        return ops.destinations(ctx.config, ctx.ledger)

    @app.post("/api/destinations/{name}/echo", tags=["destinations"])
    def echo(name: str, actor: Actor = Depends(may_destination_echo)) -> dict[str, Any]:
        """C-ECHO a PACS destination (with its TLS and AE titles) or check a folder destination is writable."""
        live = getattr(ctx.server, "_destinations", None)
        result = audited(actor, "destination.echo", {"destination": name}, lambda: ops.echo(ctx.config, name, live))
        return result

    # -- models ----------------------------------------------------------------------------
    @app.get("/api/models", tags=["models"])
    def models(_actor: Actor = Depends(reader)) -> dict[str, Any]:
        """Configured models: loaded or failed with the reason, model cards, guidance caches per modality."""
        return ops.models(ctx.config, ctx.models)

    # -- config ----------------------------------------------------------------------------
    @app.post("/api/config/reload", tags=["config"])
    def reload(actor: Actor = Depends(may_config_reload)) -> JSONResponse:
        """Re-read the config file and apply rules, destinations and models without dropping associations (as SIGHUP).
        An invalid file changes nothing: 422 with every key and reason."""
        if ctx.server is None:
            raise HTTPException(503, "no running node to reload")
        try:
            plan = audited(actor, "config.reload", None, lambda: {**ctx.server.reload().as_dict(), "message": "reloaded"})
        except ConfigError as exc:
            return JSONResponse({"detail": "invalid config: nothing changed",
                                 "errors": [{"key": k, "reason": r} for k, r in exc.errors]}, status_code=422)
        return JSONResponse(plan)

    from dicomnode.admin import web  # noqa: PLC0415 - the page's routes come after the API's

    web.register(app, ctx, reader)
    return app
