"""The shipped conformance suite (``pytest --pyargs kvmirqfast.conformance``) passes here.

It runs in a subprocess from a scratch directory, as another project would run it, so the
package under test is the installed one (or this checkout, via PYTHONPATH, when not installed).
"""
import importlib.metadata
import os
import pathlib
import re
import subprocess
import sys

import kvmirqfast


def _plugin_registered():
    eps = importlib.metadata.entry_points()
    group = eps.select(group="pytest11") if hasattr(eps, "select") else eps.get("pytest11", [])
    return any(ep.value == "kvmirqfast.pytest_plugin" for ep in group)


def run_conformance(tmp_path, *args):
    env = dict(os.environ)
    pkg_root = str(pathlib.Path(kvmirqfast.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = pkg_root + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           "--pyargs", "kvmirqfast.conformance", *args]
    if not _plugin_registered():
        cmd[3:3] = ["-p", "kvmirqfast.pytest_plugin"]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def counts(output):
    return {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error)", output)}


def test_conformance_suite_passes_on_the_model(tmp_path):
    proc = run_conformance(tmp_path, "--kvm-backend=model")
    c = counts(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert c.get("passed", 0) >= 15 and not c.get("failed")


def test_conformance_suite_on_all_backends(tmp_path):
    proc = run_conformance(tmp_path)
    c = counts(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert not c.get("failed") and not c.get("error")
