"""Helpers for the install tests: build the wheel from a clean copy, a venv outside the repository, the node as a process.

No test downloads anything. The wheel is built without build isolation (the venv's setuptools) from a copy of
the package sources, so stale files in a ``build/`` folder of the checkout never leak into it. A fresh venv gets
its *dependencies* (torch, numpy, pydicom, ...) from the repository venv's site-packages through one ``.pth``
line, and only the wheel is installed into it (``--no-deps``): installing torch again would download a
multi-GB build. A plain path line in a ``.pth`` file is appended to ``sys.path`` after the venv's own
site-packages and the ``.pth`` files *in* that folder are not run, so the repository's editable install
(a ``.pth`` finder there) stays out and ``import dicomnode`` finds the wheel's copy; the tests check it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from factories import image_dataset, write

REPO = Path(__file__).resolve().parents[1]
DEPS_SITE = Path(sysconfig.get_paths()["purelib"])  # the repository venv's site-packages (running these tests)
_SOURCES = ("pyproject.toml", "README.md", "dicomnode", "models")


def build_wheel(workdir: Path) -> Path:
    """``pip wheel --no-deps`` of a clean copy of the package sources; the path of the wheel."""
    src = workdir / "src"
    for name in _SOURCES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        else:
            src.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, src / name)
    out = workdir / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)],
                   check=True, capture_output=True, text=True, timeout=600)
    (wheel,) = out.glob("dicomnode-*.whl")
    return wheel


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without anything that would point Python back at the repository."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "PYTHONSTARTUP")}
    env["TCP_NODELAY"] = "1"
    env.update(extra)
    return env


def venv_with_wheel(venv: Path, wheel: Path) -> Path:
    """A venv outside the repository with only ``wheel`` installed; its dependencies from :data:`DEPS_SITE`.

    ``--without-pip``: the repository venv's pip installs into it (``pip --python``). Returns its ``bin/``.
    """
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "zz_dicomnode_deps.pth").write_text(f"{DEPS_SITE}\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True, text=True, timeout=300)
    return venv / "bin"


def fundus_series(folder: Path, count: int, *, study: str = "install-study", size: int = 192) -> list[Path]:
    """``count`` OP (fundus) instances of skimage's retina photograph: the default rules send them to fieldnorm-fundus."""
    from skimage.data import retina
    from skimage.transform import resize

    img = resize(retina(), (size, size), anti_aliasing=True)
    pixels = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    return [write(image_dataset(pixels, study=study, series="fundus", index=i, modality="OP",
                                ImageLaterality="R"), folder / f"op{i}.dcm") for i in range(count)]


def ccm_series(folder: Path, count: int, *, study: str = "install-study", size: int = 192) -> list[Path]:
    """``count`` gray OP instances described as corneal confocal microscopy, with uneven illumination: the
    default rules send them to the shipped HQG-Net (hqgnet-ccm)."""
    from skimage.data import camera
    from skimage.transform import resize

    img = resize(camera(), (size, size), anti_aliasing=True)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = img * (0.45 + 0.55 * np.exp(-((yy - 0.4) ** 2 + (xx - 0.5) ** 2) / 0.18))  # vignetting
    pixels = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    return [write(image_dataset(pixels, study=study, series="ccm", index=i, modality="OP",
                                description="Corneal confocal microscopy"), folder / f"ccm{i}.dcm") for i in range(count)]


class Served:
    """``dicomnode serve --config FILE`` from an installed ``bin/`` folder, run from ``cwd``."""

    def __init__(self, command: Sequence[str], cwd: Path, log: Path, env: dict[str, str] | None = None):
        self.command = list(command)
        self.cwd = cwd
        self.log = log
        self.env = env or clean_env()
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> Served:
        self.cwd.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(self.command, cwd=self.cwd, env=self.env, stdout=subprocess.DEVNULL,
                                     stderr=self.log.open("ab"))
        deadline = time.monotonic() + timeout
        while b"listening as" not in self.log.read_bytes():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.command} exited with {self.proc.returncode}:\n{self.text()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.command} not listening after {timeout} s:\n{self.text()}")
            time.sleep(0.1)
        return self

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        rc, self.proc = self.proc.returncode, None
        return rc

    def __enter__(self) -> Served:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
