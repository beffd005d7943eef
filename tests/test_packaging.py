"""The package list in pyproject.toml matches the source folders, and the source tree never shadows the install."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _packages_on_disk() -> set[str]:
    found = set()
    for source, name in (("core", "imagezoo"), ("plugins", "imagezoo.plugins")):
        for init in (ROOT / source).rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            relative = init.parent.relative_to(ROOT / source).parts
            found.add(".".join((name, *relative)))
    return found


def test_package_list_matches_folders():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(config["packages"]) == _packages_on_disk()
    assert config["package-dir"] == {"imagezoo": "core", "imagezoo.plugins": "plugins"}


def test_source_folders_never_imported_as_top_level_modules():
    code = (
        "import sys, imagezoo, imagezoo.plugin_manager as pm; pm.get_kernel().models; "
        "import imagezoo.plugins.qwen_image; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('core', 'plugins')]; "
        "assert not bad, bad; print(imagezoo.__file__)"
    )
    out = subprocess.run([sys.executable, "-P", "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("__init__.py")


def test_registry_yaml_is_package_data():
    from importlib import resources

    text = resources.files("imagezoo").joinpath("registry.yaml").read_text()
    assert text == (ROOT / "registry.yaml").read_text()
