"""`dicomnode serve | status | resend | reprocess`: run the node, inspect its ledger, re-queue dead letters,
gated jobs or whole jobs.

``status``, ``resend`` and ``reprocess`` only open the ledger (SQLite, WAL), so they work while ``serve`` runs
and never import torch. Everything printed or logged names studies, series and instances by UID,
never by patient name, ID or birth date.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import logging.handlers
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from dicomnode.cli.common import EXIT_CONFIG, config_or_exit, open_ledger, when
from dicomnode.config import NodeConfig
from dicomnode.ledger import DeliveryState, JobState, Ledger
from dicomnode.redact import escape_controls

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="run the DICOM node (C-STORE in, enhanced series out)")
    serve.add_argument("--config", type=Path, default=None, help="node configuration (YAML; default: the embedded default)")
    serve.set_defaults(func=cmd_serve)

    status = subparsers.add_parser("status", help="jobs by state, pending/dead-letter deliveries, unmatched series")
    status.add_argument("--config", type=Path, default=None, help="node configuration (YAML; default: the embedded default)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--limit", type=int, default=20, help="rows to list per section (default 20)")
    status.set_defaults(func=cmd_status)

    resend = subparsers.add_parser("resend", help="move dead-lettered deliveries back to pending; --force sends a gated job")
    resend.add_argument("--config", type=Path, default=None, help="node configuration (YAML; default: the embedded default)")
    which = resend.add_mutually_exclusive_group(required=True)
    which.add_argument("--job", type=int, help="only this job's dead letters")
    which.add_argument("--all-dead", action="store_true", help="every dead letter")
    resend.add_argument("--force", action="store_true",
                        help="with --job: send a job the quality gate held back (status lists them), once, as it is")
    resend.set_defaults(func=cmd_resend)

    reprocess = subparsers.add_parser(
        "reprocess", help="run a finished job (done, failed, gated) again from its spooled sources, or a waiting one now")
    reprocess.add_argument("--config", type=Path, default=None, help="node configuration (YAML; default: the embedded default)")
    reprocess.add_argument("--job", type=int, required=True, help="the job (status lists failed and waiting jobs)")
    reprocess.set_defaults(func=cmd_reprocess)


class EscapingFormatter(logging.Formatter):
    """One record, one line: control characters in the message (a UID with a newline from a faulty
    sender, an escape sequence) are written as escapes, so a logged value cannot forge log lines or
    drive the terminal of whoever reads the log. A traceback keeps its lines, each indented."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = escape_controls(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:  # noqa: N802 - logging's name
        return "\n".join("  " + escape_controls(line) for line in super().formatException(ei).splitlines())

    def formatStack(self, stack_info: str) -> str:  # noqa: N802 - logging's name
        return "\n".join("  " + escape_controls(line) for line in stack_info.splitlines())


def setup_logging(config: NodeConfig, verbose: int = 0) -> None:
    """Service logging from ``logging.level``/``logging.file``; -v on the command line lowers the level."""
    level = getattr(logging, config.logging.level)
    if verbose:
        level = min(level, logging.DEBUG if verbose > 1 else logging.INFO)
    fmt = EscapingFormatter("%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s")
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if config.logging.file is not None:
        Path(config.logging.file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.handlers.WatchedFileHandler(config.logging.file))
    for handler in handlers:
        handler.setFormatter(fmt)
        root.addHandler(handler)
    root.setLevel(level)
    # pynetdicom logs every PDU at INFO; keep its association chatter to warnings unless debugging.
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if verbose > 1 else logging.WARNING)


def _exit_without_stragglers(rc: int, grace: float = 2.0) -> int:
    """After the drain: a library thread that is not a daemon (pynetdicom's, one per association) and is
    still blocked would keep the process alive past the drain. Wait ``grace`` s for them, then leave
    without them (the ledger is consistent at every commit, as after a crash)."""
    deadline = time.monotonic() + grace
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon and t.is_alive()]
    if stuck:
        log.warning("exiting with threads still blocked after the drain: %s", ", ".join(stuck))
        logging.shutdown()
        os._exit(rc)
    return rc


def cmd_serve(args: argparse.Namespace) -> int:
    # Everything the node writes holds patient data: private to the service user (the ledger's
    # WAL files, derived objects, logs), whatever umask the shell had.
    os.umask(0o077)
    config = config_or_exit(args.config)
    setup_logging(config, getattr(args, "verbose", 0))
    missing = config.missing_files()
    weights = [(key, reason) for key, reason in missing if key.startswith("models.") and key.endswith(".weights")]
    for key, reason in weights:  # that model fails to load with the reason; the node serves its other rules
        log.error("%s: %s: the rules using this model fail until it is fixed", key, reason)
    missing = [item for item in missing if item not in weights]
    if missing:
        for key, reason in missing:
            log.error("%s: %s", key, reason)
        return EXIT_CONFIG
    from dicomnode.security import TLSConfigError
    from dicomnode.server import Server, ServerOptions  # heavy imports (torch via models) only for serve
    from dicomnode.spool import SpoolError

    addons, metrics = [], None
    if config.admin.enabled:
        from dicomnode.admin.metrics import Metrics
        from dicomnode.admin.service import AdminService

        metrics = Metrics()
        addons.append(AdminService(config.admin, metrics))
    try:
        options = ServerOptions(receive_logging=functools.partial(setup_logging, verbose=getattr(args, "verbose", 0)))
        server = Server(config, observer=metrics, addons=addons, config_path=args.config, options=options)
        return _exit_without_stragglers(server.serve_forever())
    except (TLSConfigError, SpoolError) as exc:
        log.error("cannot start: %s", exc)
        return EXIT_CONFIG
    except OSError as exc:  # e.g. the port is taken or needs privileges
        log.error("cannot start: listening on %s:%d failed: %s", config.node.host, config.node.port, exc)
        return 2


def collect_status(ledger: Ledger, limit: int = 20) -> dict[str, Any]:
    counts = ledger.counts()
    jobs = {str(state): counts["jobs"].get(str(state), 0) for state in JobState}
    pending = ledger.deliveries(state=DeliveryState.PENDING)
    dead = ledger.deliveries(state=DeliveryState.DEAD_LETTER)
    failed_jobs = ledger.jobs(JobState.FAILED)
    gated_jobs = ledger.jobs(JobState.GATED)
    waiting_jobs = [j for j in ledger.jobs(JobState.COMPLETE) if j.retry_at is not None]
    unmatched = ledger.unmatched_series()

    sending = ledger.sending()
    now = time.time()

    def delivery(d: Any) -> dict[str, Any]:
        return {"id": d.id, "job": d.job_id, "destination": d.destination, "attempts": d.attempts,
                "sop_file": Path(d.path).name, "next_attempt_at": d.next_attempt_at,
                "last_error": escape_controls(d.last_error) if d.last_error else d.last_error}

    return {
        "spool": str(ledger.path.parent),
        "jobs": jobs,
        "deliveries": {
            "pending": len(pending),
            "sent": counts["deliveries"].get(str(DeliveryState.SENT), 0),
            "dead_letter": len(dead),
            "pending_by_destination": dict(Counter(d.destination for d in pending)),
            "dead_letter_by_destination": dict(Counter(d.destination for d in dead)),
        },
        "dead_letters": [delivery(d) for d in dead[:limit]],
        "pending_deliveries": [delivery(d) for d in pending[:limit]],
        "retrying": [delivery(d) for d in pending if d.attempts][:limit],
        # a batch on its way now (or when the node stopped): since when, and for how long so far
        "sending": [{**delivery(d), "sending_since": d.sending_since, "age_seconds": round(now - d.sending_since, 1)}
                    for d in sending[:limit]],
        "failed_jobs": [
            {"job": j.id, "series_uid": j.series_uid, "rule": j.rule, "model": j.model, "error": j.error}
            for j in failed_jobs[-limit:]
        ],
        "gated_jobs": [
            {"job": j.id, "series_uid": j.series_uid, "rule": j.rule, "model": j.model, "error": j.error,
             "gate": {k: v for k, v in ((j.details or {}).get("gate") or {}).items() if k in ("measured", "failed", "worst", "failures")}}
            for j in gated_jobs[-limit:]
        ],
        "waiting_jobs": [  # deferred by a storage fault, retried automatically
            {"job": j.id, "series_uid": j.series_uid, "retry_at": j.retry_at, "error": j.error} for j in waiting_jobs[:limit]
        ],
        "unmatched_series": [
            {"job": r.job_id, "study_uid": r.study_uid, "series_uid": r.series_uid, "calling_aet": r.calling_aet,
             "action": r.action}
            for r in unmatched[-limit:]
        ],
        "unmatched_total": len(unmatched),
    }


def cmd_status(args: argparse.Namespace) -> int:
    config = config_or_exit(args.config)
    ledger = open_ledger(config)
    try:
        info = collect_status(ledger, args.limit)
    finally:
        ledger.close()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"spool: {info['spool']}")
    print("jobs:       " + ", ".join(f"{k} {v}" for k, v in info["jobs"].items()))
    d = info["deliveries"]
    print(f"deliveries: pending {d['pending']}, sent {d['sent']}, dead_letter {d['dead_letter']}")
    for name, n in sorted(d["pending_by_destination"].items()):
        print(f"  pending to {name}: {n}")
    if info["sending"]:
        print("sending now:")
        for x in info["sending"]:
            print(f"  #{x['id']} job {x['job']} -> {x['destination']} {x['sop_file']}: attempt {x['attempts'] + 1}, "
                  f"in progress for {x['age_seconds']:.0f} s (since {when(x['sending_since'])})")
    if info["retrying"]:
        print("pending (retrying):")
        for x in info["retrying"]:
            print(f"  #{x['id']} job {x['job']} -> {x['destination']}: attempt {x['attempts'] + 1} at "
                  f"{when(x['next_attempt_at'])}; last error: {x['last_error']}")
    if info["dead_letters"]:
        print("dead letters (dicomnode resend --job ID | --all-dead):")
        for x in info["dead_letters"]:
            print(f"  #{x['id']} job {x['job']} -> {x['destination']} {x['sop_file']} after {x['attempts']} "
                  f"attempts: {x['last_error']}")
    if info["failed_jobs"]:
        print("failed jobs:")
        for j in info["failed_jobs"]:
            print(f"  job {j['job']} series {j['series_uid']} rule {j['rule']} model {j['model']}: {j['error']}")
    if info["waiting_jobs"]:
        print("waiting to be retried after a storage fault (dicomnode reprocess --job ID retries one now):")
        for j in info["waiting_jobs"]:
            print(f"  job {j['job']} series {j['series_uid']} at {when(j['retry_at'])}: {j['error']}")
    if info["gated_jobs"]:
        print("held back by the quality gate (dicomnode resend --force --job ID sends one anyway):")
        for j in info["gated_jobs"]:
            worst = ", ".join(f"{k} {v}" for k, v in j["gate"].get("worst", {}).items())
            print(f"  job {j['job']} series {j['series_uid']} rule {j['rule']} model {j['model']}: {j['error']}")
            if worst:
                print(f"    worst figures: {worst}")
    print(f"unmatched series: {info['unmatched_total']}")
    for u in info["unmatched_series"]:
        print(f"  job {u['job']} study {u['study_uid']} series {u['series_uid']} from {u['calling_aet']}: "
              f"{u['action']}")
    return 0


def cmd_resend(args: argparse.Namespace) -> int:
    config = config_or_exit(args.config)
    ledger = open_ledger(config, write=True)
    try:
        job = ledger.job(args.job) if args.job is not None else None
        if args.job is not None and job is None:
            print(f"error: no job {args.job} in the ledger", file=sys.stderr)
            return 1
        if args.force:
            if job is None:
                print("error: --force sends one gated job: name it with --job ID", file=sys.stderr)
                return 2
            if job.state != JobState.GATED:
                print(f"error: job {job.id} is {job.state}, not gated: --force only overrides the quality gate", file=sys.stderr)
                return 1
            destinations = list(((job.details or {}).get("gate") or {}).get("destinations") or [])
            count = ledger.release_gated(job.id, destinations)
            log.warning("job %d series %s sent despite the quality gate (resend --force)", job.id, job.series_uid)
            print(f"job {job.id}: {count} deliveries queued despite the quality gate "
                  f"({', '.join(destinations) or 'no destination'}); a running node sends them within seconds")
            return 0
        count = ledger.resend(args.job if not args.all_dead else None)
    finally:
        ledger.close()
    scope = f"job {args.job}" if args.job is not None else "all jobs"
    print(f"{count} dead-lettered deliveries of {scope} back to pending; a running node sends them within seconds")
    return 0


def cmd_reprocess(args: argparse.Namespace) -> int:
    config = config_or_exit(args.config)
    ledger = open_ledger(config, write=True)
    try:
        job = ledger.job(args.job)
        if job is None:
            print(f"error: no job {args.job} in the ledger", file=sys.stderr)
            return 1
        missing = [i.path.name for i in ledger.instances(job.id) if not i.path.is_file()]
        if job.purged or missing:
            why = "purged by retention" if job.purged else f"{len(missing)} of its source files are missing"
            print(f"error: job {job.id} cannot be reprocessed: {why}; send the series again", file=sys.stderr)
            return 1
        if not ledger.reprocess(job.id):
            print(f"error: job {job.id} is {job.state}: only done, failed or gated jobs, or jobs waiting after a storage "
                  "fault, can be reprocessed", file=sys.stderr)
            return 1
    finally:
        ledger.close()
    log.warning("job %d series %s queued again (reprocess, was %s)", job.id, job.series_uid, job.state)
    print(f"job {job.id} (was {job.state}) queued to be processed again from its spooled sources; a running node starts "
          "it within a second. Outputs already sent are not sent again.")
    return 0
