"""`pip install -e '.[test]'` is enough to collect and run the tests: every third-party
module a test module imports at its top comes from a distribution that setup.cfg installs
(`install_requires` or the `test` extra), unless the module is `pytest.importorskip`-ed
(notebooks, TFDS), so that the test skips, naming the extra, instead of breaking the
collection of the whole suite. Optional packages needed only inside tests are skipped by
tests/conftest.py (`@pytest.mark.needs`)."""

import ast
import configparser
import importlib.metadata
import pathlib
import re
import sys

from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"


def _name(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def installed_by_the_test_extra() -> set[str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines()
    lines += cfg["options.extras_require"]["test"].splitlines()
    return {_name(Requirement(x).name) for x in lines if x.strip()}


def top_level_imports(path: pathlib.Path) -> tuple[set[str], set[str]]:
    """The top-level package names a module imports at import time (module body), and
    those it passes to `pytest.importorskip` there."""
    imported, skipped = set(), set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
        for call in ast.walk(node):
            if (
                isinstance(call, ast.Call)
                and isinstance(call.func, ast.Attribute)
                and call.func.attr == "importorskip"
                and isinstance(call.args[0], ast.Constant)
            ):
                skipped.add(call.args[0].value.split(".")[0])
    return imported, skipped


def test_test_modules_import_only_what_the_test_extra_installs():
    allowed = installed_by_the_test_extra()
    assert {"pytest", "jax"} <= allowed  # the file was read
    local = {p.stem for p in TESTS.rglob("*.py")} | {"sora_jax"}
    distributions = importlib.metadata.packages_distributions()
    problems = []
    modules = sorted(TESTS.rglob("test_*.py")) + [TESTS / "conftest.py"]
    assert len(modules) > 20
    for path in modules:
        imported, skipped = top_level_imports(path)
        for module in sorted(imported - skipped - local - set(sys.stdlib_module_names)):
            dists = {_name(d) for d in distributions.get(module, [])}
            if not dists & allowed:
                where = path.relative_to(ROOT)
                problems.append(f"{where} imports {module} ({sorted(dists) or 'not installed'})")
    assert not problems, (
        "add the distribution to the test extra in setup.cfg, or pytest.importorskip the "
        "module with a reason naming its extra:\n" + "\n".join(problems)
    )
