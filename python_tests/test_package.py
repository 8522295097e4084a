"""The package around the kernels: the build's torch check, the reference only on
request, the CUDA architecture list, the source distribution and `alphanet doctor`."""
import importlib.util
import json
import os
import subprocess
import sys
import tarfile

import pytest

import alphanet_ext
from alphanet_ext.ops import torch_mismatch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_build = pytest.mark.skipif(not alphanet_ext.HAS_EXTENSION, reason="compiled module not built")


def python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_torch_mismatch_names_both_versions_and_the_rebuild():
    assert torch_mismatch("2_13_0", "2.13.0+cpu") is None and torch_mismatch("unknown", "2.14.1") is None
    message = torch_mismatch("2_13_0", "2.14.1+cu130")
    assert "built against torch 2.13.0 but torch 2.14.1+cu130 is running" in message
    assert "pip install --no-build-isolation" in message


@needs_build
def test_loading_under_another_torch_raises_a_clear_error():
    done = python("import torch; torch.__version__ = '2.99.0'; import alphanet_ext")
    assert done.returncode != 0
    assert "ImportError: alphanet_ext's compiled kernels were built against torch" in done.stderr
    assert "torch 2.99.0 is running" in done.stderr


def test_missing_kernels_fail_the_import_unless_the_reference_is_asked_for():
    block = "import sys; sys.modules['alphanet_ext._C'] = None; import alphanet_ext; print(alphanet_ext.HAS_EXTENSION)"
    done = python(block, ALPHANET_ALLOW_REFERENCE="0")
    assert done.returncode != 0 and "the compiled kernels are missing or cannot load" in done.stderr
    assert "ALPHANET_ALLOW_REFERENCE=1" in done.stderr
    allowed = python(block, ALPHANET_ALLOW_REFERENCE="1")
    assert allowed.returncode == 0 and allowed.stdout.strip() == "False"


def test_doctor_reports_a_missing_build_with_a_nonzero_exit():
    done = python("import sys; sys.modules['alphanet_ext._C'] = None\n"
                  "from alphanet_ext import cli; sys.exit(cli.main(['doctor', '--json']))",
                  ALPHANET_ALLOW_REFERENCE="1")
    report = json.loads(done.stdout)
    assert done.returncode == 1 and report["compiled"] is False
    assert any("compiled kernels are missing" in problem for problem in report["problems"])


@needs_build
def test_doctor_passes_on_a_working_build(capsys):
    from alphanet_ext import cli
    assert cli.main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["problems"] == [] and report["compiled"] is True
    assert set(report["self_test"]["cpu"].values()) == {"ok"}
    import torch
    assert report["built_against_torch"] == torch.__version__.split("+")[0]


def _setup_module():
    spec = importlib.util.spec_from_file_location("alphanet_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() runs only as __main__
    return module


def test_cuda_arch_list_covers_volta_to_the_newest_the_toolkit_has():
    setup = _setup_module()
    assert setup.default_arch_list(["7.5", "8.0", "8.6", "8.7", "8.9", "9.0", "10.0", "11.0", "12.0", "12.1"]) == \
        "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"  # CUDA 13 dropped Volta (7.0)
    assert setup.default_arch_list(["7.0", "7.5", "8.0", "9.0"]) == "7.0;7.5;8.0;9.0+PTX"  # CUDA 12
    assert setup.version_token("2.13.0+cpu") == "2_13_0" and setup.version_token("13.0") == "13_0"
    from alphanet_ext.doctor import _cuda_archs, _gpu_usable
    archs = _cuda_archs({"cuda_archs": "sm_75_80_90_120_PTX"})
    assert archs == ["7.5", "8.0", "9.0", "12.0", "PTX"]
    assert _gpu_usable(archs, (8, 6)) and _gpu_usable(archs, (12, 1)) and _gpu_usable(archs, (13, 0))
    assert not _gpu_usable(["8.0", "9.0"], (7, 0)) and not _gpu_usable(["9.0"], (8, 0))


def test_the_source_distribution_holds_everything_the_build_needs(tmp_path):
    done = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    for source in ("csrc",):
        for folder, _, files in os.walk(os.path.join(ROOT, source)):
            for name in files:
                if name.endswith((".h", ".cuh", ".cpp", ".cu")):
                    path = os.path.relpath(os.path.join(folder, name), ROOT)
                    assert path in names, f"{path} is missing from the sdist"
    assert {"LICENSE", "pyproject.toml", "setup.py", "README.md", "alphanet_ext/training/step.py"} <= names
