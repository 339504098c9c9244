"""Process-wide settings of the DICOM library, applied once when a node process starts.

pynetdicom keeps some behaviour in module globals rather than per AE. The node wants two of them,
set here and nowhere else, by :func:`configure` (called once by ``dicomnode serve`` before the SCP
opens):

* ``STORE_RECV_CHUNKED_DATASET``: received objects are streamed to a file while PDUs arrive instead
  of being grown in memory, the fastest measured receive path. pynetdicom creates those files with
  ``tempfile``, so the process temp folder is pointed into the spool (``incoming/chunks``): partial
  objects holding patient data never land in ``/tmp`` and are renamed, not copied, into the spool.
* ``STORE_SEND_CHUNKED_DATASET``: files are streamed from disk when sent by path, never read whole.

And one of pydicom's: ``reading_validation_mode`` is IGNORE, because pydicom's warning for an invalid
value quotes the value (a birth date, a name) into the log. The node validates what it copies itself
(:func:`dicomnode.derive.invalid_value`) and logs the attribute and the rule, never the value.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from pydicom import config as pydicom_config
from pynetdicom import _config

log = logging.getLogger(__name__)

__all__ = ["configure"]


def configure(chunk_dir: Path | None) -> None:
    """Apply the node's pynetdicom settings; ``chunk_dir`` (the spool's) receives streamed objects."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    if chunk_dir is not None:
        _config.STORE_RECV_CHUNKED_DATASET = True
        tempfile.tempdir = str(chunk_dir)
        log.debug("receiving objects into %s", chunk_dir)
