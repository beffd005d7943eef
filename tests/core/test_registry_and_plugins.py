"""Registry schema, ID/alias lookup, duplicates, plugin loading/allow-list/blocking, provenance."""

from __future__ import annotations

import pytest

from imagezoo import hookimpl
from imagezoo.errors import ConfigError, ModelNotFoundError, PluginError, UnknownNameError
from imagezoo.plugin_manager import BUILTIN_PLUGINS, Kernel
from imagezoo.registry import BUILTIN_TABLE, ModelRegistry, load_builtin_table


def _entry(model_id: str, aliases: list[str] | None = None) -> dict:
    return {
        "id": model_id,
        "aliases": aliases or [],
        "family": "qwen_image",
        "components": {"dit": {"pattern": "transformer/*.safetensors"}},
    }


def test_builtin_table_validates_and_has_official_models():
    ids = {entry.id for entry in load_builtin_table()}
    assert {"Qwen/Qwen-Image", "DiffSynth-Studio/Qwen-Image-Distill-Full"} <= ids


def test_lookup_by_hub_id_or_alias_case_insensitive():
    kernel = Kernel(load=[])
    for name in ("Qwen/Qwen-Image", "qwen/qwen-image", "QWEN-IMAGE", "qwen-image"):
        assert kernel.models.get(name).id == "Qwen/Qwen-Image"
    assert kernel.models.provenance("qwen-image") == BUILTIN_TABLE
    assert kernel.models.get("tiny").id == "imagezoo/tiny-qwen-image"
    assert kernel.models.provenance("tiny") == "imagezoo.plugins.qwen_image"


def test_unknown_model_suggests_close_names():
    kernel = Kernel(load=[])
    with pytest.raises(ModelNotFoundError) as info:
        kernel.models.get("qwen-imge")
    message = str(info.value)
    assert "'qwen-imge'" in message and "Did you mean" in message and "qwen-image" in message


def test_duplicate_id_or_alias_is_an_error_naming_both_plugins():
    registry = ModelRegistry()
    registry.add(_entry("a/model", ["short"]), "plugin-one")
    with pytest.raises(PluginError, match=r"plugin-one.*plugin-two"):
        registry.add(_entry("b/model", ["SHORT"]), "plugin-two")
    with pytest.raises(PluginError, match=r"(?i)duplicate model ID 'a/model'"):
        registry.add(_entry("A/Model"), "plugin-two")


def test_entry_schema_forbids_unknown_fields():
    registry = ModelRegistry()
    bad = _entry("x/y")
    bad["default"] = {"num_inference_steps": 3}
    with pytest.raises(ConfigError, match="x/y"):
        registry.add(bad, "p")
    bad = _entry("x/z")
    bad["defaults"] = {"num_inference_steps": 0}
    with pytest.raises(ConfigError, match="num_inference_steps"):
        registry.add(bad, "p")


class _ExtraModels:
    @hookimpl
    def register_models(self, register):
        register(_entry("third/party-model", ["tp"]))


class _DuplicateModels:
    @hookimpl
    def register_models(self, register):
        register(_entry("Qwen/Qwen-Image"))


def test_hook_registered_models_merge_and_remember_plugin():
    kernel = Kernel(load=[])
    kernel.pm.register(_ExtraModels(), name="extra")
    assert kernel.models.get("TP").id == "third/party-model"
    assert kernel.models.provenance("tp") == "extra"


def test_hook_registered_duplicate_of_builtin_is_an_error():
    kernel = Kernel(load=[])
    kernel.pm.register(_DuplicateModels(), name="dupe")
    with pytest.raises(PluginError, match=r"Qwen/Qwen-Image.*dupe"):
        _ = kernel.models


def test_blocking_a_builtin_removes_what_it_registered():
    kernel = Kernel(load=[], block=["imagezoo.plugins.samplers"])
    assert "imagezoo.plugins.samplers" not in [info.name for info in kernel.plugins()]
    with pytest.raises(UnknownNameError, match="flow_match_euler"):
        kernel.samplers.get("flow_match_euler")


def test_env_allow_list_and_block_list(monkeypatch):
    monkeypatch.setenv("IMAGEZOO_BLOCK_PLUGINS", "imagezoo.plugins.samplers")
    kernel = Kernel()
    assert "flow_match_euler" not in kernel.samplers
    monkeypatch.delenv("IMAGEZOO_BLOCK_PLUGINS")
    assert "flow_match_euler" in Kernel().samplers


def test_plugins_listing_shows_builtins_and_hooks():
    infos = {info.name: info for info in Kernel(load=[]).plugins()}
    for name in BUILTIN_PLUGINS:
        assert infos[name].builtin
    assert "register_samplers" in infos["imagezoo.plugins.samplers"].hooks
    assert {"register_models", "register_components", "resolve_weights"} <= set(
        infos["imagezoo.plugins.qwen_image"].hooks
    )


def test_unknown_memory_strategy_names_value_and_available():
    kernel = Kernel(load=[])
    with pytest.raises(UnknownNameError, match=r"'bogus'.*Available"):
        kernel.memory_strategies.get("bogus")
