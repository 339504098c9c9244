"""Typed node configuration (YAML) with errors that name the key and say what is wrong.

The config is validated in one pass and *every* problem is reported at once, each as a key path
(``rules[0].destinations[1]``) and a reason, so an admin fixes a file in one round instead of one
error per restart. Unknown keys are errors (``extra="forbid"`` everywhere) with a did-you-mean,
because a misspelt optional key would otherwise be silently ignored and its default used.

Relative paths resolve against the folder of the config file, so a config works the same from any
working directory (systemd, containers, tests).
"""

from __future__ import annotations

import hashlib
import json
import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BeforeValidator,
    ByteSize,
    Discriminator,
    Field,
    PlainSerializer,
    PrivateAttr,
    Tag,
    ValidationError,
)

from dicomnode.configerrors import ConfigError, convert_errors, cross_check, dedupe, document_order
from dicomnode.configtypes import AETitle, ConfigPath, Name, Port, StrictModel, did_you_mean, upper
from dicomnode.destinations import DestinationSettings, registered_types
from dicomnode.destinations.dicom import DicomSettings, TLSClientSettings
from dicomnode.destinations.folder import FolderSettings
from models.registry import MODELS

__all__ = [
    "AdminConfig",
    "AdminTLSConfig",
    "CALLING_AET_KEY",
    "ConfigError",
    "DerivePolicy",
    "DestinationConfig",
    "DicomSettings",
    "DispatchPolicy",
    "ExecutorConfig",
    "FolderSettings",
    "LoggingConfig",
    "MatchValue",
    "ModelConfig",
    "NodeConfig",
    "NodeSettings",
    "NodeTLSConfig",
    "RegexMatch",
    "Rule",
    "StorageConfig",
    "TLSClientSettings",
    "UnmatchedPolicy",
    "DEFAULT_CONFIG",
    "load_config",
    "parse_config",
]

CALLING_AET_KEY = "CallingAETitle"  # pseudo-keyword: the AE title of the sender, not a DICOM tag

# Value representations that cannot be compared with a string: sequences and bulk binary data.
_UNMATCHABLE_VRS = {"SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN"}
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


# --------------------------------------------------------------------------- node


class NodeTLSConfig(StrictModel):
    """TLS for the node's listening port (DICOM TLS, usually port 2762)."""

    cert: ConfigPath
    key: ConfigPath
    ca: ConfigPath | None = None  # CA bundle used to verify client certificates
    require_client_cert: bool = False


class NodeSettings(StrictModel):
    ae_title: AETitle = "DICOMNODE"
    host: str = Field("0.0.0.0", min_length=1)
    port: Port = 11112
    series_quiet_seconds: float = Field(10.0, gt=0)
    max_associations: int = Field(10, ge=1)  # associations at once; connections still waiting for their A-ASSOCIATE-RQ do not count
    max_connections_per_peer: int = Field(4, ge=1)  # open connections from one IP address (idle ones included)
    association_request_timeout_seconds: float = Field(10.0, gt=0)  # connect (and TLS handshake) to A-ASSOCIATE-RQ
    allowed_calling_aets: list[AETitle] = []  # empty = accept any sender
    require_called_aet: bool = True
    # Largest P-DATA PDU we accept (told to senders); a PDU declaring more is aborted before it is read.
    # 1 MiB by measurement (benchmarks/bench_pdu.py); 0 = no announced limit, a PDU then bounded by max_object_bytes.
    max_pdu_size: int = Field(1024 * 1024, ge=0)
    max_object_bytes: ByteSize = Field(ByteSize(2 * 1024**3), gt=0)  # accepts 2147483648 or "2GiB"
    workers: int = Field(1, ge=1)
    # Processes receiving on the port (SO_REUSEPORT, Linux); 1 = in the node process. Each enforces
    # max_associations and max_connections_per_peer for its own connections.
    receive_processes: int = Field(1, ge=1, le=64)
    tls: NodeTLSConfig | None = None
    # How C-STORE/C-ECHO are received: pynetdicom's server, or dicomnode.upper's own P-DATA path (several
    # times faster, benchmarks/bench_receive.py; the default); both land, check and answer the same way.
    receive_engine: Literal["pynetdicom", "native"] = "native"
    # Decode budgets, checked from the header before any pixel is decoded; an instance over one fails (quarantined).
    # Per frame: rows x columns x samples x bytes per sample plus the float32 working copy (CT 512x512: 1.5 MiB,
    # a 2592x1944 RGB fundus: 72 MiB). Per series: the same summed over every frame of every instance.
    max_decoded_frame_bytes: ByteSize = Field(ByteSize(512 * 1024**2), gt=0)
    max_decoded_series_bytes: ByteSize = Field(ByteSize(8 * 1024**3), gt=0)
    # A job still `processing` when the node died this many times (its claims never finished) is failed as poison.
    max_job_attempts: int = Field(2, ge=1)


# --------------------------------------------------------------------------- storage


class StorageConfig(StrictModel):
    root: ConfigPath = Path("./var")
    disk_high_watermark_percent: float = Field(90.0, gt=0, le=100)
    disk_low_watermark_percent: float = Field(85.0, gt=0, le=100)
    retention_days_delivered: float | None = Field(7.0, ge=0)  # None = keep forever
    retention_days_failed: float | None = Field(30.0, ge=0)
    # A job that meets a full disk (above the high watermark, or ENOSPC/EDQUOT writing outputs) waits this long, then retries.
    disk_full_retry_seconds: float = Field(60.0, gt=0)


# --------------------------------------------------------------------------- destinations


def _destination_kind(value: Any) -> str:
    """Pick the destination type: explicit ``type``, else the type whose ``implied_by`` key is present."""
    types = registered_types()
    if isinstance(value, Mapping):
        explicit = value.get("type")
        if explicit in types:
            return str(explicit)
        for name, settings in types.items():
            if settings.implied_by and settings.implied_by in value and name != "dicom":
                return name
        return "dicom"
    if isinstance(value, DestinationSettings):
        return str(value.type)  # type: ignore[attr-defined]
    return "dicom"


# The union of every registered destination type, tagged by its name (built from the registry at import).
DestinationConfig = Annotated[
    Union[tuple(Annotated[settings, Tag(name)] for name, settings in registered_types().items())],  # type: ignore[valid-type]  # noqa: UP007
    Discriminator(_destination_kind),
]


# --------------------------------------------------------------------------- models


def _check_kind(value: str) -> str:
    kinds = sorted(MODELS)
    if value not in kinds:
        raise ValueError(f"unknown model kind {value!r}{did_you_mean(value, kinds)} (known: {', '.join(kinds)})")
    return value


def _check_device(value: str) -> str:
    if not _DEVICE_RE.match(value):
        raise ValueError(f"device {value!r} is not one of auto, cpu, cuda, cuda:N, mps")
    return value


class ModelConfig(StrictModel):
    kind: Annotated[str, AfterValidator(_check_kind)]
    weights: ConfigPath | None = None  # model card X.json must sit beside X.pt
    device: Annotated[str, AfterValidator(_check_device)] = "auto"
    batch_size: int = Field(4, ge=1)
    # Frames of different series waiting for the device may share one call (up to batch_size frames). When
    # the model's own forward passes hold several frames (options.batch_size > 1, the CUDA default), a frame's
    # neighbours in a pass can change its output in the last float bit, so a pixel may then differ by one
    # level between runs; false keeps every series bit-for-bit reproducible.
    merge_series: bool = True
    options: dict[str, Any] = {}  # passed to the model builder
    guidance: dict[str, ConfigPath] = {}  # Modality or "default" -> HQ reference folder or cache file


# --------------------------------------------------------------------------- rules


class RegexMatch(StrictModel):
    """``{regex: PATTERN}``: the value must match PATTERN as a whole (``re.fullmatch``)."""

    regex: str
    _compiled: re.Pattern[str] = PrivateAttr()

    def model_post_init(self, __context: Any) -> None:
        self._compiled = re.compile(self.regex)

    @property
    def pattern(self) -> re.Pattern[str]:
        return self._compiled


MatchValue = str | list[str] | RegexMatch


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
        hint = did_you_mean(value, [*keyword_dict, CALLING_AET_KEY], cutoff=0.75)
        raise ValueError(f"unknown DICOM keyword {value!r}{hint}")
    vr = dictionary_VR(keyword_dict[value])
    if set(vr.split(" or ")) & _UNMATCHABLE_VRS:
        raise ValueError(f"{value} has VR {vr} (sequence or binary data) and cannot be matched as text")
    return value


MatchKey = Annotated[str, AfterValidator(_check_match_key)]


class GatePolicy(StrictModel):
    """The quality gate: every output is measured against its source before it may be sent.

    An output that fails any check is not sent; its job becomes ``gated`` with the figures
    (``dicomnode resend --force JOB`` sends it anyway). Defaults are calibrated on the held-out
    data (docs/quality-gate.md): the shipped models' good outputs pass, a red tint, erased
    structure, a flat or saturated frame and a changed field-of-view surround do not.
    """

    enabled: bool = True
    min_lassim: float = Field(0.65, ge=0, le=1)  # structure kept: LaSSIM(input, output) at least this
    max_chroma_shift: float = Field(6.0, gt=0)  # colour cast: mean CIEDE2000 with lightness removed, at most this
    min_std: float = Field(0.01, ge=0)  # a frame whose intensity std falls below this is flat
    max_saturated: float = Field(0.25, ge=0, le=1)  # fraction of pixels at 0 or 1 the output may add
    max_saturated_region: float = Field(0.5, ge=0, le=1)  # the same in the worst 1/64 of the frame (a burnt-out corner)
    max_border_change: float = Field(10.0, gt=0)  # mean |change| of the field-of-view surround, 8-bit levels
    min_detail: float = Field(0.7, ge=0)  # output's fine detail (gradient energy) over the source's: a blur falls below


class Rule(StrictModel):
    """Route series whose instances match every key to ``model`` (None = forward untouched).

    A rule with no model and no destinations drops the series it matches (e.g. localizers).
    """

    name: Name
    match: dict[MatchKey, MatchValueField] = {}  # empty = matches everything (a catch-all)
    model: str | None = None
    destinations: list[str] = []
    gate: GatePolicy = Field(default_factory=GatePolicy)


class UnmatchedPolicy(StrictModel):
    action: Literal["ignore", "forward"] = "ignore"
    destinations: list[str] = []


# --------------------------------------------------------------------------- derive / dispatch / logging


class DerivePolicy(StrictModel):
    series_number_offset: int = Field(1000, ge=0, le=2**31 - 1)
    series_description_suffix: str = " [enhanced, not for diagnosis]"
    content_qualification: Annotated[Literal["RESEARCH", "PRODUCT", "SERVICE"], BeforeValidator(upper)] = "RESEARCH"
    manufacturer: str = "dicomnode"
    institution_name: str | None = None
    # How derived pixels are stored; a destination that refuses the syntax gets them uncompressed.
    # Default by measurement (benchmarks/bench_compression.py; CLAHE-derived images, size vs uncompressed, encode
    # s/image): JPEG-LS is the smallest but for endoscopy, at RLE's speed. Fundus 760x570 RGB: JPEG-LS 4.46x 0.018 s,
    # JPEG 2000 4.13x 0.092 s, RLE 1.56x 0.027 s; 2592x1944 (15.1 MB): 1.47 MB 0.23 s, 1.58 MB 0.48 s, 5.2 MB 0.22 s;
    # endoscopy 3.10x vs J2K 3.54x (4x slower); CCM 8-bit, CT 16-bit: 1.19x, 1.36x (J2K 1.18x, 1.35x; RLE <1x).
    transfer_syntax: Literal["jpeg-ls-lossless", "jpeg2000-lossless", "rle-lossless", "uncompressed"] = "jpeg-ls-lossless"
    # Images smaller than this many pixels on a side are not enhanced (the job records why).
    min_size: int = Field(16, ge=1)


class DispatchPolicy(StrictModel):
    max_attempts: int = Field(5, ge=1)
    backoff_initial_seconds: float = Field(2.0, gt=0)
    backoff_max_seconds: float = Field(300.0, gt=0)
    batch_size: int = Field(50, ge=1)


class LoggingConfig(StrictModel):
    level: Annotated[Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], BeforeValidator(upper)] = "INFO"
    file: ConfigPath | None = None


# --------------------------------------------------------------------------- admin


class AdminTLSConfig(StrictModel):
    """HTTPS for the admin port: a certificate and its key (PEM)."""

    cert: ConfigPath
    key: ConfigPath


class AdminConfig(StrictModel):
    """The admin HTTP surface (API, web page, /metrics), started by ``dicomnode serve`` in the node's process.

    Every change needs ``Authorization: Bearer TOKEN`` with a token from ``token_file`` (one per line,
    ``NAME:TOKEN`` or a bare token); without a token file nothing can be changed. Read-only views are open
    to loopback clients only; other addresses need the token for them too.
    """

    enabled: bool = True
    host: str = Field("127.0.0.1", min_length=1)  # loopback by default: not reachable from other machines
    port: Port = 8080
    token_file: ConfigPath | None = None
    tls: AdminTLSConfig | None = None


# --------------------------------------------------------------------------- executor


class ExecutorConfig(StrictModel):
    """Where enhancement batches run. ``local`` (the default): the node's own process and devices.

    ``ray``: on Ray actors that hold the models resident (``actors`` per model, each with ``num_gpus`` and
    ``num_cpus``; ``num_gpus: 1`` = one actor per GPU), scheduled by Ray across the machines of the cluster at
    ``address`` (``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``; none = a private cluster inside the node).
    Receive, ledger, derive and dispatch stay in the node. A batch whose actor died is sent again (up to
    ``retries`` times) once Ray has restarted it; when no actor answers the job waits and is retried
    (docs/scaling.md). Needs the ``ray`` extra (``pip install 'dicomnode[ray]'``) on the node and every worker.
    """

    kind: Literal["local", "ray"] = "local"
    address: str | None = None
    namespace: str = Field("dicomnode", min_length=1)
    actors: int = Field(1, ge=1)  # actors per model
    num_gpus: float = Field(0.0, ge=0)  # per actor
    num_cpus: float = Field(1.0, ge=0)  # per actor
    retries: int = Field(3, ge=0)  # times a batch is sent again after its actor died
    call_timeout_seconds: float = Field(600.0, gt=0)  # one batch, including an actor restart
    start_timeout_seconds: float = Field(300.0, gt=0)  # actors built and models loaded at start-up
    retry_seconds: float = Field(30.0, gt=0)  # a job that found no live actor waits this long, then runs again


# --------------------------------------------------------------------------- root


class NodeConfig(StrictModel):
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
    admin: AdminConfig = Field(default_factory=dict)  # type: ignore[arg-type]
    executor: ExecutorConfig = Field(default_factory=dict)  # type: ignore[arg-type]

    @property
    def config_hash(self) -> str:
        """sha256 of the settings that decide derived objects: the derive section and each model's kind and options.

        Recorded in provenance. Paths, ports and destinations do not enter it, so the same processing
        on another machine, offline or in the demo gives the same hash (and the same bytes).
        """
        processing = {"derive": self.derive.model_dump(mode="json"),
                      "models": {name: {"kind": m.kind, "options": m.options} for name, m in self.models.items()}}
        canonical = json.dumps(processing, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def calling_ae_title(self, destination: str) -> str:
        """The AE title the node uses when it calls ``destination``."""
        dest = self.destinations[destination]
        if isinstance(dest, DicomSettings) and dest.calling_ae_title:
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
            if isinstance(dest, DicomSettings) and dest.tls is not None:
                for attr in ("ca", "cert", "key"):
                    need(f"destinations.{name}.tls.{attr}", getattr(dest.tls, attr))
        for name, model in self.models.items():
            need(f"models.{name}.weights", model.weights)
        if self.admin.enabled:
            need("admin.token_file", self.admin.token_file)
            if self.admin.tls is not None:
                need("admin.tls.cert", self.admin.tls.cert)
                need("admin.tls.key", self.admin.tls.key)
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


DEFAULT_CONFIG = Path(__file__).resolve().parent / "defaults" / "default.yaml"


def load_config(path: Path | str | None = None) -> NodeConfig:
    """Read and validate a YAML config file; relative paths resolve against its folder.

    ``None`` loads the embedded default (:data:`DEFAULT_CONFIG`), whose relative paths resolve against
    the working directory instead, so ``dicomnode serve`` with no config keeps its spool in ./var.
    """
    base_dir = Path.cwd() if path is None else None
    path = DEFAULT_CONFIG if path is None else Path(path)
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
        return parse_config(data, base_dir or path.resolve().parent)
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
        errors.extend(convert_errors(exc, NodeConfig, registered_types()))
    errors.extend(cross_check(data, NodeConfig))
    if errors:
        raise ConfigError(sorted(dedupe(errors), key=lambda item: document_order(item, NodeConfig)))
    assert config is not None
    return config
