"""The project installs: the wheel pip builds from pyproject.toml holds both packages, the bundled demo weights
and the three console scripts, its version is algorithm.__version__, and installed it runs from any folder
(the bundled weights found beside the installed code, not the checkout's)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from algorithm import __version__
from algorithm.weights_location import MODEL_MOUNT

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SCRIPTS = {"fetalclipseg": "algorithm.__main__:main", "fetalclipseg-serve": "algorithm.serve:main",
           "fetalclipseg-train": "training.__main__:main"}
BUNDLED = "algorithm/weights/fetalclipseg_small_replica.safetensors"


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel pip builds from a copy of the sources (an in-tree build would leave build/ and egg-info)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    for package in ("algorithm", "training"):
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "--wheel-dir", str(root / "dist"), str(source)], capture_output=True, text=True,
                           timeout=600, env=clean_env())
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (path,) = (root / "dist").glob("fetalclipseg-*.whl")
    return path


def wheel_file(wheel: Path, name: str) -> str:
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(f"fetalclipseg-{__version__}.dist-info/{name}").decode()


def test_the_wheel_holds_both_packages_and_the_bundled_weights(wheel):
    assert wheel.name.startswith(f"fetalclipseg-{__version__}-py3-none-any")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        weights = archive.read(BUNDLED)
    assert {"algorithm/__main__.py", "algorithm/model/checkpoint.py", "algorithm/weights/README.md",
            "training/__main__.py"} <= names
    assert weights == (REPO / BUNDLED).read_bytes()
    assert not [name for name in names if name.split("/")[0] in ("test", "tools", "docs")]


def test_the_wheel_declares_version_scripts_licence_and_extras(wheel):
    metadata = wheel_file(wheel, "METADATA")
    assert re.search(rf"^Version: {re.escape(__version__)}$", metadata, re.M)
    assert re.search(r"^License-Expression: Apache-2.0$", metadata, re.M)
    assert re.search(r"^Requires-Python: >=3\.11$", metadata, re.M)
    assert {"train", "dev", "container"} <= set(re.findall(r"^Provides-Extra: (\S+)$", metadata, re.M))
    required = [Requirement(line.split(": ", 1)[1]) for line in metadata.splitlines()
                if line.startswith("Requires-Dist: ")]
    runtime = {r.name.lower() for r in required if r.marker is None}
    assert {"torch", "torchvision", "open-clip-torch", "simpleitk", "safetensors", "fastapi"} <= \
        {name.replace("_", "-") for name in runtime}
    assert "albumentations" not in runtime and "pytest" not in runtime  # extras, not the algorithm's needs
    scripts = dict(re.findall(r"^(\S+) = (\S+)$", wheel_file(wheel, "entry_points.txt"), re.M))
    assert scripts == SCRIPTS


def test_constraints_pin_every_dependency_within_its_bounds():
    """constraints.txt is what CI tests: a version for every requirement of pyproject.toml, inside its bounds."""
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    project = PYPROJECT["project"]
    requirements = project["dependencies"] + sum(project["optional-dependencies"].values(), [])
    requirements += PYPROJECT["build-system"]["requires"]
    for requirement in map(Requirement, requirements):
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        assert name in pins, f"{requirement} has no version in constraints.txt (make constraints)"
        assert requirement.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} vs {requirement}"
    assert "fetalclipseg" not in pins


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The wheel installed by pip into a fresh virtual environment; its dependencies are this interpreter's
    (a .pth file naming its site-packages), so nothing is downloaded. Returns the environment's bin/."""
    venv = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                           "--no-deps", "--no-index", str(wheel)], capture_output=True, text=True, timeout=600,
                          env=clean_env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return venv / "bin"


@pytest.mark.parametrize("script", ["fetalclipseg", "fetalclipseg-serve", "fetalclipseg-train"])
def test_every_console_script_prints_its_own_name_and_the_version(installed, tmp_path, script):
    done = subprocess.run([str(installed / script), "--version"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=clean_env())
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{script} {__version__}"


def test_python_m_training_prints_the_version():
    done = subprocess.run([sys.executable, "-m", "training", "--version"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == f"python -m training {__version__}", done.stderr


@pytest.mark.skipif(MODEL_MOUNT.exists(), reason=f"{MODEL_MOUNT} exists: the bundled weights would not be used")
def test_the_installed_algorithm_runs_a_case_from_any_folder_with_its_bundled_weights(installed, tmp_path,
                                                                                     small_case):
    case, _, _ = small_case
    done = subprocess.run([str(installed / "fetalclipseg"), "--input", str(case), "--output", str(tmp_path / "out"),
                           "--device", "cpu", "--no-extras"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=900, env=clean_env())
    assert done.returncode == 0, done.stderr[-3000:]
    where = subprocess.run([str(installed / "python"), "-c", "import algorithm; print(algorithm.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300, env=clean_env())
    package = Path(where.stdout.strip()).resolve().parent
    assert package.is_relative_to(installed.parent.resolve()) and not package.is_relative_to(REPO)
    assert f"weights {package / 'weights' / Path(BUNDLED).name}:" in done.stderr
    assert isinstance(json.loads((tmp_path / "out" / "fetal-abdomen-frame-number.json").read_text()), int)


# ------------------------------------------------------------------------------- what the project states

def test_the_accepted_formats_are_stated_alike_in_messages_readme_and_docs(tmp_path):
    from algorithm.contract import ACCEPTED_FORMATS, INPUT_FOLDER, find_input_image, read_stack
    from algorithm.errors import InputError

    assert ACCEPTED_FORMATS == ".mha, .mhd, .tif, .tiff, .nii, .nii.gz"
    for document in ("README.md", "docs/robustness.md"):
        assert ACCEPTED_FORMATS in (REPO / document).read_text(), document
    (tmp_path / INPUT_FOLDER).mkdir(parents=True)
    with pytest.raises(InputError, match=re.escape(f"no image ({ACCEPTED_FORMATS})")):
        find_input_image(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match=re.escape(f"({ACCEPTED_FORMATS})")):
        read_stack(tmp_path / "notes.txt")


def test_weights_name_the_non_commercial_terms_they_inherit():
    from algorithm.model.checkpoint import inherited_terms

    assert inherited_terms(fetalclip=False, challenge_data=False) == ""
    fetalclip, data = inherited_terms(True, False), inherited_terms(False, True)
    assert "non-commercial" in fetalclip and "CC BY-NC 4.0" in fetalclip and "SA" not in fetalclip
    assert "non-commercial" in data and "CC BY-NC-SA 4.0" in data and "FetalCLIP" not in data
    assert "CC BY-NC 4.0" in inherited_terms(True, True) and "CC BY-NC-SA 4.0" in inherited_terms(True, True)


def test_licence_notice_and_changelog():
    assert (REPO / "LICENSE").read_text().split()[:4] == ["Apache", "License", "Version", "2.0,"]
    licences = (REPO / "README.md").read_text().split("## Licences", 1)[1].split("\n## ", 1)[0]
    for needle in ("Apache License 2.0", "CC BY-NC 4.0", "CC BY-NC-SA 4.0", "non-commercial"):
        assert needle in licences, needle
    changelog = (REPO / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in changelog and f"## [{__version__}] - " in changelog
