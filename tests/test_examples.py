"""examples/test_example_device.py -- a device model's tests written against the pytest plugin --
passes on the model and, where /dev/kvm is usable, on real KVM.

It runs in a subprocess from a scratch directory, as another project would run it (a copy of the
file, so this repository's pytest configuration plays no part); the package is the installed one
or, when not installed, this checkout via PYTHONPATH.  As in test_conformance.py, ``-p
kvmirqfast.pytest_plugin`` is added only when the pytest11 entry point is not registered (pytest
refuses a plugin registered twice).
"""
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

import kvmirqfast
from kvmirqfast.pytest_plugin import kvm_unusable_reason
from test_conformance import _plugin_registered, counts

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "test_example_device.py"
MIN_TESTS = 10                      # tests per backend in the example


def run_example(tmp_path, backend):
    if not EXAMPLE.exists():
        pytest.skip(f"{EXAMPLE} is not in this tree")
    shutil.copy(EXAMPLE, tmp_path / EXAMPLE.name)
    env = dict(os.environ)
    pkg_root = str(pathlib.Path(kvmirqfast.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = pkg_root + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
           f"--kvm-backend={backend}", EXAMPLE.name]
    if not _plugin_registered():
        cmd[3:3] = ["-p", "kvmirqfast.pytest_plugin"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    return proc, counts(proc.stdout)


def assert_clean(proc, c):
    out = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, out
    assert not c.get("failed") and not c.get("error"), out


@pytest.fixture(scope="module")
def model_run(tmp_path_factory):
    return run_example(tmp_path_factory.mktemp("example-model"), "model")


def test_example_passes_on_the_model(model_run):
    proc, c = model_run
    assert_clean(proc, c)
    assert c.get("passed", 0) >= MIN_TESTS and not c.get("skipped"), proc.stdout[-2000:]


def test_example_passes_on_kvm_where_usable(tmp_path, model_run):
    proc, c = run_example(tmp_path, "kvm")
    assert_clean(proc, c)
    reason = kvm_unusable_reason()
    if reason:
        assert c.get("skipped", 0) >= MIN_TESTS and not c.get("passed"), proc.stdout[-2000:]
        pytest.skip(f"the example ran on the model only: {reason}")
    assert c.get("passed") == model_run[1].get("passed"), proc.stdout[-2000:]
    assert not c.get("skipped"), proc.stdout[-2000:]
