"""README.md's two set-up commands are the ones CI and users run."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _readme_commands():
    return re.findall(r"```sh\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_readme_has_selftest_and_test_commands():
    cmds = _readme_commands()
    assert any(c.endswith("kvmirqfast selftest") and "pip install" in c for c in cmds)
    assert any("pytest" in c and "pip install" in c for c in cmds)


def test_ci_runs_the_readme_test_command_verbatim():
    test_cmd = next(c for c in _readme_commands() if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci


def test_readme_usage_example_runs():
    (example,) = re.findall(r"```python\n(.+?)```", (ROOT / "README.md").read_text(), re.S)
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["vector"] == 0x41
