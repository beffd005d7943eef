"""Multi-process generation (`imagezoo.parallel`): a self-spawned 2-process pipeline (gloo, CPU) gives the
one-process result; calls, errors and state changes reach every rank; layout and launch checks need no processes.

Sequence parallelism is family code and is tested with the Qwen-Image plugin (tests/plugins/qwen_image).
"""

from __future__ import annotations

import operator
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import imagezoo
from imagezoo import cli
from imagezoo.errors import ConfigError, InputError
from imagezoo.interfaces import TextConditioning
from imagezoo.lora import LoraLayer, lora_state_dict
from imagezoo.parallel import Layout, ParallelPipeline, _trim_padding, check_mode, is_main_process, launch
from imagezoo.pipeline import Pipeline


def _silent(iterable):
    return iterable


CFG_CALL = {"prompt": "a red bicycle", "seed": 0, "num_inference_steps": 2, "output_type": "latent"}


def _random_lora(pipe: Pipeline) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    layers = {}
    for name, module in pipe.components.modules["dit"].named_modules():
        if name.startswith("transformer_blocks.") and name.endswith("to_q"):
            out_features, in_features = module.weight.shape
            layers[name] = LoraLayer(
                torch.randn(2, in_features, generator=generator), torch.randn(out_features, 2, generator=generator)
            )
    return lora_state_dict(layers, "peft")


@pytest.fixture(scope="module")
def spawned(models_dir: Path):
    """rank 0 of a 2-process pipeline this process spawned (batch split only: family-agnostic)."""
    pipe = imagezoo.load(
        "tiny", device="cpu", torch_dtype=torch.float32, local_model_path=models_dir, gpus=2, parallel="cfg"
    )
    yield pipe
    pipe.close()


def test_spawned_cfg_parallel_gives_the_single_process_result(spawned, tiny_pipe):
    assert isinstance(spawned, ParallelPipeline) and spawned.parallel.role == "leader"
    expected = tiny_pipe(**CFG_CALL, progress_bar_cmd=_silent)
    got = spawned(**CFG_CALL, progress_bar_cmd=_silent)
    assert spawned.parallel.last_layout.describe(spawned.parallel.sequence_parallel) == "cfg"
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # Decoded on rank 0, broadcast; and a call without CFG (nothing to split) computed alike on both ranks.
    call = {**CFG_CALL, "output_type": "np", "cfg_scale": 1.0}
    np.testing.assert_allclose(spawned(**call), tiny_pipe(**call, progress_bar_cmd=_silent), rtol=1e-4, atol=1e-5)
    assert spawned.parallel.last_layout.describe(False) == "single"


def test_errors_reach_the_caller_and_ranks_stay_in_step(spawned):
    with pytest.raises(InputError, match="height=100"):
        spawned("a cat", height=100)
    with pytest.raises(InputError, match="cfg_scale"):
        spawned("a cat", cfg_scale=-1)
    assert spawned(**CFG_CALL, progress_bar_cmd=_silent).shape == (1, 16, 16, 16)


def test_state_changes_are_replayed_on_the_workers(spawned, models_dir):
    # A LoRA loaded through the leader must change every rank's half of the CFG batch, as it does in one process.
    reference = Pipeline.from_registry("tiny", device="cpu", torch_dtype=torch.float32, local_model_path=models_dir)
    lora = _random_lora(reference)
    reference.load_lora(lora, scale=0.5, name="x")
    spawned.load_lora(lora, scale=0.5, name="x")
    try:
        expected = reference(**CFG_CALL, progress_bar_cmd=_silent)
        torch.testing.assert_close(spawned(**CFG_CALL, progress_bar_cmd=_silent), expected, rtol=1e-4, atol=1e-5)
    finally:
        spawned.unload_lora("x")
    # run_on_all runs a picklable function on each rank with the rank's pipeline and returns rank 0's result.
    assert spawned.run_on_all(getattr, "dtype") == torch.float32
    # A failure on a worker only (the text encoder lives on rank 0) is raised by the caller, naming the rank.
    with pytest.raises(imagezoo.ImagezooError, match=r"Rank 1 failed in run_on_all.*rank 0 only"):
        spawned.run_on_all(operator.attrgetter("text_encoder.tokenizer"))
    assert spawned(**CFG_CALL, progress_bar_cmd=_silent).shape == (1, 16, 16, 16)


def test_memory_strategies_apply_on_every_rank(spawned, models_dir, tiny_pipe):
    # FP8 storage of the DiT on each GPU: the split CFG batch must equal one process with the same strategy. Rank 1
    # computes the negative half, so without the strategy there the result would carry the plain model's values.
    reference = Pipeline.from_registry("tiny", device="cpu", torch_dtype=torch.float32, local_model_path=models_dir)
    reference.enable_memory(["fp8"], components=["dit"])
    spawned.enable_memory(["fp8"], components=["dit"])
    try:
        expected = reference(**CFG_CALL, progress_bar_cmd=_silent)
        plain = tiny_pipe(**CFG_CALL, progress_bar_cmd=_silent)
        assert torch.max(torch.abs(expected - plain)).item() > 1e-3  # FP8 visibly changes the result
        torch.testing.assert_close(spawned(**CFG_CALL, progress_bar_cmd=_silent), expected, rtol=1e-4, atol=1e-5)
    finally:
        spawned.disable_memory()
    torch.testing.assert_close(spawned(**CFG_CALL, progress_bar_cmd=_silent), plain, rtol=1e-4, atol=1e-5)


def test_rank_zero_alone_keeps_the_text_encoder_and_vae(spawned):
    assert {"dit", "text_encoder", "vae"} <= set(spawned.components.modules)
    assert is_main_process(spawned) and spawned.is_main


# ----------------------------------------------------------------------------------------------------------------------
# No processes


def test_trim_padding_drops_only_columns_padded_in_every_row():
    mask = torch.tensor([[True, True, False, False], [True, False, False, False]])
    text = TextConditioning(torch.randn(2, 4, 3), mask)
    trimmed = _trim_padding(text)
    assert trimmed.embeds.shape == (2, 2, 3) and torch.equal(trimmed.mask, mask[:, :2])
    assert _trim_padding(TextConditioning(text.embeds, mask, {"x": 1})).embeds.shape[1] == 4  # extras: untouched


def test_layout_names():
    assert Layout(2, 1, 0, 0, None, None).describe(True) == "cfg"
    assert Layout(2, 2, 0, 1, None, None).describe(True) == "cfg+sp"
    assert Layout(2, 2, 0, 1, None, None).describe(False) == "cfg"
    assert Layout(1, 2, 0, 1, None, None).describe(True) == "sp"
    assert Layout(1, 2, 0, 1, None, None).describe(False) == "single"


def test_launch_checks_arguments(monkeypatch):
    with pytest.raises(InputError, match="parallel='ring'"):
        check_mode("ring")
    with pytest.raises(InputError, match="gpus=0"):
        launch(ParallelPipeline, "from_registry", ("tiny",), {}, gpus=0, mode="auto")
    if torch.cuda.device_count() < 64:
        with pytest.raises(ConfigError, match="gpus=64"):
            launch(ParallelPipeline, "from_registry", ("tiny",), {"device": "cuda"}, gpus=64, mode="auto")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="launcher started 2"):
        launch(ParallelPipeline, "from_registry", ("tiny",), {}, gpus=3, mode="auto")


def test_a_group_imagezoo_started_is_left_at_exit():
    # In a fresh interpreter: the exit hook must destroy the group (a live gloo group at teardown can abort).
    script = (
        "import atexit, socket, torch.distributed as dist\n"
        "from imagezoo.parallel import init_distributed\n"
        "sock = socket.socket(); sock.bind(('127.0.0.1', 0)); port = sock.getsockname()[1]; sock.close()\n"
        "env = init_distributed('cpu', rank=0, world_size=1, init_method=f'tcp://127.0.0.1:{port}')\n"
        "assert env.owns_group and dist.is_initialized()\n"
        "atexit._run_exitfuncs()\n"
        "print('initialized after exit hooks:', dist.is_initialized())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "initialized after exit hooks: False" in done.stdout


def test_one_gpu_is_a_plain_pipeline(models_dir):
    pipe = ParallelPipeline.from_registry(
        "tiny", gpus=1, device="cpu", torch_dtype=torch.float32, local_model_path=models_dir
    )
    assert pipe.parallel is None and is_main_process(pipe)
    assert pipe(**CFG_CALL, progress_bar_cmd=_silent).shape == (1, 16, 16, 16)


def test_cli_passes_gpus_and_only_rank_zero_writes(monkeypatch, tmp_path, capsys):
    seen = {}

    class FakePipe:
        parallel = SimpleNamespace(is_main=False)

        def __call__(self, *args, **kwargs):
            from PIL import Image

            return Image.new("RGB", (16, 16))

    def fake_load(model, **kwargs):
        seen.update(kwargs)
        return FakePipe()

    monkeypatch.setattr(imagezoo, "load", fake_load)
    out = tmp_path / "x.png"
    assert cli.main(["generate", "--prompt", "a", "--gpus", "2", "--parallel", "sp", "--out", str(out)]) == 0
    assert seen["gpus"] == 2 and seen["parallel"] == "sp"
    assert not out.exists()  # rank > 0 of a launch: rank 0 writes


def test_a_failure_on_rank_zero_alone_stops_the_workers_instead_of_hanging(spawned, monkeypatch):
    # Uses up the module's spawned pipeline (its workers are stopped): keep this test last in the file.
    import imagezoo.parallel as parallel

    monkeypatch.setattr(parallel, "_ERROR_GRACE_S", 1.0)
    workers = [process for process, _ in spawned.parallel.workers]

    def stop(index, sigma, latents):  # runs on rank 0 only: the workers wait in the next step's collective
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        spawned(**CFG_CALL, step_callback=stop, progress_bar_cmd=_silent)
    assert spawned.parallel is None and not any(process.is_alive() for process in workers)
