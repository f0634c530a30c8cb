"""pyproject.toml lists its packages by hand (launch/ ships as rlhf_launch): every Python package and
every file a run reads from launch/ and reward_data/ must be in that list and its package data."""
from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SETUP = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def source_dir(package: str) -> Path:
    top, *rest = package.split(".")
    base = ROOT / SETUP.get("package-dir", {}).get(top, top)
    return base.joinpath(*rest)


def test_every_package_directory_is_listed():
    listed = set(SETUP["packages"])
    for top in ("rlhf", "stages", "reward_data"):
        for init in (ROOT / top).rglob("__init__.py"):
            name = ".".join(init.parent.relative_to(ROOT).parts)
            assert name in listed, f"{name} is a package but pyproject.toml's packages lacks it"
    for package in listed:
        assert source_dir(package).is_dir(), package


def test_every_launcher_config_and_data_file_ships():
    shipped = set()
    for package in SETUP["packages"]:
        d = source_dir(package)
        globs = ["*.py", *SETUP.get("package-data", {}).get(package, [])]
        shipped |= {f for f in d.iterdir() if f.is_file() and any(fnmatch.fnmatch(f.name, g) for g in globs)}
    wanted = [f for f in (ROOT / "launch").rglob("*") if f.is_file() and "__pycache__" not in f.parts]
    wanted += [f for f in (ROOT / "reward_data").rglob("*") if f.is_file() and "__pycache__" not in f.parts]
    missing = sorted(str(f.relative_to(ROOT)) for f in wanted if f not in shipped)
    assert not missing, f"not in the wheel: {missing}"
