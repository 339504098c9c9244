"""Before/after thumbnails of a job for the admin page: the first frame of its first matched source and of its
first output, decoded exactly as the node decodes them, as a small PNG. Served only with the token."""

from __future__ import annotations

import io

import numpy as np
import pydicom
from PIL import Image

from dicomnode.admin.ops import OpError, get_job
from dicomnode.imaging import iter_frames, pixel_info
from dicomnode.ledger import Ledger

__all__ = ["job_thumbnail", "png"]


def png(frame: np.ndarray, size: int) -> bytes:
    """A float [0, 1] frame (gray or RGB) as a PNG whose longer side is at most ``size``."""
    arr = (np.clip(np.asarray(frame, dtype=np.float32), 0, 1) * 255).round().astype(np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    image = Image.fromarray(arr)
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def job_thumbnail(ledger: Ledger, job_id: int, which: str, size: int = 256) -> bytes:
    job = get_job(ledger, job_id)
    if which == "before":
        instances = ledger.instances(job.id)
        chosen = [i for i in instances if i.routed == "matched"] or instances
        files = [i.path for i in chosen]
    elif which == "after":
        files = [p for p in ledger.outputs(job.id) if job.action != "forward"]
    else:
        raise OpError(404, "ask for 'before' or 'after'")
    files = [f for f in files if f.is_file()]
    if not files:
        raise OpError(404, f"job {job.id} has no {'source' if which == 'before' else 'output'} file on disk")
    try:
        ds = pydicom.dcmread(files[0])
        frame, _voi = next(iter_frames(ds, pixel_info(ds)))
    except Exception as exc:  # an undecodable file: say so rather than fail the page
        raise OpError(409, f"job {job.id}: the first {which} image cannot be decoded: {type(exc).__name__}") from None
    return png(frame, size)
