"""Turning pydantic's validation errors and cross-section checks into (key path, reason) lines.

The config schema (:mod:`dicomnode.config`) says what is valid; this module says what is wrong in
words an admin can act on: ``rules[0].destinations[1]: unknown destination 'pacs2' (did you mean
'pacs'?)``. Cross-section checks (a rule naming an undefined model, watermarks out of order) run on
the raw mapping, so they are reported together with the field errors in one pass; where they need a
default they read it from the schema, which defines every default once.
"""

from __future__ import annotations

import getpass
import importlib.util
import re
import socket
import ssl
import tempfile
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Union

from pydantic import BaseModel, ValidationError

from dicomnode.configtypes import did_you_mean

__all__ = ["ConfigError", "convert_errors", "cross_check", "dedupe", "document_order", "environment_problems"]


class ConfigError(ValueError):
    """A config file that cannot be used; ``errors`` lists every problem as (key path, reason)."""

    def __init__(self, errors: Sequence[tuple[str, str]], source: str | None = None) -> None:
        self.errors: list[tuple[str, str]] = list(errors)
        self.source = source
        head = f"invalid config {source}" if source else "invalid config"
        lines = [f"{head} ({len(self.errors)} problem{'s' if len(self.errors) != 1 else ''}):"]
        lines += [f"  {key}: {reason}" if key else f"  {reason}" for key, reason in self.errors]
        super().__init__("\n".join(lines))




def _format_loc(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _strip_annotated(annotation: Any) -> Any:
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _unwrap(annotation: Any) -> Any:
    """Strip Annotated/Optional layers to the type that shapes the data."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            args = [_strip_annotated(a) for a in typing.get_args(annotation) if a is not type(None)]
            models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            if len(args) == 1:
                annotation = args[0]
            elif models:
                return tuple(models)  # a union of models (destinations): chosen by the next loc part
            else:
                return annotation
        else:
            return annotation


def _model_at(root: type[BaseModel], loc: Sequence[Any]) -> type[BaseModel] | None:
    """The config model class found at ``loc`` (pydantic's error location), if any."""
    current: Any = root
    parts = list(loc)
    while parts:
        current = _unwrap(current)
        if isinstance(current, tuple):  # union of models, tagged by the next part
            tag = parts.pop(0)
            current = next((m for m in current if m.model_fields.get("type") and m.model_fields["type"].default == tag), None)
            if current is None:
                return None
            continue
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(parts.pop(0)))
            if field is None:
                return None
            current = field.annotation
            continue
        origin = typing.get_origin(current)
        if origin in (list, dict):
            parts.pop(0)
            current = typing.get_args(current)[-1]
            continue
        return None
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return current
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def convert_errors(exc: ValidationError, root: type[BaseModel], destination_types: Mapping[str, type[BaseModel]]) -> list[tuple[str, str]]:
    """pydantic errors of ``root`` as (key path, reason) lines."""
    out: list[tuple[str, str]] = []
    for err in exc.errors():
        loc = list(err["loc"])
        parent = _model_at(root, loc[:-1]) if err["type"] == "extra_forbidden" else None
        # Drop the destination schema tag pydantic inserts ("destinations.pacs.dicom.port").
        if len(loc) >= 3 and loc[0] == "destinations" and loc[2] in destination_types:
            del loc[2]
        is_key = bool(loc) and loc[-1] == "[key]"
        if is_key:
            loc = loc[:-1]
        kind = err["type"]
        message = err["msg"]
        if message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        if kind == "extra_forbidden":
            key = str(loc[-1])
            allowed = list(parent.model_fields) if parent else []
            message = f"unknown key {key!r}{did_you_mean(key, allowed)}"
            if allowed:
                message += f" (allowed: {', '.join(allowed)})"
        elif kind == "missing":
            message = "required key is missing"
        elif kind == "union_tag_invalid":
            message = "type must be one of " + ", ".join(repr(t) for t in destination_types)
        elif kind in {"literal_error", "enum"}:
            message = f"{message} (got {_short(err.get('input'))})"
        elif kind.endswith("_type") or kind.endswith("_parsing") or kind.startswith("greater") or kind.startswith("less"):
            given = err.get("input")
            if not isinstance(given, (dict, list)):
                message = f"{message} (got {_short(given)})"
        out.append((_format_loc(loc), message))
    return out


def cross_check(data: Mapping[str, Any], root: type[BaseModel]) -> list[tuple[str, str]]:
    """Checks across sections, done on the raw data so they are reported with field errors."""
    errors: list[tuple[str, str]] = []

    def names(section: str) -> list[str]:
        value = data.get(section)
        return [str(k) for k in value] if isinstance(value, Mapping) else []

    dest_names, model_names = names("destinations"), names("models")

    def check_destinations(key: str, value: Any) -> None:
        if not isinstance(value, list):
            return
        for i, name in enumerate(value):
            if isinstance(name, str) and name in value[:i]:
                errors.append((f"{key}[{i}]", f"destination {name!r} is listed twice (it would receive everything twice)"))
            elif isinstance(name, str) and name not in dest_names:
                known = ", ".join(dest_names) if dest_names else "none defined"
                errors.append((f"{key}[{i}]", f"unknown destination {name!r}{did_you_mean(name, dest_names)} (known: {known})"))

    rules = data.get("rules")
    if rules is None or (isinstance(rules, list) and not rules):
        errors.append(("rules", "at least one rule is needed (a rule with an empty match is a catch-all)"))
    if isinstance(rules, list):
        seen: dict[str, int] = {}
        catch_all: int | None = None
        for i, rule in enumerate(rules):
            if not isinstance(rule, Mapping):
                continue
            if catch_all is not None:
                errors.append((f"rules[{i}]", f"can never match: rules[{catch_all}] before it has an empty match "
                               "and takes every series (move the catch-all last)"))
            elif rule.get("match", {}) == {}:
                catch_all = i
            name = rule.get("name")
            if isinstance(name, str):
                if name in seen:
                    errors.append((f"rules[{i}].name", f"duplicate rule name {name!r} (also rules[{seen[name]}])"))
                seen.setdefault(name, i)
            model = rule.get("model")
            if isinstance(model, str) and model not in model_names:
                known = ", ".join(model_names) if model_names else "none defined"
                errors.append((f"rules[{i}].model", f"unknown model {model!r}{did_you_mean(model, model_names)} (known: {known})"))
            dests = rule.get("destinations")
            check_destinations(f"rules[{i}].destinations", dests)
            if isinstance(model, str) and (dests is None or (isinstance(dests, list) and not dests)):
                errors.append((f"rules[{i}].destinations", "an enhancing rule needs at least one destination"))

    unmatched = data.get("unmatched")
    if isinstance(unmatched, Mapping):
        check_destinations("unmatched.destinations", unmatched.get("destinations"))
        if unmatched.get("action") == "forward" and not unmatched.get("destinations"):
            errors.append(("unmatched.destinations", "action 'forward' needs at least one destination"))

    storage = data.get("storage")
    if isinstance(storage, Mapping):
        high = storage.get("disk_high_watermark_percent", _default(root, "storage", "disk_high_watermark_percent"))
        low = storage.get("disk_low_watermark_percent", _default(root, "storage", "disk_low_watermark_percent"))
        if _is_number(high) and _is_number(low) and not low < high:
            errors.append(("storage.disk_low_watermark_percent", f"must be below disk_high_watermark_percent ({low} >= {high})"))

    dispatch = data.get("dispatch")
    if isinstance(dispatch, Mapping):
        initial = dispatch.get("backoff_initial_seconds", _default(root, "dispatch", "backoff_initial_seconds"))
        maximum = dispatch.get("backoff_max_seconds", _default(root, "dispatch", "backoff_max_seconds"))
        if _is_number(initial) and _is_number(maximum) and maximum < initial:
            errors.append(("dispatch.backoff_max_seconds", f"must not be below backoff_initial_seconds ({maximum} < {initial})"))

    node = data.get("node")
    if isinstance(node, Mapping) and isinstance(node.get("tls"), Mapping):
        tls = node["tls"]
        if tls.get("require_client_cert") is True and not tls.get("ca"):
            errors.append(("node.tls.ca", "require_client_cert needs a ca to verify client certificates"))

    destinations = data.get("destinations")
    if isinstance(destinations, Mapping):
        for name, dest in destinations.items():
            tls = dest.get("tls") if isinstance(dest, Mapping) else None
            if isinstance(tls, Mapping) and bool(tls.get("cert")) != bool(tls.get("key")):
                errors.append((f"destinations.{name}.tls", "cert and key must be given together"))
    return errors


def _default(root: type[BaseModel], section: str, key: str) -> Any:
    """The schema's default of ``section.key`` (defined once, in the model)."""
    model = _model_at(root, [section])
    return model.model_fields[key].default if model is not None else None


def document_order(item: tuple[str, str], root: type[BaseModel]) -> tuple[int, int]:
    """Sort key: section order of the schema, then list index (rules[2] before rules[10])."""
    key = item[0]
    section = re.split(r"[.\[]", key, maxsplit=1)[0]
    sections = list(root.model_fields)
    first_index = re.match(r"^\w+\[(\d+)\]", key)
    return (sections.index(section) if section in sections else -1, int(first_index.group(1)) if first_index else -1)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def dedupe(errors: list[tuple[str, str]]) -> list[tuple[str, str]]:
    seen: set[tuple[str, str]] = set()
    out = []
    for item in errors:
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out


# --------------------------------------------------------------------------- checks on this machine


def environment_problems(config: Any) -> list[tuple[str, str]]:
    """What only the machine can tell about a valid config, as (key path, reason): TLS keys that do not
    belong to their certificates, a bind address that is not this host's, folders and files the node
    could not write. Files that do not exist are left to ``NodeConfig.missing_files``."""
    problems: list[tuple[str, str]] = []
    tls = config.node.tls
    if tls is not None:
        problems += _key_pair("node.tls", tls.cert, tls.key)
    for name, dest in config.destinations.items():
        dest_tls = getattr(dest, "tls", None)
        if dest_tls is not None and dest_tls.cert is not None and dest_tls.key is not None:
            problems += _key_pair(f"destinations.{name}.tls", dest_tls.cert, dest_tls.key)
    problems += _bind_address("node.host", config.node.host)
    problems += _writable("storage.root", Path(config.storage.root), folder=True)
    if config.logging.file is not None:
        problems += _writable("logging.file", Path(config.logging.file), folder=False)
    if getattr(getattr(config, "executor", None), "kind", "local") == "ray" and importlib.util.find_spec("ray") is None:
        problems.append(("executor.kind", "ray needs the Ray package on this node: pip install 'dicomnode[ray]'"))
    return problems


def _key_pair(prefix: str, cert: Path, key: Path) -> list[tuple[str, str]]:
    if not Path(cert).is_file() or not Path(key).is_file():
        return []
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        ctx.load_cert_chain(str(cert), str(key), password=lambda: b"")  # never prompt on the terminal
    except ssl.SSLError as exc:
        text = f"{exc.reason or ''} {exc}"
        if "KEY_VALUES_MISMATCH" in text or "key values mismatch" in text:
            return [(f"{prefix}.key", f"the private key {key} does not belong to the certificate {cert}")]
        if "BAD_DECRYPT" in text or "bad decrypt" in text:
            return [(f"{prefix}.key", f"{key} is encrypted; the node needs an unencrypted key (mode 0600)")]
        return [(f"{prefix}.cert", f"cannot load the certificate {cert} with the key {key}: {exc.reason or exc}")]
    except OSError as exc:
        return [(f"{prefix}.key", f"cannot read {key} or {cert}: {exc.strerror or exc}")]
    return []


def _bind_address(key: str, host: str) -> list[tuple[str, str]]:
    try:
        infos = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return [(key, f"{host!r} is neither an IP address nor a name this host resolves ({exc.strerror})")]
    family, kind, proto, _name, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        try:
            probe.bind(address)  # port 0: only the address is checked (the node may be running on its port)
        except OSError as exc:
            return [(key, f"{host} ({address[0]}) is not an address of this host: {exc.strerror or exc}")]
    return []


def _writable(key: str, path: Path, *, folder: bool) -> list[tuple[str, str]]:
    """Probe by writing (permission bits say nothing about root, read-only mounts or full quotas)."""
    who = f"checked as user {getpass.getuser()}; run check-config as the service's user"
    if path.exists():
        if folder != path.is_dir():
            return [(key, f"{path} is {'a file' if folder else 'a folder'}, not {'a folder' if folder else 'a file'}")]
        try:
            if folder:
                tempfile.TemporaryFile(dir=path).close()
            else:
                with path.open("ab"):
                    pass
        except OSError as exc:
            return [(key, f"{path} is not writable: {exc.strerror or exc} ({who})")]
        return []
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return [(key, f"cannot create {path}: {parent} is not a folder")]
    try:
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as exc:
        return [(key, f"cannot create {path}: {parent} is not writable: {exc.strerror or exc} ({who})")]
    return []
