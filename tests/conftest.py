"""Shared test fixtures: where the public sample images are, real DICOM peers, free ports."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

import factories

# Fuzz tests run derandomized (the same examples every run) so `make test` and CI cannot flake;
# `make fuzz` runs them with fresh random examples and FUZZ_SCALE times as many (a longer local target).
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("fuzz", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
FUZZ_SCALE = max(1, int(os.environ.get("FUZZ_SCALE", "1")))


def examples(n: int) -> int:
    """A test's number of hypothesis examples, times FUZZ_SCALE (``make fuzz``)."""
    return n * FUZZ_SCALE

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real public images); tests that need it skip with the reason when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"public sample images not found at {SHARED_DATA} (they are not shipped with the project)")
    return SHARED_DATA


def require_tools(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (apt-get install dcmtk dicom3tools; `make test` installs them)")


@pytest.fixture(autouse=True)
def _process_wide_dicom_settings() -> Iterator[None]:
    """Restore what :func:`dicomnode.netconfig.configure` sets process-wide after each test.

    A node started in-process points ``tempfile.tempdir`` into its spool; a later test's pynetdicom
    peer (a FakePACS) would otherwise stream objects into that test's deleted folder."""
    import tempfile

    from pynetdicom import _config

    saved = (tempfile.tempdir, _config.STORE_RECV_CHUNKED_DATASET, _config.STORE_SEND_CHUNKED_DATASET)
    yield
    tempfile.tempdir, _config.STORE_RECV_CHUNKED_DATASET, _config.STORE_SEND_CHUNKED_DATASET = saved


@pytest.fixture
def free_port() -> int:
    return factories.free_port()
