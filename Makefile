# Set-up, demo and tests on a fresh machine. `make demo` and `make test` each
# create the virtual environment and build the extension first if needed.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
CUDA_VENV ?= .venv-cuda
CUDA_TORCH ?= torch==2.14.1
PACKAGES := numpy pytest ninja tqdm matplotlib safetensors 'setuptools>=77' wheel build selenium
SOURCES := setup.py alphanet_ext/messages.py $(wildcard csrc/*.h csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)
export CUDA_HOME ?= /usr/local/cuda

.PHONY: setup demo test cuda-check extract-test package-check isolation-check bench clean

setup: $(VENV)/.built

$(VENV)/.built: $(SOURCES)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q $(TORCH) $(PACKAGES)
	$(VENV)/bin/pip install -q --no-build-isolation -e .
	touch $@

demo: setup
	$(VENV)/bin/alphanet demo

test: setup
	$(VENV)/bin/python -m pytest python_tests -q

# Compiles the CUDA kernels against a CUDA build of torch (no GPU needed) and
# checks that every op has a CUDA kernel registered.
cuda-check:
	test -x $(CUDA_VENV)/bin/python || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/pip install -q $(CUDA_TORCH) numpy ninja 'setuptools>=77'
	rm -rf build/cuda-check && mkdir -p build/cuda-check
	cp -r setup.py csrc alphanet_ext build/cuda-check/
	cd build/cuda-check && ALPHANET_CUDA=1 MAX_JOBS=2 ../../$(CUDA_VENV)/bin/python setup.py -q build_ext --inplace
	cd build/cuda-check && ../../$(CUDA_VENV)/bin/python -c "import alphanet_ext.ops as o; o.check_registered('CUDA'); print('CUDA kernels registered for every op')"

# alphanet extract's tests need torchvision, which the registry builds against the
# CUDA torch: they run in the CUDA venv (on the CPU), against the module cuda-check built.
extract-test: cuda-check
	$(CUDA_VENV)/bin/pip install -q torchvision==0.29.1 timm pillow pytest tqdm matplotlib safetensors
	cd build/cuda-check && ../../$(CUDA_VENV)/bin/python -m pytest ../../python_tests/test_extract.py -q -p no:cacheprovider

# The release path: an sdist, a wheel built from it (python -m build), the wheel
# installed into a fresh venv, and the installed command run from outside the source tree.
WHEEL_VENV ?= .venv-wheel
package-check: setup
	rm -rf dist $(WHEEL_VENV)
	cd /tmp && MAX_JOBS=2 $(abspath $(VENV))/bin/python -m build --no-isolation --outdir $(abspath dist) $(abspath .)
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/pip install -q $(TORCH) dist/*.whl tqdm matplotlib safetensors
	cd /tmp && $(abspath $(WHEEL_VENV))/bin/alphanet doctor && $(abspath $(WHEEL_VENV))/bin/alphanet demo --quiet
	@echo "sdist -> wheel -> fresh venv: doctor and demo passed"

# pip install . with build isolation: pip builds in a fresh environment with the torch
# that pyproject.toml's build requirements resolve to (here 2.14.1, CUDA 13.0), so the
# wheel is checked in the CUDA venv, which has that torch; it is uninstalled after.
isolation-check:
	test -x $(CUDA_VENV)/bin/python || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/pip install -q $(CUDA_TORCH) numpy
	rm -rf build/isolated
	cd /tmp && MAX_JOBS=2 $(PYTHON) -m pip wheel -q --no-deps -w $(abspath build/isolated) $(abspath .)
	$(CUDA_VENV)/bin/pip install -q --no-deps --force-reinstall build/isolated/*.whl
	cd /tmp && $(abspath $(CUDA_VENV))/bin/alphanet doctor; status=$$?; \
		$(abspath $(CUDA_VENV))/bin/pip uninstall -q -y alphanet_ext; exit $$status
	@echo "pip install . with build isolation: the wheel built and passed doctor"

bench: setup
	$(VENV)/bin/python benchmarks/bench_ops.py

clean:
	rm -rf build dist $(VENV) $(CUDA_VENV) $(WHEEL_VENV) alphanet_ext/_C*.so
