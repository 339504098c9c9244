"""Typed node configuration (YAML) with errors that name the key and say what is wrong.

The config is validated in one pass and *every* problem is reported at once, each as a key path
(``rules[0].destinations[1]``) and a reason, so an admin fixes a file in one round instead of one
error per restart. Unknown keys are errors (``extra="forbid"`` everywhere) with a did-you-mean,
because a misspelt optional key would otherwise be silently ignored and its default used.

Relative paths resolve against the folder of the config file, so a config works the same from any
working directory (systemd, containers, tests).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import string
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    Discriminator,
    Field,
    PlainSerializer,
    PrivateAttr,
    Tag,
    ValidationError,
    ValidationInfo,
)

__all__ = [
    "CALLING_AET_KEY",
    "ConfigError",
    "DerivePolicy",
    "DestinationConfig",
    "DicomDestinationConfig",
    "DispatchPolicy",
    "FolderDestinationConfig",
    "LoggingConfig",
    "MatchValue",
    "ModelConfig",
    "NodeConfig",
    "NodeSettings",
    "NodeTLSConfig",
    "RegexMatch",
    "Rule",
    "StorageConfig",
    "TLSClientConfig",
    "UnmatchedPolicy",
    "load_config",
    "parse_config",
]

CALLING_AET_KEY = "CallingAETitle"  # pseudo-keyword: the AE title of the sender, not a DICOM tag

# Value representations that cannot be compared with a string: sequences and bulk binary data.
_UNMATCHABLE_VRS = {"SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_AE_CHARS = set(string.printable) - set("\\\t\n\r\x0b\x0c")


class ConfigError(ValueError):
    """A config file that cannot be used; ``errors`` lists every problem as (key path, reason)."""

    def __init__(self, errors: Sequence[tuple[str, str]], source: str | None = None) -> None:
        self.errors: list[tuple[str, str]] = list(errors)
        self.source = source
        head = f"invalid config {source}" if source else "invalid config"
        lines = [f"{head} ({len(self.errors)} problem{'s' if len(self.errors) != 1 else ''}):"]
        lines += [f"  {key}: {reason}" if key else f"  {reason}" for key, reason in self.errors]
        super().__init__("\n".join(lines))


# --------------------------------------------------------------------------- field types


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    """Relative paths are relative to the config file's folder (passed as validation context)."""
    value = value.expanduser()
    base = (info.context or {}).get("base_dir")
    if not value.is_absolute() and base is not None:
        value = Path(base) / value
    return Path(os.path.normpath(Path(value).absolute()))


ConfigPath = Annotated[Path, AfterValidator(_resolve_path)]


def _check_ae_title(value: str) -> str:
    """DICOM AE title: 1-16 characters of the default repertoire, no backslash or control chars."""
    stripped = value.strip(" ")
    if not stripped:
        raise ValueError("AE title is empty")
    if len(stripped) > 16:
        raise ValueError(f"AE title {stripped!r} is {len(stripped)} characters long (at most 16)")
    bad = sorted({c for c in stripped if c not in _AE_CHARS})
    if bad:
        raise ValueError(f"AE title {stripped!r} contains {', '.join(repr(c) for c in bad)} (only printable ASCII, no backslash)")
    return stripped


def _number_to_str(value: Any) -> Any:
    """YAML reads an unquoted AE title such as 12345 as a number; it is still a title."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


AETitle = Annotated[str, BeforeValidator(_number_to_str), AfterValidator(_check_ae_title)]


def _check_port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError(f"port must be between 1 and 65535 (got {value})")
    return value


Port = Annotated[int, AfterValidator(_check_port)]


def _check_name(value: str) -> str:
    if not _NAME_RE.match(value):
        raise ValueError(f"name {value!r} must start with a letter or digit and use only letters, digits, '_', '.', '-'")
    return value


Name = Annotated[str, AfterValidator(_check_name)]


def _upper(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


def _did_you_mean(word: str, choices: Any, cutoff: float = 0.6) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=cutoff)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


# --------------------------------------------------------------------------- node


class NodeTLSConfig(_Strict):
    """TLS for the node's listening port (DICOM TLS, usually port 2762)."""

    cert: ConfigPath
    key: ConfigPath
    ca: ConfigPath | None = None  # CA bundle used to verify client certificates
    require_client_cert: bool = False


class NodeSettings(_Strict):
    ae_title: AETitle = "DICOMNODE"
    host: str = Field("0.0.0.0", min_length=1)
    port: Port = 11112
    series_quiet_seconds: float = Field(10.0, gt=0)
    max_associations: int = Field(10, ge=1)
    allowed_calling_aets: list[AETitle] = []  # empty = accept any sender
    require_called_aet: bool = True
    max_pdu_size: int = Field(0, ge=0)  # 0 = unlimited (fastest receive)
    max_object_bytes: ByteSize = Field(ByteSize(2 * 1024**3), gt=0)  # accepts 2147483648 or "2GiB"
    workers: int = Field(1, ge=1)
    tls: NodeTLSConfig | None = None


# --------------------------------------------------------------------------- storage


class StorageConfig(_Strict):
    root: ConfigPath = Path("./var")
    disk_high_watermark_percent: float = Field(90.0, gt=0, le=100)
    disk_low_watermark_percent: float = Field(85.0, gt=0, le=100)
    retention_days_delivered: float | None = Field(7.0, ge=0)  # None = keep forever
    retention_days_failed: float | None = Field(30.0, ge=0)


# --------------------------------------------------------------------------- destinations


class TLSClientConfig(_Strict):
    """TLS when the node connects to a peer: ``ca`` verifies the peer, ``cert``/``key`` identify us.

    Host names are not checked (peers are addressed by IP and AE title; trust comes from the CA
    chain, as in dcmtk): see :mod:`dicomnode.security`.
    """

    ca: ConfigPath | None = None  # None = the system's trusted CAs
    cert: ConfigPath | None = None
    key: ConfigPath | None = None


class DicomDestinationConfig(_Strict):
    """A DICOM peer (PACS) receiving by C-STORE."""

    type: Literal["dicom"] = "dicom"
    ae_title: AETitle
    host: str = Field(min_length=1)
    port: Port
    calling_ae_title: AETitle | None = None  # None = node.ae_title
    timeout_seconds: float = Field(30.0, gt=0)
    tls: TLSClientConfig | None = None


class FolderDestinationConfig(_Strict):
    """A folder (e.g. a share watched by another system); files are written atomically."""

    type: Literal["folder"] = "folder"
    folder: ConfigPath


def _destination_kind(value: Any) -> str:
    """Pick the destination schema: explicit ``type``, else ``folder`` present means a folder."""
    if isinstance(value, Mapping):
        explicit = value.get("type")
        if explicit in ("dicom", "folder"):
            return explicit
        return "folder" if "folder" in value else "dicom"
    if isinstance(value, (DicomDestinationConfig, FolderDestinationConfig)):
        return value.type
    return "dicom"


DestinationConfig = Annotated[
    Union[Annotated[DicomDestinationConfig, Tag("dicom")], Annotated[FolderDestinationConfig, Tag("folder")]],
    Discriminator(_destination_kind),
]
_DESTINATION_TAGS = {"dicom", "folder"}


# --------------------------------------------------------------------------- models


def _known_model_kinds() -> list[str]:
    from models.registry import BUILDERS  # numpy only; never torch

    return sorted(BUILDERS)


def _check_kind(value: str) -> str:
    kinds = _known_model_kinds()
    if value not in kinds:
        raise ValueError(f"unknown model kind {value!r}{_did_you_mean(value, kinds)} (known: {', '.join(kinds)})")
    return value


def _check_device(value: str) -> str:
    if not _DEVICE_RE.match(value):
        raise ValueError(f"device {value!r} is not one of auto, cpu, cuda, cuda:N, mps")
    return value


class ModelConfig(_Strict):
    kind: Annotated[str, AfterValidator(_check_kind)]
    weights: ConfigPath | None = None  # model card X.json must sit beside X.pt
    device: Annotated[str, AfterValidator(_check_device)] = "auto"
    batch_size: int = Field(4, ge=1)
    options: dict[str, Any] = {}  # passed to the model builder
    guidance: dict[str, ConfigPath] = {}  # Modality or "default" -> HQ reference folder or cache file


# --------------------------------------------------------------------------- rules


class RegexMatch(_Strict):
    """``{regex: PATTERN}``: the value must match PATTERN as a whole (``re.fullmatch``)."""

    regex: str
    _compiled: re.Pattern[str] = PrivateAttr()

    def model_post_init(self, __context: Any) -> None:
        self._compiled = re.compile(self.regex)

    @property
    def pattern(self) -> re.Pattern[str]:
        return self._compiled


MatchValue = Union[str, list[str], RegexMatch]


def _scalar_to_str(value: Any) -> str:
    # YAML turns NO/YES/ON/OFF into booleans: make the admin quote them rather than guess.
    if isinstance(value, bool):
        raise ValueError(f"got the boolean {str(value).lower()}; quote the value (YAML reads yes/no/on/off as booleans)")
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return value
    raise ValueError(f"expected a string, a list of strings or {{regex: PATTERN}}, got {type(value).__name__}")


def _parse_match_value(value: Any) -> MatchValue:
    if isinstance(value, RegexMatch):
        return value
    if isinstance(value, Mapping):
        extra = sorted(str(k) for k in value if k != "regex")
        if extra or "regex" not in value:
            raise ValueError(f"a mapping value must be {{regex: PATTERN}} (got keys: {', '.join(map(str, value)) or 'none'})")
        pattern = value["regex"]
        if not isinstance(pattern, str):
            raise ValueError(f"regex must be a string, got {type(pattern).__name__}")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"bad regex {pattern!r}: {exc}") from None
        return RegexMatch(regex=pattern)
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("an empty list matches nothing; list at least one value")
        return [_scalar_to_str(v) for v in value]
    if value is None:
        raise ValueError("no value given; use \"\" to match an empty or absent tag")
    return _scalar_to_str(value)


def _dump_match_value(value: MatchValue) -> Any:
    return {"regex": value.regex} if isinstance(value, RegexMatch) else value


MatchValueField = Annotated[
    MatchValue,
    BeforeValidator(_parse_match_value),
    PlainSerializer(_dump_match_value),
]


def _check_match_key(value: str) -> str:
    """A match key is a DICOM keyword from pydicom's dictionary or CallingAETitle."""
    if value == CALLING_AET_KEY:
        return value
    from pydicom.datadict import dictionary_VR, keyword_dict

    if value not in keyword_dict:
        hint = _did_you_mean(value, [*keyword_dict, CALLING_AET_KEY], cutoff=0.75)
        raise ValueError(f"unknown DICOM keyword {value!r}{hint}")
    vr = dictionary_VR(keyword_dict[value])
    if set(vr.split(" or ")) & _UNMATCHABLE_VRS:
        raise ValueError(f"{value} has VR {vr} (sequence or binary data) and cannot be matched as text")
    return value


MatchKey = Annotated[str, AfterValidator(_check_match_key)]


class Rule(_Strict):
    """Route series whose instances match every key to ``model`` (None = forward untouched).

    A rule with no model and no destinations drops the series it matches (e.g. localizers).
    """

    name: Name
    match: dict[MatchKey, MatchValueField] = {}  # empty = matches everything (a catch-all)
    model: str | None = None
    destinations: list[str] = []


class UnmatchedPolicy(_Strict):
    action: Literal["ignore", "forward"] = "ignore"
    destinations: list[str] = []


# --------------------------------------------------------------------------- derive / dispatch / logging


class DerivePolicy(_Strict):
    series_number_offset: int = Field(1000, ge=0, le=2**31 - 1)
    series_description_suffix: str = " [enhanced, not for diagnosis]"
    content_qualification: Annotated[Literal["RESEARCH", "PRODUCT", "SERVICE"], BeforeValidator(_upper)] = "RESEARCH"
    manufacturer: str = "dicomnode"
    institution_name: str | None = None


class DispatchPolicy(_Strict):
    max_attempts: int = Field(5, ge=1)
    backoff_initial_seconds: float = Field(2.0, gt=0)
    backoff_max_seconds: float = Field(300.0, gt=0)
    batch_size: int = Field(50, ge=1)


class LoggingConfig(_Strict):
    level: Annotated[Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], BeforeValidator(_upper)] = "INFO"
    file: ConfigPath | None = None


# --------------------------------------------------------------------------- root


class NodeConfig(_Strict):
    # Section defaults are empty mappings validated like user input, so their relative paths
    # (storage.root = ./var) resolve against the config file's folder, not the working directory.
    node: NodeSettings = Field(default_factory=dict)  # type: ignore[arg-type]
    storage: StorageConfig = Field(default_factory=dict)  # type: ignore[arg-type]
    destinations: dict[Name, DestinationConfig] = {}
    models: dict[Name, ModelConfig] = {}
    rules: list[Rule]
    unmatched: UnmatchedPolicy = Field(default_factory=dict)  # type: ignore[arg-type]
    derive: DerivePolicy = Field(default_factory=dict)  # type: ignore[arg-type]
    dispatch: DispatchPolicy = Field(default_factory=dict)  # type: ignore[arg-type]
    logging: LoggingConfig = Field(default_factory=dict)  # type: ignore[arg-type]

    @property
    def config_hash(self) -> str:
        """sha256 of the canonical JSON form; recorded in provenance to tie outputs to a config."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def calling_ae_title(self, destination: str) -> str:
        """The AE title the node uses when it calls ``destination``."""
        dest = self.destinations[destination]
        if isinstance(dest, DicomDestinationConfig) and dest.calling_ae_title:
            return dest.calling_ae_title
        return self.node.ae_title

    def missing_files(self) -> list[tuple[str, str]]:
        """Files the config names that do not exist (TLS material, model weights), as (key, reason).

        Kept out of validation so that a config can be parsed on a machine without the files (tests,
        tooling); ``dicomnode check-config`` and the server at start-up report these.
        """
        problems: list[tuple[str, str]] = []

        def need(key: str, path: Path | None) -> None:
            if path is not None and not path.exists():
                problems.append((key, f"file not found: {path}"))

        if self.node.tls is not None:
            need("node.tls.cert", self.node.tls.cert)
            need("node.tls.key", self.node.tls.key)
            need("node.tls.ca", self.node.tls.ca)
        for name, dest in self.destinations.items():
            if isinstance(dest, DicomDestinationConfig) and dest.tls is not None:
                for attr in ("ca", "cert", "key"):
                    need(f"destinations.{name}.tls.{attr}", getattr(dest.tls, attr))
        for name, model in self.models.items():
            need(f"models.{name}.weights", model.weights)
        return problems


# --------------------------------------------------------------------------- loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys: YAML would silently keep the last one."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if isinstance(key, typing.Hashable) and key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"duplicate key {key!r} (first at line {seen[key].start_mark.line + 1})",
                key_node.start_mark,
            )
        if isinstance(key, typing.Hashable):
            seen[key] = key_node
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_config(path: Path | str) -> NodeConfig:
    """Read and validate a YAML config file; relative paths resolve against its folder."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([("", f"cannot read config file: {exc.strerror or exc}")], source=str(path)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([("", f"config file is not UTF-8 text: {exc}")], source=str(path)) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = " ".join(p for p in (exc.context, exc.problem) if p)
        raise ConfigError([("", f"YAML error at {where}{problem}")], source=str(path)) from None
    except yaml.YAMLError as exc:
        raise ConfigError([("", f"YAML error: {exc}")], source=str(path)) from None
    if data is None:
        raise ConfigError([("", "config file is empty")], source=str(path))
    try:
        return parse_config(data, path.resolve().parent)
    except ConfigError as exc:
        raise ConfigError(exc.errors, source=str(path)) from None


def parse_config(data: Mapping[str, Any], base_dir: Path) -> NodeConfig:
    """Validate an already-parsed mapping; raises ConfigError listing every problem."""
    if not isinstance(data, Mapping):
        raise ConfigError([("", f"the config must be a mapping of sections, got {type(data).__name__}")])
    errors: list[tuple[str, str]] = []
    config: NodeConfig | None = None
    try:
        config = NodeConfig.model_validate(dict(data), context={"base_dir": Path(base_dir)})
    except ValidationError as exc:
        errors.extend(_convert_errors(exc))
    errors.extend(_cross_check(data))
    if errors:
        raise ConfigError(sorted(_dedupe(errors), key=_document_order))
    assert config is not None
    return config


# --------------------------------------------------------------------------- error reporting


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


def _model_at(loc: Sequence[Any]) -> type[BaseModel] | None:
    """The config model class found at ``loc`` (pydantic's error location), if any."""
    current: Any = NodeConfig
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


def _convert_errors(exc: ValidationError) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for err in exc.errors():
        loc = list(err["loc"])
        parent = _model_at(loc[:-1]) if err["type"] == "extra_forbidden" else None
        # Drop the destination schema tag pydantic inserts ("destinations.pacs.dicom.port").
        if len(loc) >= 3 and loc[0] == "destinations" and loc[2] in _DESTINATION_TAGS:
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
            message = f"unknown key {key!r}{_did_you_mean(key, allowed)}"
            if allowed:
                message += f" (allowed: {', '.join(allowed)})"
        elif kind == "missing":
            message = "required key is missing"
        elif kind == "union_tag_invalid":
            message = "type must be 'dicom' or 'folder'"
        elif kind in {"literal_error", "enum"}:
            message = f"{message} (got {_short(err.get('input'))})"
        elif kind.endswith("_type") or kind.endswith("_parsing") or kind.startswith("greater") or kind.startswith("less"):
            given = err.get("input")
            if not isinstance(given, (dict, list)):
                message = f"{message} (got {_short(given)})"
        out.append((_format_loc(loc), message))
    return out


def _cross_check(data: Mapping[str, Any]) -> list[tuple[str, str]]:
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
                errors.append((f"{key}[{i}]", f"unknown destination {name!r}{_did_you_mean(name, dest_names)} (known: {known})"))

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
                errors.append((f"rules[{i}].model", f"unknown model {model!r}{_did_you_mean(model, model_names)} (known: {known})"))
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
        high = storage.get("disk_high_watermark_percent", 90.0)
        low = storage.get("disk_low_watermark_percent", 85.0)
        if _is_number(high) and _is_number(low) and not low < high:
            errors.append(("storage.disk_low_watermark_percent", f"must be below disk_high_watermark_percent ({low} >= {high})"))

    dispatch = data.get("dispatch")
    if isinstance(dispatch, Mapping):
        initial = dispatch.get("backoff_initial_seconds", 2.0)
        maximum = dispatch.get("backoff_max_seconds", 300.0)
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


def _document_order(item: tuple[str, str]) -> tuple[int, int]:
    """Sort key: section order of the schema, then list index (rules[2] before rules[10])."""
    key = item[0]
    section = re.split(r"[.\[]", key, maxsplit=1)[0]
    sections = list(NodeConfig.model_fields)
    first_index = re.match(r"^\w+\[(\d+)\]", key)
    return (sections.index(section) if section in sections else -1, int(first_index.group(1)) if first_index else -1)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _dedupe(errors: list[tuple[str, str]]) -> list[tuple[str, str]]:
    seen: set[tuple[str, str]] = set()
    out = []
    for item in errors:
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out
