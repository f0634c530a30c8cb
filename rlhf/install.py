"""Where the stage launchers and the shipped configs are: launch/ in a checkout, the package
rlhf_launch (the same files, pyproject.toml's package-dir) in an installed wheel."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]        # the checkout, or site-packages when installed
CHECKOUT = (ROOT / "launch" / "_stage.sh").is_file()
LAUNCH_DIR = ROOT / "launch" if CHECKOUT else ROOT / "rlhf_launch"
CONFIGS_DIR = LAUNCH_DIR / "configs"
DEMO_CONFIG = CONFIGS_DIR / "demo.yaml"


def demo_artifact_dir() -> Path | None:
    """Where `rlhf demo` writes by default: the demo config's own artifact_dir (artifacts/demo in the
    checkout) when run from a checkout; artifacts/demo under the current directory when installed
    (the config's relative path would point into site-packages)."""
    return None if CHECKOUT else Path.cwd() / "artifacts" / "demo"


def install_hint(package: str) -> str:
    """How to install a missing dependency of this package for the running interpreter."""
    import sys

    if CHECKOUT:
        return f"`{sys.executable} -m pip install -e {ROOT}`"
    return f"`{sys.executable} -m pip install {package}` (or reinstall rlhf, which depends on it)"
