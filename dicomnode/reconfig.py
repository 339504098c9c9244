"""Live configuration: check a changed config file and say what applying it to a running node changes.

``dicomnode serve`` re-reads its config file on SIGHUP or ``POST /api/config/reload``. :func:`check` validates
the file completely first (schema, cross-section checks, the files it names, each weights file against its
model card): a file with any problem raises :class:`ConfigError` listing every key and reason, and the node
keeps running on its current config untouched. :func:`plan` compares the running config with the new one:
rules, destinations, models, dispatch, derive, unmatched, retention and logging settings apply live; what the
listening socket, the spool, the admin port or the executor were built from (``node``, ``storage.root``,
``admin``, ``executor``) takes effect at the next start, and the plan names those keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicomnode.config import ConfigError, NodeConfig, load_config
from models.registry import ModelLoadError, read_card

__all__ = ["ReloadPlan", "check", "file_problems", "plan"]


def file_problems(config: NodeConfig) -> list[tuple[str, str]]:
    """Missing files the config names, and weights files that do not match their model card, as (key, reason)."""
    problems = list(config.missing_files())
    for name, model in config.models.items():
        if model.weights is None or not Path(model.weights).exists():
            continue  # reported as missing above
        try:
            read_card(Path(model.weights), verify=True)
        except ModelLoadError as exc:
            problems.append((f"models.{name}.weights", str(exc)))
    return problems


def check(path: Path | None) -> NodeConfig:
    """The config at ``path`` (None: the embedded default) when it is usable as a whole; ConfigError otherwise."""
    config = load_config(path)
    problems = file_problems(config)
    if problems:
        raise ConfigError(problems, source=str(path or "embedded default"))
    return config


@dataclass
class ReloadPlan:
    """What applying ``config`` to a node running ``old`` changes."""

    config: NodeConfig  # what the node runs after the reload: the new file with the start-up-only keys kept
    load_models: list[str] = field(default_factory=list)  # new or changed: loaded before anything is swapped
    drop_models: list[str] = field(default_factory=list)
    build_destinations: list[str] = field(default_factory=list)  # new or changed
    drop_destinations: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  # top-level sections that differ and apply now
    restart_required: list[str] = field(default_factory=list)  # keys that differ and apply at the next start

    def as_dict(self) -> dict[str, Any]:
        return {"models_loaded": self.load_models, "models_removed": self.drop_models,
                "destinations_rebuilt": self.build_destinations, "destinations_removed": self.drop_destinations,
                "sections_changed": self.changed, "restart_required": self.restart_required}


def _dump(value: Any) -> Any:
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


def _differences(old: Any, new: Any, prefix: str) -> list[str]:
    """Key paths where two dumped settings differ (one level into mappings)."""
    a, b = _dump(old), _dump(new)
    if isinstance(a, dict) and isinstance(b, dict):
        return [f"{prefix}.{k}" for k in sorted(set(a) | set(b), key=str) if a.get(k) != b.get(k)]
    return [prefix] if a != b else []


def plan(old: NodeConfig, new: NodeConfig) -> ReloadPlan:
    """Compare the running config with a checked new one (see the module docstring for what applies live)."""
    restart = _differences(old.node, new.node, "node") + _differences(old.admin, new.admin, "admin")
    restart += _differences(old.executor, new.executor, "executor")  # the Ray connection and actors are made at start
    if Path(old.storage.root) != Path(new.storage.root):
        restart.append("storage.root")
    applied = new.model_copy(update={
        "node": old.node, "admin": old.admin, "executor": old.executor, "storage": new.storage.model_copy(update={"root": old.storage.root})})
    result = ReloadPlan(applied, restart_required=restart)
    for name, model in new.models.items():
        if name not in old.models or _dump(old.models[name]) != _dump(model):
            result.load_models.append(name)
    result.drop_models = [name for name in old.models if name not in new.models]
    for name, dest in new.destinations.items():
        if name not in old.destinations or _dump(old.destinations[name]) != _dump(dest):
            result.build_destinations.append(name)
    result.drop_destinations = [name for name in old.destinations if name not in new.destinations]
    old_dump, new_dump = old.model_dump(mode="json"), applied.model_dump(mode="json")
    result.changed = [section for section in ("rules", "unmatched", "derive", "dispatch", "logging", "models",
                                              "destinations", "storage") if old_dump.get(section) != new_dump.get(section)]
    return result
