"""The example plugin under docs/examples installs with pip and is discovered through its entry point."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "imagezoo-example-plugin"


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example plugin pip-installed into a private folder (added to PYTHONPATH of the child processes)."""
    source = tmp_path_factory.mktemp("src") / "plugin"
    shutil.copytree(EXAMPLE, source)
    site = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(site),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    return site


def _imagezoo(site: Path, models_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(site), "IMAGEZOO_MODELS_DIR": str(models_dir), **env}
    code = f"from imagezoo.cli import main; raise SystemExit(main({list(args)!r}))"
    return subprocess.run([sys.executable, "-P", "-c", code], env=environment, capture_output=True, text=True)


def test_plugin_is_discovered_with_its_version_and_hooks(plugin_site, models_dir):
    result = _imagezoo(plugin_site, models_dir, "plugins", "--json")
    plugins = {p["name"]: p for p in json.loads(result.stdout)}
    assert plugins["example"]["version"] == "0.1.0" and not plugins["example"]["builtin"]
    assert set(plugins["example"]["hooks"]) == {"register_models", "register_samplers", "register_memory_strategies"}
    models = {m["id"]: m for m in json.loads(_imagezoo(plugin_site, models_dir, "models", "--json").stdout)}
    assert models["example/tiny-linear"]["plugin"] == "example"


def test_plugin_model_generates_with_plugin_sampler(plugin_site, models_dir, tmp_path):
    out = tmp_path / "x.png"
    result = _imagezoo(
        plugin_site,
        models_dir,
        "generate",
        "--model",
        "tiny-linear",
        "--prompt",
        "hi",
        "--out",
        str(out),
        "--seed",
        "0",
    )
    assert result.returncode == 0, result.stderr
    from PIL import Image

    with Image.open(out) as image:
        assert image.size == (64, 64)


def test_allow_list_and_block_list_exclude_it(plugin_site, models_dir):
    for env in ({"IMAGEZOO_LOAD_PLUGINS": ""}, {"IMAGEZOO_BLOCK_PLUGINS": "example"}):
        names = [p["name"] for p in json.loads(_imagezoo(plugin_site, models_dir, "plugins", "--json", **env).stdout)]
        assert "example" not in names and "imagezoo.plugins.qwen_image" in names
    names = [
        p["name"]
        for p in json.loads(
            _imagezoo(plugin_site, models_dir, "plugins", "--json", IMAGEZOO_LOAD_PLUGINS="example").stdout
        )
    ]
    assert "example" in names
