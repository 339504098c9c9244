"""Destination types: where derived series go. One module per type, found and registered at import.

``type: dicom`` (a PACS by C-STORE) and ``type: folder`` ship here; a new type is one more module in
this package with a settings model and a :class:`~dicomnode.destinations.base.Destination` joined by
``@destination_type``.
"""

from __future__ import annotations

import importlib
import pkgutil

from dicomnode.destinations.base import (
    Destination,
    DestinationSettings,
    Progress,
    SendOutcome,
    build_destination,
    destination_type,
    registered_types,
)

__all__ = ["Destination", "DestinationSettings", "Progress", "SendOutcome", "build_destination", "destination_type", "registered_types"]

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")
