"""The running node: receive -> spool -> assemble -> route -> enhance -> dispatch, in threads.

Threads and why:

* the pynetdicom SCP (one thread per association) only lands bytes and records them, so C-ECHO
  and C-STORE keep being answered while a model works;
* one assembler turns quiet series into jobs;
* ``node.workers`` workers claim complete jobs, route them and run the resident model (torch
  releases the GIL during inference, so the SCP is not starved);
* one dispatcher sends pending deliveries in batches (one association per destination batch),
  retries with exponential backoff and dead-letters after ``dispatch.max_attempts``;
* one housekeeper applies retention.

Every hand-over is a ledger state change, so a restart (after SIGTERM, a crash or a power cut)
resumes from the ledger: ``processing`` jobs are redone (outputs are deterministic), complete jobs
are processed, pending deliveries are sent. SIGTERM/SIGINT drain: stop accepting associations,
let open ones finish, let each worker finish its current job, then close.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode import retention, route
from dicomnode.assemble import Assembler
from dicomnode.config import NodeConfig
from dicomnode.receive import Receiver, ReceiveSettings
from dicomnode.resident import ModelUnavailable, ResidentModels
from dicomnode.spool import DeliveryRecord, JobRecord, Spool, SpoolError

log = logging.getLogger(__name__)

GuidanceFor = Callable[[str, "str | None"], "tuple[np.ndarray | None, str | None]"]


def no_guidance(model_name: str, modality: str | None) -> tuple[np.ndarray | None, str | None]:
    """The guidance hook when no cache is wired in: models run unguided."""
    return None, None


@dataclass
class ServerOptions:
    """Knobs that are not site configuration (tests and benchmarks tune them)."""

    drain_seconds: float = 30.0  # how long SIGTERM waits for open associations and running jobs
    dispatch_poll_seconds: float = 1.0
    retention_interval_seconds: float = retention.SWEEP_INTERVAL_SECONDS


class Server:
    """One node process. ``start`` returns once the port is open; ``stop`` drains; ``serve_forever`` blocks.

    ``guidance_for(model_name, modality) -> (vector | None, guidance_id | None)`` is the hook for
    the guidance cache; by default the resident models' cached guidance is used. ``destinations``
    and ``models`` may be injected (tests); by default they are built from the config.
    """

    def __init__(
        self,
        config: NodeConfig,
        *,
        guidance_for: GuidanceFor | None = None,
        destinations: dict[str, Any] | None = None,
        models: ResidentModels | None = None,
        options: ServerOptions | None = None,
    ) -> None:
        self.config = config
        self.options = options or ServerOptions()
        self._guidance_for = guidance_for
        self._destinations = destinations
        self.models = models
        self.spool: Spool | None = None
        self.receiver: Receiver | None = None
        self._stop = threading.Event()
        self._wake_workers = threading.Condition()
        self._wake_dispatch = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started = False
        self._lock_file: Any = None

    # -- life cycle --------------------------------------------------------------------------
    def start(self) -> None:
        from dicomnode import dispatch  # A3's module; imported here so status/resend never load it

        cfg = self.config
        self.spool = Spool(cfg.storage.root)
        spool = self.spool
        self._lock_spool(spool)
        redo = spool.ledger.recover()
        retry = spool.ledger.retry_pending_now()
        stale = spool.clean_incoming()
        counts = spool.ledger.counts()
        log.info(
            "spool %s: jobs %s, deliveries %s%s%s%s", spool.root, counts["jobs"] or "{}", counts["deliveries"] or "{}",
            f"; redoing interrupted jobs {redo}" if redo else "",
            f"; {retry} pending deliveries due now" if retry else "",
            f"; removed {stale} unacknowledged partial files" if stale else "",
        )
        if self.models is None:
            self.models = ResidentModels.load(cfg)
        for rule in cfg.rules:
            if rule.model is not None and rule.model in self.models.failures:
                log.error("rule %r cannot run: %s", rule.name, self.models.failures[rule.model])
        if self._guidance_for is None:
            self._guidance_for = self._resident_guidance
        if self._destinations is None:
            self._destinations = dispatch.make_destinations(cfg)

        self.receiver = Receiver(spool, ReceiveSettings.from_config(cfg))
        assembler = Assembler(spool.ledger, cfg.node.series_quiet_seconds, on_complete=lambda _job: self._notify_workers())
        self._spawn("assemble", assembler.run, self._stop)
        for i in range(cfg.node.workers):
            self._spawn(f"worker-{i + 1}", self._worker_loop)
        self._spawn("dispatch", self._dispatch_loop)
        self._spawn("housekeeping", self._housekeeping_loop)
        try:
            self.receiver.start()
        except BaseException:  # port taken, TLS material unusable: stop the stages again, then report
            self._stop.set()
            self._notify_workers()
            self._wake_dispatch.set()
            for thread in self._threads:
                thread.join(5.0)
            spool.close()
            self._unlock_spool()
            raise
        self._started = True
        self._notify_workers()
        log.info(
            "dicomnode %s up: %d rules, models loaded %s, failed %s, destinations %s",
            cfg.node.ae_title, len(cfg.rules), sorted(self.models.models), sorted(self.models.failures),
            sorted(self._destinations),
        )

    def _lock_spool(self, spool: Spool) -> None:
        """One serving node per spool: a second one would delete the first's in-flight files."""
        fd = os.open(spool.root / "serve.lock", os.O_RDWR | os.O_CREAT, 0o600)
        self._lock_file = os.fdopen(fd, "r+")  # held for the life of the node
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            self._lock_file = None
            spool.close()
            raise SpoolError(f"another `dicomnode serve` is using the spool {spool.root}") from None

    def _unlock_spool(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    @property
    def port(self) -> int:
        return self.receiver.port if self.receiver else self.config.node.port

    def stop(self, timeout: float | None = None) -> bool:
        """Drain and stop; True when every thread ended within ``timeout`` (default drain_seconds)."""
        if not self._started:
            return True
        timeout = self.options.drain_seconds if timeout is None else timeout
        deadline = time.monotonic() + timeout
        log.info("draining: no new associations; waiting up to %.0f s for open ones and running jobs", timeout)
        assert self.receiver is not None and self.spool is not None
        self.receiver.stop_accepting()
        if not self.receiver.drain(max(0.0, deadline - time.monotonic())):
            log.warning("associations still open at the end of the drain were aborted")
        log.info("receiver closed; stopping stages")
        self._stop.set()
        self._notify_workers()
        self._wake_dispatch.set()
        clean = True
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                clean = False
                log.warning("%s still busy at the end of the drain; the ledger resumes it on restart", thread.name)
        self.receiver.ae.shutdown()
        if clean:
            self.spool.close()
        self._unlock_spool()
        self._started = False
        log.info("stopped %s", "cleanly" if clean else "with work left for the next start")
        return clean

    def serve_forever(self) -> int:
        """Start, block until SIGTERM/SIGINT, drain. Returns the process exit code."""
        stop = threading.Event()

        def on_signal(signum: int, _frame: Any) -> None:
            log.info("received %s", signal.Signals(signum).name)
            stop.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            while not stop.wait(1.0):
                pass
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.stop()
        return 0

    def _spawn(self, name: str, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=self._guard, args=(name, target, *args), name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _guard(self, name: str, target: Callable[..., None], *args: Any) -> None:
        """A stage thread that dies would stall the node silently: log and restart its loop."""
        while not self._stop.is_set():
            try:
                target(*args)
                return
            except Exception:
                log.exception("%s thread failed; restarting it in 1 s", name)
                self._stop.wait(1.0)

    def _notify_workers(self) -> None:
        with self._wake_workers:
            self._wake_workers.notify_all()

    def _resident_guidance(self, model_name: str, modality: str | None) -> tuple[np.ndarray | None, str | None]:
        assert self.models is not None
        return self.models.guidance_for(model_name, modality)

    # -- workers -----------------------------------------------------------------------------
    def _worker_loop(self) -> None:
        assert self.spool is not None
        while not self._stop.is_set():
            job = self.spool.ledger.claim_job()
            if job is None:
                with self._wake_workers:
                    self._wake_workers.wait(0.5)
                continue
            started = time.perf_counter()
            try:
                self.process_job(job)
            except Exception as exc:  # one bad job must not stop the worker
                log.exception("job %d failed", job.id)
                self.spool.ledger.set_job(job.id, "failed", error=f"{exc.__class__.__name__}: {exc}"[:2000])
            log.info("job %d processed in %.2f s", job.id, time.perf_counter() - started)
            self._wake_dispatch.set()

    def process_job(self, job: JobRecord) -> None:
        """Route one complete series and produce its outputs and pending deliveries."""
        assert self.spool is not None and self.models is not None and self._guidance_for is not None
        ledger = self.spool.ledger
        cfg = self.config
        instances = ledger.instances(job.id)
        if not instances:
            ledger.set_job(job.id, "done", action="ignore", error="no instances")
            return
        keywords = route.routing_keywords(cfg) | {"Modality"}
        tags = [self._routing_tags(job.id, inst.path, keywords) for inst in instances]
        decision = route.decide(cfg, tags, job.calling_aet)
        chosen = [instances[i] for i in decision.matched]
        rest = [inst.id for i, inst in enumerate(instances) if i not in set(decision.matched)]
        ledger.mark_routed(job.id, [inst.id for inst in chosen], rest)
        log.info(
            "job %d series %s: %s by %s (%d of %d instances) -> %s", job.id, job.series_uid, decision.action,
            f"rule {decision.rule!r}" if decision.rule else "unmatched policy", len(chosen), len(instances),
            ", ".join(decision.destinations) or "no destination",
        )
        if decision.rule is None:
            ledger.record_unmatched(job, decision.action)
        if decision.action == "ignore":
            ledger.set_job(job.id, "done", action="ignore", rule=decision.rule)
            return
        if decision.action == "forward":
            ledger.record_outputs(
                job.id, [inst.path for inst in chosen], "forward", decision.destinations,
                action="forward", rule=decision.rule, model=None,
            )
            return

        assert decision.model is not None
        try:
            model = self.models.get(decision.model)
        except ModelUnavailable as exc:
            ledger.set_job(job.id, "failed", action="enhance", rule=decision.rule, model=decision.model, error=str(exc))
            log.error("job %d failed: %s", job.id, exc)
            return
        modality = next((str(tags[i].get("Modality") or "") for i in decision.matched), "") or None
        vector, guidance_id = self._guidance_for(decision.model, modality)
        enhancer = self.models.enhancer_for(decision.model, modality)
        if self._guidance_for == self._resident_guidance:
            # The gated enhancer already carries this modality's guidance record (including a
            # per-image nearest exemplar); passing the mean vector here would override that.
            vector = None
        from dicomnode import enhance  # imaging stack: imported by the first job that needs it

        out_dir = self.spool.outgoing_dir(job.id)
        result = enhance.enhance_series(
            [inst.path for inst in chosen], enhancer, self.derive_settings(), out_dir,
            guidance=vector, guidance_id=guidance_id, batch_size=model.batch_size,
        )
        failures = "; ".join(f"{Path(src).name}: {reason}" for src, reason in result.failed)
        for src, reason in result.failed:  # a copy for inspection; nothing derived is sent from it
            if Path(src).is_file():
                self.spool.quarantine(Path(src), f"job {job.id}: {Path(src).name} not enhanced: {reason}", keep_source=True)
        timing = ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items())
        if not result.outputs:
            ledger.set_job(
                job.id, "failed", action="enhance", rule=decision.rule, model=decision.model,
                error=f"no instance could be enhanced: {failures}"[:2000],
            )
            log.error("job %d: no output (%s)", job.id, failures)
            return
        if result.failed:
            log.warning("job %d: %d instances failed alone: %s", job.id, len(result.failed), failures)
        ledger.record_outputs(
            job.id, result.outputs, "derived", decision.destinations, action="enhance", rule=decision.rule,
            model=decision.model,
            error=f"{len(result.failed)} instances not enhanced: {failures}"[:2000] if result.failed else None,
        )
        log.info("job %d: %d outputs (%s)", job.id, len(result.outputs), timing)

    @staticmethod
    def _routing_tags(job_id: int, path: Path, keywords: set[str]) -> dict[str, Any]:
        """Header tags for routing; an unreadable header routes as "no tags" and fails alone later."""
        try:
            return route.routing_tags(path, keywords)
        except Exception as exc:  # the UIDs parsed on receive, yet the header is broken further on
            log.warning("job %d: cannot read routing tags of %s: %s", job_id, path.name, exc)
            return {}

    def derive_settings(self) -> Any:
        from dicomnode.derive import DeriveSettings

        cfg = self.config
        return DeriveSettings(
            **cfg.derive.model_dump(), node_ae_title=cfg.node.ae_title, config_hash=cfg.config_hash
        )

    # -- dispatch ----------------------------------------------------------------------------
    def _dispatch_loop(self) -> None:
        assert self.spool is not None
        ledger = self.spool.ledger
        while not self._stop.is_set():
            sent_any = self.dispatch_once()
            for job_id, state in ledger.settle_jobs():
                log.info("job %d %s", job_id, state)
            if sent_any:
                continue
            due = ledger.next_due_at()
            wait = self.options.dispatch_poll_seconds
            if due is not None:
                wait = min(wait, max(0.0, due - time.time()))
            self._wake_dispatch.wait(wait)
            self._wake_dispatch.clear()

    def dispatch_once(self) -> bool:
        """Send one batch per destination of the deliveries now due; False when nothing was due."""
        from dicomnode import dispatch

        assert self.spool is not None and self._destinations is not None
        ledger = self.spool.ledger
        policy = self.config.dispatch
        due = ledger.due_deliveries(limit=policy.batch_size * max(1, len(self._destinations)))
        if not due:
            return False
        by_dest: dict[str, list[DeliveryRecord]] = defaultdict(list)
        for d in due:
            if len(by_dest[d.destination]) < policy.batch_size:
                by_dest[d.destination].append(d)
        for name, batch in by_dest.items():
            if self._stop.is_set():
                break
            destination = self._destinations.get(name)
            if destination is None:
                for d in batch:
                    ledger.mark_failed(d.id, f"destination {name!r} is not configured", max_attempts=1, retry_in=0)
                continue
            outcomes = self._send(destination, [d.path for d in batch])
            ok = [d.id for d in batch if outcomes.get(str(d.path), (False, ""))[0]]
            ledger.mark_sent(ok)
            retrying = dead = 0
            for d in batch:
                success, detail = outcomes.get(str(d.path), (False, "no outcome returned for this file"))
                if success:
                    continue
                retry_in = dispatch.backoff_seconds(d.attempts + 1, policy)
                state = ledger.mark_failed(d.id, detail, max_attempts=policy.max_attempts, retry_in=retry_in)
                if state == "dead_letter":
                    dead += 1
                    log.error("delivery %d (job %d) to %s dead-lettered after %d attempts: %s",
                              d.id, d.job_id, name, d.attempts + 1, detail)
                else:
                    retrying += 1
            log.info("sent %d/%d to %s%s%s", len(ok), len(batch), name,
                     f"; {retrying} retry later" if retrying else "", f"; {dead} dead-lettered" if dead else "")
        return True

    @staticmethod
    def _send(destination: Any, paths: Sequence[Path]) -> dict[str, tuple[bool, str]]:
        try:
            outcomes = destination.send(list(paths))
        except Exception as exc:  # the contract says send never raises; a bug there must not lose state
            log.exception("destination %s raised", getattr(destination, "name", "?"))
            return {str(p): (False, f"{exc.__class__.__name__}: {exc}") for p in paths}
        result: dict[str, tuple[bool, str]] = {}
        for o in outcomes:
            status = f"status 0x{o.status:04X}: " if o.status is not None else ""
            result[str(o.path)] = (bool(o.ok), f"{status}{o.detail}")
        return result

    # -- housekeeping ------------------------------------------------------------------------
    def _housekeeping_loop(self) -> None:
        assert self.spool is not None
        while not self._stop.is_set():
            try:
                retention.sweep(self.config, self.spool)
            except Exception:
                log.exception("retention sweep failed; retrying at the next interval")
            self._stop.wait(self.options.retention_interval_seconds)
