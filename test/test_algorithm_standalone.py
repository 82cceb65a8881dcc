"""The shipped package stands alone: every module of a copy of `algorithm/` imports with nothing else on the path.

The Docker image holds `algorithm/` and the runtime requirements only; a module that reaches for `training`
(or anything else of this repository) would fail there, not here, unless a test imports it the image's way.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "algorithm"
MODULES = sorted(
    ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
    for path in PACKAGE.rglob("*.py") if "__pycache__" not in path.parts)

# Run isolated (-I: no PYTHONPATH, no user site, no script or working folder on sys.path), with the copy's
# folder as the only entry besides the standard library and this interpreter's site-packages. An editable
# install of this project (`make setup`) maps its packages to the checkout through setuptools' finder:
# the image has no such thing, so the probe removes it.
PROBE = """
import importlib, json, sys, traceback
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path[:] = [p for p in sys.path if not p.startswith("__editable__")]
sys.path.insert(0, sys.argv[1])
results = {}
for name in sys.argv[2:]:
    try:
        module = importlib.import_module(name)
        results[name] = {"ok": True, "file": module.__file__}
    except BaseException:
        results[name] = {"ok": False, "error": traceback.format_exc(limit=3)}
try:
    importlib.import_module("training")
    results["training importable"] = True
except ImportError:
    results["training importable"] = False
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("standalone")
    shutil.copytree(PACKAGE, root / "algorithm",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.safetensors"))
    done = subprocess.run([sys.executable, "-I", "-c", PROBE, str(root), *MODULES], cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    results["root"] = str(root)
    return results


def test_the_probe_cannot_see_the_repository(imported):
    assert imported["training importable"] is False


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_from_a_copy_of_algorithm_alone(imported, module):
    result = imported[module]
    assert result["ok"], result.get("error")
    assert Path(result["file"]).is_relative_to(imported["root"])  # the copy, not the checkout
