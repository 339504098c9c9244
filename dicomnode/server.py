"""The running node: wiring only. The stages do the work; this module starts them in threads.

Threads and why:

* the pynetdicom SCP (:mod:`dicomnode.receive`, one thread per association) only lands bytes and
  records them, so C-ECHO and C-STORE keep being answered while a model works;
* one assembler (:mod:`dicomnode.assemble`) turns quiet series into jobs;
* ``node.workers`` workers claim complete jobs and run each through :class:`dicomnode.pipeline.Pipeline`
  (torch releases the GIL during inference, so the SCP is not starved);
* one dispatch worker per destination (:mod:`dicomnode.dispatch`), so a stalled PACS delays only its
  own deliveries;
* one housekeeper applies retention.

Every hand-over is a ledger state change, so a restart (after SIGTERM, a crash or a power cut)
resumes from the ledger: ``processing`` jobs are redone (outputs are deterministic), complete jobs
are processed, pending deliveries are sent. SIGTERM/SIGINT drain: stop accepting associations,
let open ones finish, let each worker finish its current job and each dispatch worker the file it
is sending, then close. A transfer still in flight a few seconds before the drain ends (a stalled
PACS) is cut, so the process ends within ``drain_seconds``; every thread is a daemon and every join
is bounded, so nothing left over can hold the exit.

Faults a job cannot help: a job found ``processing`` at start for the ``node.max_job_attempts``-th time
(the node died during each of its claims: a poison series) is failed and its sources quarantined
instead of being redone; a full disk (``storage.disk_high_watermark_percent`` on the output folder, or
ENOSPC/EDQUOT while writing) sends the job back to wait ``storage.disk_full_retry_seconds``. A worker
exception fails its job only: the receiver and the dispatchers run in other threads.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from dicomnode import reconfig, retention
from dicomnode.assemble import Assembler, series_from_job
from dicomnode.config import ConfigError, NodeConfig
from dicomnode.destinations import Destination, build_destination
from dicomnode.dispatch import Dispatcher
from dicomnode.domain import SeriesOutcome
from dicomnode.executor import load_models
from dicomnode.ledger import JobRecord, JobState
from dicomnode.netconfig import configure
from dicomnode.observe import ObservedDestination, Observer, ProgressBoard
from dicomnode.pipeline import Pipeline, StorageFull, out_of_space
from dicomnode.receive import Receiver
from dicomnode.receivers import ProcessReceivers
from dicomnode.resident import ResidentModels
from dicomnode.route import decide, routing_keywords
from dicomnode.spool import Spool, SpoolError
from models.registry import EnhancerUnavailable

log = logging.getLogger(__name__)


@dataclass
class ServerOptions:
    """Knobs that are not site configuration (tests and benchmarks tune them)."""

    drain_seconds: float = 30.0  # how long SIGTERM waits for open associations and running jobs
    dispatch_poll_seconds: float = 1.0
    retention_interval_seconds: float = retention.SWEEP_INTERVAL_SECONDS
    # How a receiving child process (node.receive_processes > 1) sets up its logging; picklable (spawn).
    receive_logging: Callable[[NodeConfig], None] | None = None


class Addon(Protocol):
    """Something that runs with the node (the admin HTTP server): started once the node is up, stopped first."""

    def start(self, server: Server) -> None: ...

    def stop(self) -> None: ...


def _frames(tags: Any) -> int:
    """NumberOfFrames from an instance's header tags (1 when absent or unreadable)."""
    try:
        return max(1, int(str(tags.get("NumberOfFrames") or 1)))
    except ValueError:
        return 1


def make_destinations(config: NodeConfig) -> dict[str, Destination]:
    """One Destination per configured name. TLS material is loaded now (fails at start-up)."""
    return {name: build_destination(name, settings, config.node.ae_title) for name, settings in config.destinations.items()}


class Server:
    """One node process. ``start`` returns once the port is open; ``stop`` drains; ``serve_forever`` blocks.

    ``destinations`` and ``models`` may be injected (tests); by default they are built from the config.
    """

    def __init__(
        self,
        config: NodeConfig,
        *,
        destinations: dict[str, Destination] | None = None,
        models: ResidentModels | None = None,
        options: ServerOptions | None = None,
        observer: Observer | None = None,
        addons: Sequence[Addon] = (),
        config_path: Path | None = None,
    ) -> None:
        self.config = config
        self.options = options or ServerOptions()
        self.observer = observer  # metrics: told of stores, processed jobs and sent batches
        self.addons = list(addons)  # started with the node, stopped first (the admin HTTP server)
        self.config_path = config_path  # what SIGHUP and reload() re-read (None: the embedded default)
        self.progress = ProgressBoard()  # frames done of the jobs being processed (log and admin API)
        self._reload_lock = threading.Lock()
        self._destinations = destinations
        self.models = models
        self.spool: Spool | None = None
        self.receiver: Receiver | ProcessReceivers | None = None
        self._stop = threading.Event()
        self._wake_workers = threading.Condition()
        self._wake_dispatch: list[threading.Event] = []
        self.pipeline: Pipeline | None = None
        self._threads: list[threading.Thread] = []
        self._dispatcher: Dispatcher | None = None
        self._running: dict[str, int] = {}  # worker thread name -> the job it processes now
        self._started = False
        self._lock_file: Any = None

    # -- life cycle --------------------------------------------------------------------------
    def start(self) -> None:
        cfg = self.config
        self.spool = Spool(cfg.storage.root)
        spool = self.spool
        self._lock_spool(spool)
        configure(spool.chunks)
        self._fail_poisoned(spool)
        interrupted = len(spool.ledger.sending())
        redo = spool.ledger.recover()
        retry = spool.ledger.retry_pending_now()
        stale = spool.clean_incoming()
        counts = spool.ledger.counts()
        log.info(
            "spool %s: jobs %s, deliveries %s%s%s%s%s", spool.root, counts["jobs"] or "{}", counts["deliveries"] or "{}",
            f"; redoing interrupted jobs {redo}" if redo else "",
            f"; {interrupted} deliveries of a batch in flight when the node stopped (sent again; the file that was"
            " on the wire may reach its peer twice)"
            if interrupted else "",
            f"; {retry} pending deliveries due now" if retry else "",
            f"; removed {stale} unacknowledged partial files" if stale else "",
        )
        if self.models is None:
            self.models = load_models(cfg)
        for rule in cfg.rules:
            if rule.model is not None and rule.model in self.models.failures:
                log.error("rule %r cannot run: %s", rule.name, self.models.failures[rule.model])
        if self._destinations is None:
            self._destinations = make_destinations(cfg)
        if self.observer is not None:
            self._destinations = {n: ObservedDestination(d, self.observer) for n, d in self._destinations.items()}
        for destination in self._destinations.values():
            destination.resume()
        self.pipeline = Pipeline(cfg, self.models)
        self._dispatcher = Dispatcher(spool.ledger, self._destinations, cfg.dispatch)

        if cfg.node.receive_processes > 1:
            self.receiver = ProcessReceivers(cfg, cfg.node.receive_processes, observer=self.observer,
                                             setup_logging=self.options.receive_logging)
        else:
            self.receiver = Receiver(spool, cfg.node, cfg.storage)
            self.receiver.observer = self.observer
        assembler = Assembler(spool.ledger, cfg.node.series_quiet_seconds, on_complete=lambda _job: self._notify_workers())
        self._spawn("assemble", assembler.run, self._stop)
        for i in range(cfg.node.workers):
            self._spawn(f"worker-{i + 1}", self._worker_loop)
        for name in [*self._destinations, None]:  # one worker per destination; None: unconfigured ones
            self._spawn_dispatch(name)
        self._spawn("housekeeping", self._housekeeping_loop)
        try:
            self.receiver.start()
        except BaseException:  # port taken, TLS material unusable: stop the stages again, then report
            self._stop.set()
            self._notify_workers()
            self._wake_all_dispatch()
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
        for addon in self.addons:
            try:
                addon.start(self)
            except Exception as exc:  # the DICOM node matters more than its admin surface: keep serving
                log.error("%s could not start: %s", type(addon).__name__, exc)

    def _spawn_dispatch(self, name: str | None) -> None:
        assert self._dispatcher is not None
        wake = threading.Event()
        self._wake_dispatch.append(wake)
        self._spawn(f"dispatch-{name or 'orphans'}", self._dispatcher.run_destination, name, self._stop, wake,
                    self.options.dispatch_poll_seconds)

    def _fail_poisoned(self, spool: Spool) -> None:
        """Jobs the node died processing ``node.max_job_attempts`` times: failed, sources quarantined, queue moves on."""
        for job in spool.ledger.fail_poisoned(self.config.node.max_job_attempts):
            log.error("job %d series %s failed: %s", job.id, job.series_uid, job.error)
            for inst in spool.ledger.instances(job.id):
                try:
                    if inst.path.is_file():
                        spool.quarantine(inst.path, f"job {job.id}: {inst.path.name} is in a series whose processing "
                                                    f"crashed the node {job.attempts} times", keep_source=True)
                except OSError as exc:  # the ledger says failed already; a copy for inspection is a bonus
                    log.warning("cannot quarantine %s of job %d: %s", inst.path.name, job.id, exc)

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
        for addon in reversed(self.addons):
            try:
                addon.stop()
            except Exception:
                log.exception("%s did not stop cleanly", type(addon).__name__)
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
        self._wake_all_dispatch()
        assert self._dispatcher is not None
        self._dispatcher.stop()  # finish the file on the wire, start no other
        # A transfer still going near the end of the drain is cut, so its thread can end in time.
        abort_at = deadline - min(10.0, timeout / 3)  # room for the cut thread to record it and for the exit
        senders = [t for t in self._threads if t.name.startswith("dispatch-")]
        for thread in senders:
            thread.join(max(0.0, abort_at - time.monotonic()))
        if any(t.is_alive() for t in senders):
            log.warning("cutting transfers still in flight (%s); they are sent again at the next start",
                        ", ".join(t.name for t in senders if t.is_alive()))
            self._dispatcher.stop(abort=True)
        clean = True
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                clean = False
                log.warning("%s still busy at the end of the drain; the ledger resumes it on restart", thread.name)
        for name, job_id in list(self._running.items()):  # cut short by the drain, not by a crash: not an attempt
            try:
                if self.spool.ledger.release_job(job_id):
                    log.warning("job %d (%s) interrupted by the drain: redone at the next start", job_id, name)
            except Exception:  # the next start still recovers it, counting the claim
                log.exception("cannot release job %d", job_id)
        self.receiver.shutdown()
        if clean:
            self.spool.close()
        self._unlock_spool()
        self._started = False
        log.info("stopped %s", "cleanly" if clean else "with work left for the next start")
        return clean

    def serve_forever(self) -> int:
        """Start, block until SIGTERM/SIGINT, drain; SIGHUP re-reads the config (:meth:`reload`). Returns the exit code."""
        stop = threading.Event()
        hangup = threading.Event()

        def on_signal(signum: int, _frame: Any) -> None:
            log.info("received %s", signal.Signals(signum).name)
            (hangup if signum == signal.SIGHUP else stop).set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        try:
            self.start()
            while not stop.wait(0.5):
                if hangup.is_set():
                    hangup.clear()
                    try:
                        self.reload()
                    except Exception as exc:  # an invalid file changes nothing; the log says why
                        log.error("config not reloaded, nothing changed: %s", exc)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.stop()
        return 0

    # -- live configuration ------------------------------------------------------------------
    def reload(self, path: Path | None = None) -> reconfig.ReloadPlan:
        """Re-read the config file (``path``, default the one the node started with) and apply it.

        The whole file is checked first (:func:`dicomnode.reconfig.check`) and new or changed models are loaded
        and destinations built before anything is swapped: any problem raises ConfigError with its key and the
        node runs on unchanged. Then rules, models, destinations and the dispatch, derive, unmatched and retention
        settings take effect for the next job and the next batch; open associations and running jobs go on with
        what they started with. ``node``, ``admin`` and ``storage.root`` apply at the next start (the plan says so).
        """
        with self._reload_lock:
            new = reconfig.check(path or self.config_path)
            plan = reconfig.plan(self.config, new)
            cfg = plan.config
            assert self.models is not None and self._destinations is not None and self._dispatcher is not None
            fresh = load_models(cfg, only=plan.load_models) if plan.load_models else ResidentModels({}, {})
            if fresh.failures:
                raise ConfigError([(f"models.{name}", reason) for name, reason in fresh.failures.items()],
                                  source=str(path or self.config_path or "embedded default"))
            built: dict[str, Destination] = {}
            for name in plan.build_destinations:
                try:
                    built[name] = build_destination(name, cfg.destinations[name], cfg.node.ae_title)
                except Exception as exc:  # e.g. TLS material that does not load
                    raise ConfigError([(f"destinations.{name}", str(exc))]) from None
            if self.observer is not None:
                built = {n: ObservedDestination(d, self.observer) for n, d in built.items()}
            kept = {n: m for n, m in self.models.models.items() if n in cfg.models and n not in plan.load_models}
            failed = {n: r for n, r in self.models.failures.items() if n in cfg.models and n not in plan.load_models}
            models = ResidentModels({**kept, **fresh.models}, failed)
            self._dispatcher.policy = cfg.dispatch
            for name in plan.drop_destinations:  # pending deliveries to it dead-letter as "not configured", as at a start
                self._destinations.pop(name, None)
                self._dispatcher.destinations.pop(name, None)
            self._destinations.update(built)
            self._dispatcher.destinations.update(built)
            started = {t.name for t in self._threads}
            for name in built:
                if f"dispatch-{name}" not in started:
                    self._spawn_dispatch(name)
            self.models, self.pipeline, self.config = models, Pipeline(cfg, models), cfg
            log.warning("config reloaded from %s: %s%s", path or self.config_path or "the embedded default",
                        ", ".join(plan.changed) or "nothing changed",
                        f"; at the next start only: {', '.join(plan.restart_required)}" if plan.restart_required else "")
            self._wake_all_dispatch()
            return plan

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

    def _wake_all_dispatch(self) -> None:
        for wake in self._wake_dispatch:
            wake.set()

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
            worker = threading.current_thread().name
            self._running[worker] = job.id
            try:
                self.process_job(job)
            except Exception as exc:  # one bad job must not stop the worker
                if isinstance(exc, StorageFull) or out_of_space(exc) is not None:
                    self._defer(job, exc)
                elif isinstance(exc, EnhancerUnavailable):  # no live executor worker: the series waits, whole
                    delay = self.config.executor.retry_seconds
                    self.spool.ledger.defer_job(job.id, f"waiting for the executor: {exc}"[:2000], delay)
                    log.error("job %d series %s: %s; retrying in %.0f s", job.id, job.series_uid, exc, delay)
                else:
                    log.exception("job %d failed", job.id)
                    self.spool.ledger.set_job_state(job.id, JobState.FAILED, error=f"{exc.__class__.__name__}: {exc}"[:2000])
            finally:
                self._running.pop(worker, None)
            log.info("job %d processed in %.2f s", job.id, time.perf_counter() - started)
            self._wake_all_dispatch()

    def _defer(self, job: JobRecord, exc: Exception) -> None:
        """A storage fault: the job waits ``storage.disk_full_retry_seconds`` and is retried (no quarantine, not done)."""
        assert self.spool is not None
        delay = self.config.storage.disk_full_retry_seconds
        cause = out_of_space(exc)
        reason = str(exc) if isinstance(exc, StorageFull) or cause is None else f"{errno.errorcode.get(cause.errno or 0)}: {cause}"
        when = time.strftime("%H:%M:%S", time.localtime(time.time() + delay))
        self.spool.ledger.defer_job(job.id, f"waiting for disk space (retry at {when}): {reason}", delay)
        log.error("job %d series %s: storage fault, retrying in %.0f s (at %s): %s", job.id, job.series_uid, delay, when, reason)

    def process_job(self, job: JobRecord) -> SeriesOutcome:
        """Run one claimed job through the pipeline and record the outcome as one ledger transition."""
        assert self.spool is not None and self.pipeline is not None
        ledger = self.spool.ledger
        out_dir = self.spool.outgoing_dir(job.id)
        high = self.config.storage.disk_high_watermark_percent
        config, pipeline = self.config, self.pipeline  # one reload-consistent pair for this job
        series = series_from_job(job, ledger.instances(job.id), routing_keywords(config) | {"NumberOfFrames"})
        chosen = [series.instances[i] for i in decide(config, [i.tags for i in series.instances], series.calling_aet).matched]
        self.progress.start(job.id, series.series_uid, sum(_frames(i.tags) for i in chosen), len(chosen))
        try:
            outcome = pipeline.run(series, out_dir, check_space=lambda: Spool.too_full(out_dir, high),
                                   progress=lambda n: self.progress.instances(job.id, n),
                                   frames=lambda n: self.progress.frames(job.id, n))
        finally:
            self.progress.finish(job.id)
        if self.observer is not None:
            self.observer.processed(job.id, outcome)
        log.info("job %d series %s: %s by %s (%d of %d instances) -> %s", job.id, job.series_uid, outcome.action,
                 f"rule {outcome.rule!r}" if outcome.rule else "unmatched policy", len(outcome.matched),
                 len(series.instances), ", ".join(outcome.destinations) or "no destination")
        for src, reason in outcome.failed:  # a copy for inspection; nothing derived is sent from it
            if Path(src).is_file():
                self.spool.quarantine(Path(src), f"job {job.id}: {Path(src).name} not enhanced: {reason}", keep_source=True)
        if outcome.rule is None:
            ledger.record_unmatched(job, outcome.action)
        matched = {series.instances[i].ledger_id for i in outcome.matched}
        routed = ([i for i in matched if i is not None],
                  [inst.ledger_id for inst in series.instances if inst.ledger_id not in matched and inst.ledger_id is not None])
        details: dict[str, Any] = {"timings": {k: round(v, 3) for k, v in outcome.timings.items()},
                                   **({"guidance_id": outcome.guidance_id} if outcome.guidance_id else {})}
        if outcome.gate:
            details["gate"] = {**outcome.gate, "destinations": list(outcome.destinations)}
        if outcome.skipped:
            details["skipped"] = [{"file": Path(src).name, "reason": reason} for src, reason in outcome.skipped[:50]]
        common = {"action": outcome.action, "rule": outcome.rule, "model": outcome.model, "details": details, "routed": routed,
                  "not_enhanced": len(outcome.failed)}
        failures = "; ".join(f"{Path(src).name}: {reason}" for src, reason in outcome.failed)
        if outcome.action == "ignore":
            ledger.finish_job(job.id, JobState.DONE, **common)
        elif outcome.error is not None:
            ledger.finish_job(job.id, JobState.FAILED, error=outcome.error[:2000], **common)
            log.error("job %d failed: %s", job.id, outcome.error[:500])
        elif outcome.action == "forward":
            ledger.finish_job(job.id, JobState.DERIVED, outputs=outcome.outputs, output_kind="forward",
                              destinations=outcome.destinations, **common)
        elif not outcome.outputs:  # every instance below the minimum size: nothing to derive, nothing wrong
            ledger.finish_job(job.id, JobState.DONE, error=f"not enhanced: {outcome.skipped[0][1]}"[:2000], **common)
        elif outcome.held_back:
            assert outcome.gate is not None
            reasons = sorted({r for f in outcome.gate["failures"] for r in f["reasons"]})
            ledger.finish_job(job.id, JobState.GATED, outputs=outcome.outputs, destinations=(),
                              error=f"held back by the quality gate ({outcome.gate['failed']} of {outcome.gate['measured']}"
                                    f" instances): {'; '.join(reasons)}"[:2000], **common)
            log.warning("job %d series %s held back by the quality gate: %d of %d instances fail (%s); "
                        "`dicomnode resend --force --job %d` sends it anyway", job.id, job.series_uid, outcome.gate["failed"],
                        outcome.gate["measured"], "; ".join(reasons)[:500], job.id)
        else:
            if outcome.failed:
                log.warning("job %d: %d instances failed alone: %s", job.id, len(outcome.failed), failures[:500])
            ledger.finish_job(job.id, JobState.DERIVED, outputs=outcome.outputs, destinations=outcome.destinations,
                              error=f"{len(outcome.failed)} instances not enhanced: {failures}"[:2000] if outcome.failed else None,
                              **common)
        return outcome

    # -- housekeeping ------------------------------------------------------------------------
    def _housekeeping_loop(self) -> None:
        assert self.spool is not None
        while not self._stop.is_set():
            try:
                retention.sweep(self.config.storage, self.spool, outboxes=retention.outbox_folders(self.config))
            except Exception:
                log.exception("retention sweep failed; retrying at the next interval")
            self._stop.wait(self.options.retention_interval_seconds)
