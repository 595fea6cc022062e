"""What `pip install .` must bring: every third-party module the package imports at module level
is a declared dependency (pytest only for the pytest plugin and the conformance suite, which
pytest itself loads)."""
import ast
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PYTEST_ONLY = {"pytest_plugin.py", "conformance"}


def _declared():
    text = (ROOT / "pyproject.toml").read_text()
    (deps,) = re.findall(r"^dependencies = \[(.*?)\]", text, re.M | re.S)
    return {re.split(r"[<>=!~\[ ]", d.strip().strip('"'))[0].replace("-", "_").lower()
            for d in deps.split(",") if d.strip()}


def _module_level_imports(path):
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


@pytest.mark.skipif(sys.version_info < (3, 10), reason="needs sys.stdlib_module_names")
def test_every_module_level_third_party_import_is_a_declared_dependency():
    declared, missing = _declared(), []
    for path in sorted((ROOT / "kvmirqfast").rglob("*.py")):
        rel = path.relative_to(ROOT / "kvmirqfast")
        if rel.name in PYTEST_ONLY or rel.parts[0] in PYTEST_ONLY:
            continue
        for name in _module_level_imports(path):
            if name in sys.stdlib_module_names or name == "kvmirqfast":
                continue
            if name.lower() not in declared:
                missing.append(f"{rel}: {name}")
    assert not missing, f"imported but not in pyproject dependencies: {missing}"
