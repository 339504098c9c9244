"""The admin HTTP server as an add-on of the node: uvicorn in a thread of the ``serve`` process.

Started once the node is up (``Server.start``), stopped first when it drains, so the API and the node see
one ledger, one set of resident models and one config. The port is ``admin.port`` on ``admin.host``
(loopback by default), with HTTPS when ``admin.tls`` names a certificate and key.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn

from dicomnode.admin.api import AdminContext, create_app
from dicomnode.admin.auth import AUDIT_FILE, Audit, Tokens
from dicomnode.admin.metrics import Metrics
from dicomnode.config import AdminConfig

log = logging.getLogger(__name__)

__all__ = ["AdminService"]


class AdminService:
    """``start(server)`` serves the admin API for that node; ``stop()`` ends it. ``port`` is the bound port."""

    def __init__(self, settings: AdminConfig, metrics: Metrics | None = None, *, start_timeout: float = 15.0) -> None:
        self.settings = settings
        self.metrics = metrics
        self.start_timeout = start_timeout
        self.context: AdminContext | None = None
        self._uvicorn: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def port(self) -> int:
        server = self._uvicorn
        for s in getattr(server, "servers", None) or []:
            for sock in s.sockets:
                return int(sock.getsockname()[1])
        return self.settings.port

    @property
    def url(self) -> str:
        scheme = "https" if self.settings.tls is not None else "http"
        host = self.settings.host if ":" not in self.settings.host else f"[{self.settings.host}]"
        return f"{scheme}://{host}:{self.port}"

    def start(self, server: Any) -> None:
        root = Path(server.config.storage.root)
        if self.metrics is not None:
            self.metrics.attach(lambda: server.spool.ledger if server.spool is not None else None, root,
                                lambda: server.models)
        self.context = AdminContext(server, tokens=Tokens(self.settings.token_file), audit=Audit(root / AUDIT_FILE),
                                    metrics=self.metrics)
        app = create_app(self.context)
        tls = self.settings.tls
        config = uvicorn.Config(app, host=self.settings.host, port=self.settings.port, log_config=None, log_level="warning",
                                access_log=False, lifespan="off", server_header=False,
                                ssl_certfile=str(tls.cert) if tls else None, ssl_keyfile=str(tls.key) if tls else None)
        self._uvicorn = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="admin-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self._uvicorn.started:
            if self._error is not None or not self._thread.is_alive():
                raise RuntimeError(f"admin HTTP server on {self.settings.host}:{self.settings.port} did not start: "
                                   f"{self._error or 'see the log'}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"admin HTTP server on {self.settings.host}:{self.settings.port} did not start in time")
            time.sleep(0.02)
        if not self.context.tokens.configured:
            log.warning("admin.token_file is not set: the admin API is read-only (every change is refused)")
        log.info("admin API and web page on %s (OpenAPI at /docs, metrics at /metrics)", self.url)

    def _run(self) -> None:
        assert self._uvicorn is not None
        try:
            self._uvicorn.run()
        except BaseException as exc:  # SystemExit when the port is taken: report it to start()
            self._error = exc
        if not self._uvicorn.started and self._error is None:
            self._error = RuntimeError("the port could not be bound (taken, or needs privileges)")

    def stop(self) -> None:
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(10.0)
        self._uvicorn = self._thread = None
