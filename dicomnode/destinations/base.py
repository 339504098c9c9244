"""What every destination type shares, and the registry that makes a new type one file.

A destination type is a pydantic settings model (with a ``type: Literal["name"]`` field) plus a
:class:`Destination` subclass that sends files, joined by :func:`destination_type`. The modules of
this package are imported by ``dicomnode.destinations`` at start, so adding, say, DICOMweb STOW-RS
is one new file here: the config accepts ``type: stow`` and the dispatcher sends with it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from dicomnode.configtypes import StrictModel

__all__ = ["Destination", "DestinationSettings", "Progress", "SendOutcome", "build_destination", "destination_type",
           "registered_types"]


@dataclass(frozen=True)
class SendOutcome:
    """What happened to one file: ``ok`` only if the destination stored it.

    ``status`` is the C-STORE status code when the peer answered (None otherwise: not connected,
    refused context, unreadable file, folder destinations). ``detail`` is kept in the ledger and
    shown by ``status``: fixed messages, codes and UIDs only, never text the peer wrote
    (:mod:`dicomnode.redact`). ``attempted`` is False for a file the destination never tried
    because the node was stopping: it is not a failed attempt.
    """

    path: Path
    ok: bool
    status: int | None
    detail: str
    attempted: bool = True


Progress = Callable[[SendOutcome], None]  # called with each file's outcome as soon as it is known


class Destination(ABC):
    """Somewhere derived (or forwarded) files go."""

    name: str

    @abstractmethod
    def send(self, paths: Sequence[Path], progress: Progress | None = None) -> list[SendOutcome]:
        """Deliver ``paths`` as one batch; one outcome per path, in order. Never raises for peer errors.

        ``progress`` gets each outcome as soon as it is known, so the ledger records a stored file
        before the rest of the batch is sent (a crash then re-sends only what was in flight).
        """

    def stop(self, *, abort: bool = False) -> None:
        """The node is stopping: start no new file; with ``abort``, also end transfers in flight now."""
        return None

    def resume(self) -> None:
        """The node (re)starts: undo :meth:`stop`."""
        return None

    def echo(self) -> tuple[bool, str]:
        """Check the destination is reachable and willing: (ok, what was found)."""
        return True, "no check for this destination type"


class DestinationSettings(StrictModel):
    """Base of every destination type's settings; ``implied_by`` lets a config omit ``type``."""

    implied_by: ClassVar[str | None] = None  # a key whose presence means this type when ``type`` is absent


@dataclass(frozen=True)
class _Registered:
    settings: type[DestinationSettings]
    build: Callable[[str, Any, str], Destination]  # (name, settings, node AE title) -> Destination


_REGISTRY: dict[str, _Registered] = {}


def destination_type(settings: type[DestinationSettings]) -> Callable[[type[Destination]], type[Destination]]:
    """Class decorator: ``@destination_type(FolderSettings)`` on a Destination with ``from_settings``."""
    name = settings.model_fields["type"].default

    def register(cls: type[Destination]) -> type[Destination]:
        if name in _REGISTRY:
            raise ValueError(f"destination type {name!r} is registered twice")
        _REGISTRY[name] = _Registered(settings, cls.from_settings)  # type: ignore[attr-defined]
        return cls

    return register


def registered_types() -> dict[str, type[DestinationSettings]]:
    """type name -> settings model, in registration order."""
    return {name: r.settings for name, r in _REGISTRY.items()}


def build_destination(name: str, settings: DestinationSettings, node_ae_title: str) -> Destination:
    return _REGISTRY[settings.type].build(name, settings, node_ae_title)  # type: ignore[attr-defined]
