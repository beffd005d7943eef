"""Strategies by name: registration, declared order, option routing, clear errors for nonsensical combinations."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import imagezoo
from imagezoo.errors import InputError
from imagezoo.plugin_manager import get_kernel


def _names(pipe) -> list[str]:
    return [s.name for s in pipe.memory_strategies]


def test_builtin_strategies_are_registered_by_the_memory_plugin():
    table = get_kernel().memory_strategies
    for name in ("fp8", "offload", "stream", "disk"):
        assert table.get(name).plugin == "imagezoo.plugins.memory"


def test_plugin_is_cheap_to_import():
    code = (
        "import sys, imagezoo.plugin_manager as pm; pm.get_kernel().memory_strategies; "
        "loaded = [m for m in sys.modules if m.startswith('imagezoo.plugins.memory.')]; assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-P", "-c", code], check=True)


def test_strategies_apply_in_declared_order_whatever_the_given_order(clean, reference, generate):
    clean.enable_memory(["offload", "fp8"], vram_limit=0)  # vram_limit goes to offload only
    assert _names(clean) == ["fp8", "offload"]
    assert clean.memory_strategies[1].vram_limit == 0
    assert 0 < ((generate(clean) - reference).norm() / reference.norm()).item() < 0.01


def test_disjoint_components_may_use_different_placements(clean, reference, generate):
    clean.enable_memory(["stream"], vram_limit=0, components=["dit"])
    clean.enable_memory(["offload"], components=["text_encoder", "vae"])
    assert torch.equal(generate(clean), reference)


def test_disable_one_removes_it_and_those_after_it(clean):
    clean.enable_memory(["fp8", "stream"], components=["dit"])
    clean.disable_memory("stream")
    assert _names(clean) == ["fp8"]
    clean.disable_memory("fp8")
    assert _names(clean) == []


@pytest.mark.parametrize(
    ("first", "then", "message"),
    [
        ([], ["offload", "stream"], r"'offload' and 'stream' both set the placement of the dit"),
        ([], ["fp8", "disk"], r"'disk' and 'fp8' cannot both apply to the dit: disk streaming re-reads"),
        ([], ["fp8", "fp8"], r"'fp8' given twice"),
        (["offload"], ["fp8"], r"'fp8' \(storage dtype\) cannot follow 'offload' \(placement\)"),
        (["stream"], ["stream"], r"'stream' given twice"),
    ],
)
def test_nonsensical_combinations_are_clear_errors(clean, first, then, message):
    if first:
        clean.enable_memory(first)
    with pytest.raises(InputError, match=message):
        clean.enable_memory(then)
    assert _names(clean) == first  # nothing of the refused call was applied


def test_an_option_no_strategy_takes_is_an_error(clean):
    with pytest.raises(InputError, match=r"'vram_limit' are taken by none of \['fp8'\]; fp8 takes"):
        clean.enable_memory(["fp8"], vram_limit=12)
    assert _names(clean) == []


def test_load_and_cli_style_names_with_a_budget(models_dir):
    pipe = imagezoo.load(
        "tiny",
        device="cpu",
        torch_dtype=torch.float32,
        local_model_path=models_dir,
        memory=["fp8", "offload"],
        vram_limit=12,
    )
    assert _names(pipe) == ["fp8", "offload"]
    # 12 GB minus the 0.5 GB buffer; every component is managed, so nothing else counts against it.
    assert pipe.memory_strategies[1].budget == int(11.5 * 1024**3)
    pipe.disable_memory()


def test_cli_memory_flags(models_dir, tmp_path, monkeypatch):
    from imagezoo import cli
    from imagezoo.pipeline import Pipeline

    applied = []
    original = Pipeline.enable_memory

    def recording(self, names, **options):
        original(self, names, **options)
        applied.append(([s.name for s in self.memory_strategies], options))

    monkeypatch.setattr(Pipeline, "enable_memory", recording)
    common = ["generate", "--model", "tiny", "--prompt", "a cat", "--height", "32", "--width", "32"]
    common += ["--steps", "1", "--seed", "1", "--local-model-path", str(models_dir)]
    images = {}
    for label, flags in {
        "plain": [],
        "fp8+offload": ["--memory", "fp8,offload", "--vram-limit", "12"],
        "budget only": ["--vram-limit", "0"],
    }.items():
        out = tmp_path / f"{len(images)}.png"
        assert cli.main([*common, "--out", str(out), *flags]) == 0
        images[label] = out.read_bytes()
    assert applied == [(["fp8", "offload"], {"vram_limit": 12.0}), (["stream"], {"vram_limit": 0.0})]
    assert images["budget only"] == images["plain"]  # streaming is exact, down to the PNG bytes
