"""The admin operations, one function each, shared by the HTTP API, the web page and the CLI.

They take the ledger and the config (and, for what only a running node knows, its resident models and
live destinations) and return plain JSON-able data. Nothing returned holds patient data: jobs are shown
by id and UIDs, instances by SOP Instance UID, and tag values a rule compares are hidden for the
attributes that identify a patient (:data:`HIDDEN`). A refused operation raises :class:`OpError` with the
HTTP status it maps to (404 unknown, 409 wrong state, 422 bad input) and a message that says why.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_dict

from dicomnode.assemble import series_from_files, series_from_job
from dicomnode.config import NodeConfig, Rule
from dicomnode.destinations import Destination, build_destination
from dicomnode.destinations.dicom import DicomSettings
from dicomnode.domain import Series
from dicomnode.ledger import DeliveryRecord, DeliveryState, JobRecord, JobState, Ledger
from dicomnode.route import CALLING_AET, decide, routing_keywords, rule_matches
from models.registry import ModelLoadError, read_card

__all__ = [
    "HIDDEN", "OpError", "cancel_job", "deliveries", "destinations", "echo", "explain", "gate_reason", "get_job", "job_view",
    "list_jobs", "models", "reprocess_job", "resend", "rule_test", "rule_test_files", "rule_test_job", "rules", "show_job",
]

# Attributes whose values a rule test never shows (they identify a patient or a person).
HIDDEN = frozenset({
    "PatientID", "OtherPatientIDs", "IssuerOfPatientID", "PatientBirthDate", "PatientBirthTime", "PatientAddress",
    "PatientTelephoneNumbers", "AccessionNumber", "StudyID", "MedicalRecordLocator", "PatientInsurancePlanCodeSequence",
    "InstitutionAddress", "PatientMotherBirthName", "MilitaryRank", "EthnicGroup", "PatientComments",
})


class OpError(Exception):
    """An admin operation that cannot be done: ``status`` is its HTTP status, the message says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _hidden(keyword: str) -> bool:
    if keyword in HIDDEN or keyword.startswith("Patient"):
        return True
    tag = keyword_dict.get(keyword)
    return tag is not None and dictionary_VR(tag) == "PN"


# --------------------------------------------------------------------------- jobs

GATE_REASONS = (("flat", "flat"), ("clipped", "clipped"), ("structure", "structure"), ("colour", "colour_cast"),
                ("surround", "surround"))


def gate_reason(text: str) -> str:
    """A quality-gate reason as a short label (its figures stripped): flat, clipped, structure, colour_cast, surround."""
    lowered = text.lower()
    for word, label in GATE_REASONS:
        if word in lowered:
            return label
    return "other"


def _gate(gate: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not gate:
        return None
    keep = ("passed", "measured", "failed", "worst", "thresholds", "destinations")
    view = {k: gate[k] for k in keep if k in gate}
    view["failures"] = [{"sop_instance_uid": f.get("sop_instance_uid"), "reasons": f.get("reasons", []),
                         "figures": f.get("figures", {})} for f in gate.get("failures") or []]
    return view


def job_view(job: JobRecord, counts: Mapping[str, Any] | None = None, progress: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One job as the API shows it: UIDs, routing, counts, per-stage seconds, quality-gate figures, progress."""
    details = job.details or {}
    view: dict[str, Any] = {
        "id": job.id, "state": str(job.state), "study_uid": job.study_uid, "series_uid": job.series_uid,
        "calling_aet": job.calling_aet, "created_at": job.created_at, "last_received_at": job.last_received_at,
        "updated_at": job.updated_at, "action": job.action, "rule": job.rule, "model": job.model, "error": job.error,
        "attempts": job.attempts, "follow_up_of": job.follow_up_of, "purged": bool(job.purged), "retry_at": job.retry_at,
        "not_enhanced": job.not_enhanced, "timings": details.get("timings") or {}, "guidance_id": details.get("guidance_id"),
        "gate": _gate(details.get("gate")), "skipped": details.get("skipped") or [],
    }
    if counts is not None:
        view.update(instances=counts.get("instances", 0), bytes=counts.get("bytes", 0), outputs=counts.get("outputs", 0),
                    deliveries=dict(counts.get("deliveries") or {}))
    if progress is not None:
        view["progress"] = dict(progress)
    return view


def _state(value: str | None) -> JobState | None:
    if value in (None, "", "all"):
        return None
    try:
        return JobState(value)
    except ValueError:
        raise OpError(422, f"unknown job state {value!r} (states: {', '.join(s.value for s in JobState)})") from None


def list_jobs(ledger: Ledger, state: str | None = None, page: int = 1, per_page: int = 50,
              progress: Mapping[int, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Jobs newest first, ``per_page`` at a time, optionally of one state; with the total for paging."""
    which = _state(state)
    page, per_page = max(1, int(page)), min(max(1, int(per_page)), 500)
    counts = ledger.counts()["jobs"]
    total = counts.get(str(which), 0) if which is not None else sum(counts.values())
    jobs = ledger.jobs(which, limit=per_page, offset=(page - 1) * per_page, newest_first=True)
    per_job = ledger.job_counts([j.id for j in jobs])
    progress = progress or {}
    return {"total": total, "page": page, "per_page": per_page, "state": str(which) if which else None,
            "items": [job_view(j, per_job.get(j.id), progress.get(j.id)) for j in jobs]}


def get_job(ledger: Ledger, job_id: int) -> JobRecord:
    job = ledger.job(int(job_id))
    if job is None:
        raise OpError(404, f"no job {job_id} in the ledger")
    return job


def show_job(ledger: Ledger, job_id: int, progress: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One job with its instances (SOP Instance UIDs and routing), outputs and deliveries."""
    job = get_job(ledger, job_id)
    view = job_view(job, ledger.job_counts([job.id]).get(job.id), progress)
    view["instance_list"] = [{"id": i.id, "sop_uid": i.sop_uid, "sop_class_uid": i.sop_class_uid, "size": i.size,
                              "received_at": i.received_at, "routed": i.routed, "on_disk": i.path.is_file()}
                             for i in ledger.instances(job.id)]
    view["output_list"] = [p.name for p in ledger.outputs(job.id)]
    view["delivery_list"] = [_delivery(d) for d in ledger.deliveries(job_id=job.id)]
    return view


def reprocess_job(ledger: Ledger, job_id: int) -> dict[str, Any]:
    """A finished job (done, failed, gated), or one waiting after a storage fault, queued to run again from its
    spooled sources with the current config; outputs already sent are not sent again."""
    job = get_job(ledger, job_id)
    missing = [i.path.name for i in ledger.instances(job.id) if not i.path.is_file()]
    if job.purged or missing:
        why = "purged by retention" if job.purged else f"{len(missing)} of its source files are missing"
        raise OpError(409, f"job {job.id} cannot be reprocessed: {why}; send the series again")
    if not ledger.reprocess(job.id):
        raise OpError(409, f"job {job.id} is {job.state}: only done, failed or gated jobs, or jobs waiting after a "
                           "storage fault, can be reprocessed")
    return {"job": job.id, "was": str(job.state), "state": str(JobState.COMPLETE),
            "message": f"job {job.id} (was {job.state}) queued to be processed again from its spooled sources"}


def cancel_job(ledger: Ledger, job_id: int, who: str = "admin") -> dict[str, Any]:
    """A job not being processed stops: collecting, waiting or gated jobs fail, a derived job's pending
    deliveries are dead-lettered (``resend`` brings them back)."""
    job = get_job(ledger, job_id)
    reason = f"cancelled by {who}"
    was = ledger.cancel_job(job.id, reason)
    if was is None:
        now = "is being processed: cancel it once it has finished" if job.state == JobState.PROCESSING else \
            f"is {job.state} already"
        raise OpError(409, f"job {job.id} {now}")
    return {"job": job.id, "was": str(was), "state": str(JobState.FAILED), "message": f"job {job.id} (was {was}) {reason}"}


# --------------------------------------------------------------------------- deliveries


def _delivery(d: DeliveryRecord) -> dict[str, Any]:
    return {"id": d.id, "job": d.job_id, "destination": d.destination, "state": str(d.state), "attempts": d.attempts,
            "file": Path(d.path).name, "next_attempt_at": d.next_attempt_at, "last_error": d.last_error,
            "sending_since": d.sending_since}


def deliveries(ledger: Ledger, state: str | None = None, destination: str | None = None, job: int | None = None,
               limit: int = 200) -> dict[str, Any]:
    """Deliveries (newest first, at most ``limit``) with the totals by destination and state."""
    if state not in (None, "", "all"):
        try:
            DeliveryState(state)
        except ValueError:
            raise OpError(422, f"unknown delivery state {state!r} (states: {', '.join(s.value for s in DeliveryState)})") from None
    rows = ledger.deliveries(job_id=job, state=state if state not in (None, "", "all") else None)
    if destination:
        rows = [d for d in rows if d.destination == destination]
    totals: dict[str, dict[str, int]] = {}
    for (dest, st), n in ledger.delivery_counts().items():
        totals.setdefault(dest, {})[st] = n
    return {"totals": totals, "count": len(rows), "items": [_delivery(d) for d in rows[::-1][:max(1, int(limit))]]}


def resend(ledger: Ledger, job: int | None = None, *, all_dead: bool = False, force: bool = False) -> dict[str, Any]:
    """Dead letters of one job (or all) back to pending; ``force``: a gated job's outputs queued anyway, once."""
    if job is None and not all_dead:
        raise OpError(422, "name a job, or ask for all dead letters")
    if force:
        if job is None:
            raise OpError(422, "force sends one gated job: name it")
        record = get_job(ledger, job)
        if record.state != JobState.GATED:
            raise OpError(409, f"job {record.id} is {record.state}, not gated: force only overrides the quality gate")
        targets = list(((record.details or {}).get("gate") or {}).get("destinations") or [])
        count = ledger.release_gated(record.id, targets)
        return {"job": record.id, "queued": count, "destinations": targets,
                "message": f"job {record.id}: {count} deliveries queued despite the quality gate "
                           f"({', '.join(targets) or 'no destination'})"}
    if job is not None:
        get_job(ledger, job)
    count = ledger.resend(None if all_dead else job)
    scope = "all jobs" if all_dead else f"job {job}"
    return {"job": None if all_dead else job, "queued": count,
            "message": f"{count} dead-lettered deliveries of {scope} back to pending"}


# --------------------------------------------------------------------------- rules


def _match_text(value: Any) -> Any:
    return {"regex": value.regex} if hasattr(value, "regex") else value


def rules(config: NodeConfig) -> dict[str, Any]:
    """The rules in the order they are tried, and what happens to a series none matches."""
    return {
        "rules": [{"index": i, "name": r.name, "match": {k: _match_text(v) for k, v in r.match.items()}, "model": r.model,
                   "destinations": list(r.destinations), "gate": r.gate.model_dump(mode="json"),
                   "action": "enhance" if r.model else "forward" if r.destinations else "ignore"}
                  for i, r in enumerate(config.rules)],
        "unmatched": config.unmatched.model_dump(mode="json"),
    }


def _seen(instances: Sequence[Mapping[str, Any]], key: str, calling_aet: str, limit: int = 5) -> list[str]:
    if _hidden(key):
        return ["(patient data: not shown)"]
    values: list[str] = []
    for tags in instances:
        raw = tags.get(key, calling_aet if key == CALLING_AET else None)
        text = "\\".join(map(str, raw)) if isinstance(raw, (list, tuple)) else ("" if raw is None else str(raw))
        if text not in values:
            values.append(text)
        if len(values) >= limit:
            break
    return values


def _why_not(rule: Rule, instances: Sequence[Mapping[str, Any]], calling_aet: str) -> list[dict[str, Any]]:
    """Per match key of a rule that matched no instance: how many instances that key alone matches, the values seen."""
    reasons = []
    for key, expected in rule.match.items():
        single = rule.model_copy(update={"match": {key: expected}})
        hits = sum(1 for tags in instances if rule_matches(single, tags, calling_aet))
        if hits < len(instances):
            reasons.append({"key": key, "expected": _match_text(expected), "instances_matching": hits,
                            "seen": _seen(instances, key, calling_aet)})
    if not reasons:
        reasons.append({"key": None, "expected": None, "instances_matching": 0,
                        "seen": ["each key matches some instance, but no instance matches every key at once"]})
    return reasons


def explain(config: NodeConfig, series: Series) -> dict[str, Any]:
    """The decision for one series and why each rule tried before the chosen one did not match."""
    instances = [i.tags for i in series.instances]
    decision = decide(config, instances, series.calling_aet)
    tried = []
    for rule in config.rules:
        if rule.name == decision.rule:
            tried.append({"rule": rule.name, "result": "chosen", "instances_matching": len(decision.matched)})
            break
        tried.append({"rule": rule.name, "result": "no match", "why": _why_not(rule, instances, series.calling_aet)})
    return {
        "study_uid": series.study_uid, "series_uid": series.series_uid, "modality": series.modality,
        "instances": len(instances), "calling_aet": series.calling_aet, "action": decision.action, "rule": decision.rule,
        "model": decision.model, "destinations": list(decision.destinations), "matched": len(decision.matched),
        "unmatched_policy": decision.rule is None, "rules_tried": tried,
    }


def rule_test(config: NodeConfig, series: Iterable[Series], skipped: Sequence[tuple[Path, str]] = ()) -> dict[str, Any]:
    return {"series": [explain(config, s) for s in series],
            "skipped": [{"file": Path(p).name, "reason": reason} for p, reason in skipped]}


def rule_test_files(config: NodeConfig, paths: Sequence[Path], calling_aet: str = "") -> dict[str, Any]:
    """The rule test on DICOM files (grouped into series as the receiver groups them)."""
    keywords = routing_keywords(config)
    series, skipped = series_from_files(paths, keywords, calling_aet, as_received=True)
    if not series and not skipped:
        raise OpError(422, "no DICOM file given")
    return rule_test(config, series, skipped)


def rule_test_job(config: NodeConfig, ledger: Ledger, job_id: int, calling_aet: str | None = None) -> dict[str, Any]:
    """The rule test on a job's spooled instances (its sender's AE title unless ``calling_aet`` is given)."""
    job = get_job(ledger, job_id)
    instances = ledger.instances(job.id)
    if job.purged or not any(i.path.is_file() for i in instances):
        raise OpError(409, f"job {job.id}: its source files are gone (purged by retention): test with files instead")
    series = series_from_job(job, instances, routing_keywords(config))
    if calling_aet is not None:
        series = Series(series.patient_key, series.study_uid, series.series_uid, series.instances, calling_aet, series.job_id)
    result = rule_test(config, [series])
    result["job"] = job.id
    return result


# --------------------------------------------------------------------------- destinations


def _destination_settings(settings: Any) -> dict[str, Any]:
    data = settings.model_dump(mode="json")
    if isinstance(settings, DicomSettings):
        data["tls"] = settings.tls is not None
    return data


def destinations(config: NodeConfig, ledger: Ledger | None = None) -> dict[str, Any]:
    """Each configured destination: its settings (TLS as yes/no) and its deliveries by state."""
    counts: dict[str, dict[str, int]] = {}
    if ledger is not None:
        for (dest, state), n in ledger.delivery_counts().items():
            counts.setdefault(dest, {})[state] = n
    items = [{"name": name, **_destination_settings(settings), "deliveries": counts.pop(name, {})}
             for name, settings in config.destinations.items()]
    return {"items": items, "unconfigured": counts}


def echo(config: NodeConfig, name: str, live: Mapping[str, Destination] | None = None) -> dict[str, Any]:
    """Check a destination: C-ECHO for a PACS (with its TLS and AE titles), a write check for a folder."""
    if name not in config.destinations:
        raise OpError(404, f"no destination {name!r} (configured: {', '.join(config.destinations) or 'none'})")
    dest = (live or {}).get(name) or build_destination(name, config.destinations[name], config.node.ae_title)
    started = time.perf_counter()
    try:
        ok, detail = dest.echo()
    except Exception as exc:  # a destination type whose check raises: still an answer
        ok, detail = False, f"{type(exc).__name__}: {exc}"
    return {"destination": name, "ok": bool(ok), "detail": detail, "seconds": round(time.perf_counter() - started, 3)}


# --------------------------------------------------------------------------- models


def _card(weights: Path | None, verify: bool) -> tuple[dict[str, Any] | None, str | None]:
    if weights is None:
        return None, None
    try:
        return read_card(Path(weights), verify=verify).to_dict(), None
    except ModelLoadError as exc:
        return None, str(exc)


def models(config: NodeConfig, resident: Any = None, *, verify: bool = False) -> dict[str, Any]:
    """Each configured model: kind, device, weights and card, guidance per modality; with ``resident`` (a running
    node's :class:`~dicomnode.resident.ResidentModels`) whether it loaded or why it failed, and the guidance caches it
    uses. ``verify`` checks each weights file against its card's sha256 (reads the whole file)."""
    items = []
    for name, mc in config.models.items():
        card, problem = _card(mc.weights, verify)
        item: dict[str, Any] = {
            "name": name, "kind": mc.kind, "device": mc.device, "batch_size": mc.batch_size,
            "weights": Path(mc.weights).name if mc.weights else None, "card": card,
            "rules": [r.name for r in config.rules if r.model == name],
            "guidance_configured": {k: Path(v).name for k, v in mc.guidance.items()},
        }
        if resident is not None:
            loaded = resident.models.get(name)
            item["status"] = "loaded" if loaded is not None else "failed"
            item["reason"] = resident.failures.get(name) if loaded is None else None
            if loaded is not None:
                item["device"] = loaded.device
                item["load_seconds"] = round(loaded.load_seconds, 2)
                item["guidance"] = {modality: {"id": g.id, "method": g.method, "references": g.n_refs, "created": g.created,
                                               "measurements": dict(g.measurements)} for modality, g in loaded.guidance.items()}
        else:
            item["status"] = "problem" if problem else "configured"
            item["reason"] = problem
        items.append(item)
    loaded_n = sum(1 for i in items if i["status"] == "loaded")
    return {"items": items, "loaded": loaded_n, "failed": sum(1 for i in items if i["status"] in ("failed", "problem"))}
