"""`dicomnode jobs list | show | reprocess | cancel`, `dicomnode echo DEST`, `dicomnode models list`.

The same operations as the admin API (:mod:`dicomnode.admin.ops`), on the ledger and config directly, so
they work beside a running node (the ledger is SQLite in WAL mode; a running node picks a reprocessed job
up within a second) and without one. Changes are written to the admin audit log as ``cli:USER``. Nothing
printed names a patient: jobs by id, series by UID.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from pathlib import Path
from typing import Any

from dicomnode.admin import ops
from dicomnode.admin.auth import AUDIT_FILE, Audit
from dicomnode.cli.common import config_or_exit, open_ledger, when

__all__ = ["register", "register_models_list"]


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, help="node configuration (YAML; default: the embedded default)")


def register(subparsers: argparse._SubParsersAction) -> None:
    jobs = subparsers.add_parser("jobs", help="list, show, reprocess or cancel jobs (as the admin API does)")
    sub = jobs.add_subparsers(dest="jobs_command", metavar="ACTION")
    ls = sub.add_parser("list", help="jobs newest first: state, rule, model, counts, seconds")
    _config_arg(ls)
    ls.add_argument("--state", help="only jobs in this state (collecting, complete, processing, derived, done, failed, gated)")
    ls.add_argument("--limit", type=int, default=20, help="jobs per page (default 20)")
    ls.add_argument("--page", type=int, default=1, help="page, 1 = newest (default 1)")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=cmd_list)
    show = sub.add_parser("show", help="one job: UIDs, routing, per-stage seconds, quality gate, instances, deliveries")
    _config_arg(show)
    show.add_argument("job", type=int)
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(func=cmd_show)
    for name, helptext, func in (
        ("reprocess", "run a finished job (done, failed, gated) again from its spooled sources", cmd_reprocess),
        ("cancel", "stop a job that is not being processed (it fails; pending deliveries dead-letter)", cmd_cancel),
    ):
        p = sub.add_parser(name, help=helptext)
        _config_arg(p)
        p.add_argument("job", type=int)
        p.set_defaults(func=func)
    jobs.set_defaults(func=lambda args: (jobs.print_help(), 2)[1])

    echo = subparsers.add_parser("echo", help="check a destination: C-ECHO a PACS, or a write check of a folder")
    _config_arg(echo)
    echo.add_argument("destination", help="a destination name from the config")
    echo.set_defaults(func=cmd_echo)


def register_models_list(sub: argparse._SubParsersAction) -> None:
    """``dicomnode models list``, added by :mod:`dicomnode.cli.modelinfo` to its group."""
    p = sub.add_parser("list", help="configured models: kind, weights and card, guidance per modality, rules using each")
    _config_arg(p)
    p.add_argument("--verify", action="store_true", help="check each weights file against its card's sha256")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_models_list)


def _seconds(timings: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.2f}" for k, v in timings.items() if k != "total") + (
        f" = {timings['total']:.2f} s" if "total" in timings else "")


def cmd_list(args: argparse.Namespace) -> int:
    config = config_or_exit(args.config)
    ledger = open_ledger(config)
    try:
        listing = ops.list_jobs(ledger, args.state, args.page, args.limit)
    except ops.OpError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    finally:
        ledger.close()
    if args.json:
        print(json.dumps(listing, indent=2))
        return 0
    print(f"{listing['total']} jobs{' ' + args.state if args.state else ''}; page {listing['page']}")
    print(f"{'job':>6}  {'state':<10} {'rule':<20} {'model':<16} {'in':>4} {'out':>4}  {'deliveries':<24} {'seconds':>8}  updated")
    for j in listing["items"]:
        deliveries = ", ".join(f"{k} {v}" for k, v in j["deliveries"].items()) or "-"
        total = j["timings"].get("total")
        print(f"{j['id']:>6}  {j['state']:<10} {(j['rule'] or '-'):<20} {(j['model'] or '-'):<16} {j['instances']:>4} "
              f"{j['outputs']:>4}  {deliveries:<24} {f'{total:.2f}' if total is not None else '-':>8}  {when(j['updated_at'])}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    config = config_or_exit(args.config)
    ledger = open_ledger(config)
    try:
        view = ops.show_job(ledger, args.job)
    except ops.OpError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    finally:
        ledger.close()
    if args.json:
        print(json.dumps(view, indent=2))
        return 0
    print(f"job {view['id']}: {view['state']}" + (f" (follows job {view['follow_up_of']})" if view["follow_up_of"] else ""))
    print(f"  study  {view['study_uid']}\n  series {view['series_uid']}\n  sender {view['calling_aet'] or '-'}")
    print(f"  rule {view['rule'] or '-'} -> model {view['model'] or '-'} ({view['action'] or 'not routed yet'}); "
          f"guidance {view['guidance_id'] or '-'}; attempts {view['attempts']}")
    print(f"  {view['instances']} instances in, {view['outputs']} outputs; deliveries "
          + (", ".join(f"{k} {v}" for k, v in view["deliveries"].items()) or "none"))
    print(f"  received {when(view['created_at'])} .. {when(view['last_received_at'])}; updated {when(view['updated_at'])}")
    if view["timings"]:
        print(f"  seconds: {_seconds(view['timings'])}")
    gate = view["gate"]
    if gate:
        worst = ", ".join(f"{k} {v}" for k, v in (gate.get("worst") or {}).items())
        print(f"  quality gate: {'passed' if gate.get('passed') else 'held back'} ({gate.get('failed', 0)} of "
              f"{gate.get('measured', 0)} instances fail); worst {worst}")
        for f in gate["failures"]:
            print(f"    {f['sop_instance_uid']}: {'; '.join(f['reasons'])}")
    for s in view["skipped"]:
        print(f"  not enhanced: {s['file']}: {s['reason']}")
    if view["error"]:
        print(f"  error: {view['error']}")
    for d in view["delivery_list"]:
        if d["state"] != "sent":
            print(f"  delivery {d['id']} -> {d['destination']}: {d['state']} after {d['attempts']} attempts"
                  + (f": {d['last_error']}" if d["last_error"] else ""))
    return 0


def _change(args: argparse.Namespace, action: str, work: Any) -> int:
    config = config_or_exit(args.config)
    ledger = open_ledger(config, write=True)
    audit = Audit(Path(config.storage.root) / AUDIT_FILE)
    who = f"cli:{getpass.getuser()}"
    try:
        result = work(ledger, who)
    except ops.OpError as exc:
        audit.record(who=who, peer="local", action=action, target={"job": args.job}, status=exc.status, result=exc.message)
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    finally:
        ledger.close()
    audit.record(who=who, peer="local", action=action, target={"job": args.job}, status=200, result=result["message"])
    print(result["message"] + ("; a running node starts it within a second (outputs already sent are not sent again)"
                               if action == "job.reprocess" else ""))
    return 0


def cmd_reprocess(args: argparse.Namespace) -> int:
    return _change(args, "job.reprocess", lambda ledger, _who: ops.reprocess_job(ledger, args.job))


def cmd_cancel(args: argparse.Namespace) -> int:
    return _change(args, "job.cancel", lambda ledger, who: ops.cancel_job(ledger, args.job, who))


def cmd_echo(args: argparse.Namespace) -> int:
    config = config_or_exit(args.config, files=True)
    try:
        result = ops.echo(config, args.destination)
    except ops.OpError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    print(f"{args.destination}: {'OK' if result['ok'] else 'FAILED'}: {result['detail']} ({result['seconds']:.2f} s)")
    return 0 if result["ok"] else 1


def cmd_models_list(args: argparse.Namespace) -> int:
    config = config_or_exit(args.config)
    listing = ops.models(config, verify=args.verify)
    if args.json:
        print(json.dumps(listing, indent=2))
        return 0
    if not listing["items"]:
        print("no models configured")
    for m in listing["items"]:
        card = m["card"] or {}
        print(f"{m['name']}: {m['kind']} on {m['device']}, batch {m['batch_size']}; rules: {', '.join(m['rules']) or 'none'}")
        if m["weights"]:
            described = f"{card.get('name') or '?'} version {card.get('version', '?')}" if card else "no usable card"
            sha = (card.get("weights_sha256") or "")[:12]
            checked = " (sha256 checked)" if args.verify and not m["reason"] else ""
            print(f"  weights {m['weights']}: {described}" + (f", sha256 {sha}…{checked}" if sha else ""))
        if m["reason"]:
            print(f"  PROBLEM: {m['reason']}")
        for modality, source in m["guidance_configured"].items():
            print(f"  guidance {modality}: {source}")
    print("(whether each model loaded in the running node: GET /api/models on its admin port, or its log)")
    return 1 if listing["failed"] else 0
