"""The flow-matching objective (REFERENCE.md "Training"), the LR schedule, trainable LoRA and atomic checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from imagezoo.errors import InputError
from imagezoo.lora import detect_lora_format, parse_lora_state_dict
from imagezoo.training.checkpoint import atomic_save_safetensors, optimizer_from_files, optimizer_to_files
from imagezoo.training.lora import export_lora, inject_lora, to_opensource
from imagezoo.training.schedule import FlowMatchObjective, lr_lambda, sample_generator, training_sigmas


def test_training_sigma_grid_and_weights_follow_the_recipe():
    sigmas = training_sigmas()
    assert len(sigmas) == 1000 and sigmas[0] == pytest.approx(1.0) and sigmas[-1] == pytest.approx(0.02)
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    # mu = 0.8 exponential shift of linspace(1, 0, 1001)[k], then the terminal stretch.
    raw = 1 - 500 / 1000
    shifted = math.exp(0.8) / (math.exp(0.8) + 1 / raw - 1)
    last = math.exp(0.8) / (math.exp(0.8) + 1 / (1 / 1000) - 1)
    assert float(sigmas[500]) == pytest.approx(1 - (1 - shifted) * 0.98 / (1 - last), rel=1e-9)
    objective = FlowMatchObjective.default()
    weights = objective.weights.double()
    assert weights.mean().item() == pytest.approx(1.0, rel=1e-5)
    assert weights.min().item() == pytest.approx(0.0, abs=1e-6)
    t = objective.sigmas.double() * 1000
    bump = torch.exp(-2 * ((t - 500) / 1000) ** 2)
    assert torch.allclose(weights, (bump - bump.min()) / (bump - bump.min()).mean(), rtol=1e-4)


def test_loss_is_weighted_mse_against_noise_minus_clean():
    objective = FlowMatchObjective.default()
    clean, noise = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    indices = torch.tensor([10, 600])
    noisy = objective.noisy(clean, noise, objective.sigmas[indices])
    s = objective.sigmas[indices].view(-1, 1, 1, 1)
    assert torch.allclose(noisy, (1 - s) * clean + s * noise)
    loss = objective.loss(torch.zeros_like(clean), clean, noise, indices)
    expected = (noise - clean).pow(2).flatten(1).mean(1) * objective.weights[indices]
    assert torch.allclose(loss, expected)


def test_sample_generators_depend_only_on_seed_epoch_and_sample():
    a = torch.randn(3, generator=sample_generator(0, 1, 7))
    assert torch.equal(a, torch.randn(3, generator=sample_generator(0, 1, 7)))
    assert not torch.equal(a, torch.randn(3, generator=sample_generator(0, 2, 7)))
    assert not torch.equal(a, torch.randn(3, generator=sample_generator(0, 1, 8)))


def test_learning_rate_schedules():
    warm = lr_lambda("constant", 4, 100)
    assert [warm(i) for i in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    linear = lr_lambda("linear", 0, 10)
    assert linear(0) == 1.0 and linear(5) == 0.5 and linear(10) == 0.0
    cosine = lr_lambda("cosine", 2, 12)
    assert cosine(2) == 1.0 and cosine(7) == pytest.approx(0.5) and cosine(12) == pytest.approx(0.0)
    with pytest.raises(InputError, match="lr_scheduler='step'"):
        lr_lambda("step", 0, 1)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Module()
        self.attn.to_q = nn.Linear(8, 8)
        self.attn.to_out = nn.ModuleList([nn.Linear(8, 8)])
        self.unused = nn.Linear(8, 8)


def test_lora_starts_at_the_base_model_trains_in_fp32_and_exports_every_format():
    torch.manual_seed(0)
    model = nn.Module()
    model.blocks = nn.ModuleList([_Block(), _Block()])
    model.to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    before = model.blocks[0].attn.to_q(x)
    report = inject_lora(model, ["to_q", "to_out.0"], rank=4, alpha=8, exclude=["blocks.1.attn.to_q"])
    assert report.injected == ["blocks.0.attn.to_q", "blocks.0.attn.to_out.0", "blocks.1.attn.to_out.0"]
    assert report.skipped == ["blocks.1.attn.to_q"]
    assert torch.equal(model.blocks[0].attn.to_q(x), before)  # B starts at zero
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 6 and all(p.dtype == torch.float32 for _, p in trainable)
    assert "blocks.0.attn.to_q.weight" in model.state_dict()  # base keys keep their names
    layer = model.blocks[0].attn.to_q
    nn.init.normal_(layer.lora_B["default"].weight)
    out = layer(x).float()
    delta = (x.float() @ layer.lora_A["default"].weight.T @ layer.lora_B["default"].weight.T) * 2.0
    assert torch.allclose(out, before.float() + delta, atol=0.1, rtol=0.02)

    saved = export_lora(model, prefix="pipe.dit.")
    assert "pipe.dit.blocks.0.attn.to_q.lora_A.default.weight" in saved
    assert torch.equal(saved["pipe.dit.blocks.0.attn.to_q.lora_B.default.weight"], layer.lora_B["default"].weight * 2)
    plain = {k.removeprefix("pipe.dit."): v for k, v in saved.items()}
    assert detect_lora_format(plain) == "diffsynth"
    comfy = to_opensource(plain)
    assert "diffusion_model.blocks.0.attn.to_q.lora_A.weight" in comfy and detect_lora_format(comfy) == "comfyui"
    name = "blocks.0.attn.to_q"
    assert torch.allclose(parse_lora_state_dict(comfy)[name].delta(), parse_lora_state_dict(plain)[name].delta())
    with pytest.raises(InputError, match="match no Linear layer"):
        inject_lora(model, ["to_k"], rank=2)


def test_atomic_save_leaves_no_half_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.safetensors"
    atomic_save_safetensors({"a": torch.ones(2)}, path)
    import imagezoo.training.checkpoint as checkpoint

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_save_safetensors({"a": torch.zeros(2)}, path)
    assert torch.equal(load_file(str(path))["a"], torch.ones(2))  # the previous file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors"]  # no temporary left


def test_optimizer_state_round_trips_without_pickle():
    param = nn.Parameter(torch.randn(3))
    optimizer = torch.optim.AdamW([param], lr=0.1, betas=(0.8, 0.9))
    param.grad = torch.randn(3)
    optimizer.step()
    tensors, structure = optimizer_to_files(optimizer.state_dict())
    restored = torch.optim.AdamW([nn.Parameter(param.detach().clone())], lr=0.5)
    restored.load_state_dict(optimizer_from_files(tensors, structure))
    state = restored.state_dict()
    assert torch.equal(state["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert state["param_groups"][0]["lr"] == 0.1 and tuple(state["param_groups"][0]["betas"]) == (0.8, 0.9)
