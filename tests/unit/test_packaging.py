"""The package as built: every subpackage and config file goes into the wheel, the config tree is found through
the package wherever it is installed, and every console script names a real entry point. (The installed wheel
itself is used from outside the checkout by .ci/wheel_test.sh, `make test-wheel`.)"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import alignexp
from alignexp.config import CONF_DIR, conf_dir
from tests.conftest import REPO

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
CONSOLE_SCRIPTS = {"alignexp-train", "alignexp-evaluate", "alignexp-sample", "alignexp-report", "alignexp-data",
                   "alignexp-plan"}


def test_every_subpackage_is_listed():
    """A mapped folder (conf/ -> alignexp.conf) rules out setuptools' `find`, so the list is explicit: a new
    subpackage missing from pyproject.toml's `packages` would be missing from the wheel."""
    folders = {p.parent for p in (REPO / "alignexp").rglob("*.py") if "__pycache__" not in p.parts}
    without_init = sorted(str(f.relative_to(REPO)) for f in folders if not (f / "__init__.py").exists())
    assert without_init == [], "folders of modules without __init__.py"
    found = {".".join(f.relative_to(REPO).parts) for f in folders}
    assert sorted(SETUPTOOLS["packages"]) == sorted(found | {"alignexp.conf", "hydra_plugins.alignexp_optuna"}), \
        "pyproject.toml [tool.setuptools] packages must list every package of alignexp/"
    assert SETUPTOOLS["package-dir"] == {"alignexp.conf": "conf"}


def test_the_config_tree_holds_only_yaml():
    """Only *.yaml ships (package-data), so any other file under conf/ would exist in a checkout only."""
    others = sorted(str(p.relative_to(REPO)) for p in (REPO / "conf").rglob("*") if p.is_file()
                    and p.suffix != ".yaml" and "__pycache__" not in p.parts)
    assert others == []
    assert SETUPTOOLS["package-data"] == {"alignexp.conf": ["*.yaml", "**/*.yaml"]}


@pytest.mark.parametrize("name", sorted(CONSOLE_SCRIPTS))
def test_console_scripts_name_entry_points(name):
    scripts = PYPROJECT["project"]["scripts"]
    assert set(scripts) == CONSOLE_SCRIPTS
    module, function = scripts[name].split(":")
    assert callable(getattr(importlib.import_module(module), function))


def test_conf_dir_in_a_checkout_is_the_top_level_conf():
    assert conf_dir() == CONF_DIR == str((REPO / "conf").resolve())
    assert conf_dir is alignexp.conf_dir  # one function, importable without Hydra (gpu_check uses it)


def _conf_dir_in(site: Path) -> subprocess.CompletedProcess:
    code = "import alignexp; print(alignexp.conf_dir())"
    return subprocess.run([sys.executable, "-c", code], cwd=site, env={"PYTHONPATH": str(site), "PATH": ""},
                          capture_output=True, text=True, timeout=60)


def test_conf_dir_finds_the_installed_copy_first_and_names_both_places_when_missing(tmp_path):
    """An installed layout: site-packages/alignexp/conf/ wins over a stray site-packages/conf/."""
    (tmp_path / "alignexp").mkdir()
    shutil.copy(REPO / "alignexp" / "__init__.py", tmp_path / "alignexp" / "__init__.py")
    result = _conf_dir_in(tmp_path)
    assert result.returncode == 1
    assert f"neither {tmp_path / 'alignexp' / 'conf'}" in result.stderr and str(tmp_path / "conf") in result.stderr
    for folder in (tmp_path / "conf", tmp_path / "alignexp" / "conf"):
        folder.mkdir()
        (folder / "train.yaml").write_text("seed: 0\n")
    assert _conf_dir_in(tmp_path).stdout.strip() == str(tmp_path / "alignexp" / "conf")


def test_the_wheel_holds_every_module_and_config_file(tmp_path):
    """Built from a copy of the checkout, with this environment's setuptools and no index (offline)."""
    setuptools = pytest.importorskip("setuptools")
    if tuple(int(part) for part in setuptools.__version__.split(".")[:2]) < (70, 1):
        pytest.skip(f"setuptools {setuptools.__version__} builds no wheel by itself (the dev extra brings 70.1+)")
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("alignexp", "conf", "hydra_plugins"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index", "-q",
                    "-w", str(tmp_path / "dist"), str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("alignexp-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    yaml = {f"alignexp/conf/{p.relative_to(REPO / 'conf').as_posix()}" for p in (REPO / "conf").rglob("*.yaml")}
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "alignexp").rglob("*.py")
               if "__pycache__" not in p.parts}
    assert yaml - names == set() and modules - names == set()
    assert not any(name.startswith(("conf/", "tests/")) for name in names)
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert all(f"{script} = " in entry_points for script in CONSOLE_SCRIPTS)


# The oldest release of each dependency that has what alignexp calls (the floors in pyproject.toml must not
# be older): transformers 4.56 renamed from_pretrained's / from_config's torch_dtype to dtype= (4.53 added
# masking_utils, AttentionInterface came before); torch 2.6 made torch.distributed.fsdp.fully_shard and its
# policies public (FSDP2); vLLM 0.10.2: alignexp.sampling.vllm_backend.MIN_VLLM (V1, raw log-probs, apply_model).
NEEDED_FLOORS = {"transformers": "4.56", "torch": "2.6", "vllm": "0.10.2"}


def test_dependency_floors_are_the_releases_the_code_needs():
    import re

    from packaging.version import Version

    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    floors = {}
    for requirement in requirements:
        match = re.match(r"([A-Za-z0-9_.-]+).*?>=\s*([0-9][0-9.]*)", requirement)
        if match:
            floors[match.group(1).lower()] = match.group(2)
    for name, needed in NEEDED_FLOORS.items():
        assert name in floors, f"{name} has no floor in pyproject.toml"
        assert Version(floors[name]) >= Version(needed), f"{name}>={floors[name]}, but the code needs {needed}"
    from alignexp.sampling.vllm_backend import MIN_VLLM

    assert floors["vllm"] == MIN_VLLM
