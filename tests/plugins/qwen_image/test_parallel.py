"""Ulysses sequence parallelism of the Qwen-Image DiT: several CPU processes (gloo) give the one-process result.

The multi-process cases run this file as a script on 2 ranks with torchrun's environment variables (the SPMD path a
launcher takes), and on 4 ranks spawned by the pipeline itself (CFG split x sequence split).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from imagezoo.errors import ConfigError
from imagezoo.parallel import SequenceGroup

SIZE = 128


def _mask(box: tuple[int, int, int, int]) -> Image.Image:
    image = Image.new("L", (SIZE, SIZE), 0)
    image.paste(255, box)
    return image


# name -> pipeline call. Each exercises a different path: CFG batch, padded last shard (9x7 = 63 tokens over 2 or 4
# ranks), text padding masks in a 2-prompt batch with decoding, and EliGen's full attention mask (separate passes).
CASES: dict[str, dict[str, Any]] = {
    "cfg": {"prompt": "a red bicycle", "seed": 0, "num_inference_steps": 2, "output_type": "latent"},
    "no_cfg_odd_tokens": {
        "prompt": "a cat",
        "seed": 1,
        "num_inference_steps": 2,
        "cfg_scale": 1.0,
        "height": 144,
        "width": 112,
        "output_type": "latent",
    },
    "batch_padded_np": {
        "prompt": ["a long prompt about a dog in the park at noon", "x"],
        "negative_prompt": "blurry",
        "seed": 2,
        "num_inference_steps": 2,
        "output_type": "np",
    },
    "eligen": {
        "prompt": "a cat and a dog",
        "seed": 3,
        "num_inference_steps": 2,
        "output_type": "latent",
        "eligen_entity_prompts": ["a cat", "a small dog"],
        "eligen_entity_masks": [_mask((0, 0, SIZE // 2, SIZE)), _mask((0, 0, SIZE, SIZE // 2))],
    },
}
# Cases run per mode on 2 ranks, with the layout expected: in "auto" CFG batches split over the ranks (EliGen's
# separate passes and no-CFG calls take the sequence path already covered under "sp").
LAYOUTS_2 = {
    "sp": {"cfg": "sp", "no_cfg_odd_tokens": "sp", "batch_padded_np": "sp", "eligen": "sp"},
    "auto": {"cfg": "cfg", "batch_padded_np": "cfg"},
}
PARAMS_2 = [(mode, case) for mode, cases in LAYOUTS_2.items() for case in cases]


def _silent(iterable: Any) -> Any:
    return iterable


def _run_cases(pipe: Any, names: list[str]) -> dict[str, Any]:
    results = {}
    for name in names:
        out = pipe(**CASES[name], progress_bar_cmd=_silent)
        runtime = getattr(pipe, "parallel", None)
        layout = runtime.last_layout.describe(runtime.sequence_parallel) if runtime else "single"
        results[name] = (torch.as_tensor(np.asarray(out)), layout)
    return results


def _spmd_main(models_dir: str, out_path: str) -> None:
    """One rank of the script mode (environment as torchrun sets it)."""
    from imagezoo.parallel import ParallelPipeline

    results = {}
    for mode, cases in LAYOUTS_2.items():
        pipe = ParallelPipeline.from_registry(
            "tiny", gpus=2, parallel=mode, device="cpu", torch_dtype=torch.float32, local_model_path=models_dir
        )
        results[mode] = _run_cases(pipe, list(cases))
    if pipe.is_main:
        torch.save(results, out_path)
    # Leave together and skip interpreter teardown: in CI one rank now and then aborted after its work was done
    # ("terminate called without an active exception", from gloo's threads), which failed the test for no fault of
    # the results. The library's own exit hook is tested apart (tests/core/test_parallel.py).
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def reference(tiny_pipe) -> dict[str, torch.Tensor]:
    return {name: value for name, (value, _) in _run_cases(tiny_pipe, list(CASES)).items()}


@pytest.fixture(scope="module")
def spmd_results(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Results of rank 0 of a 2-process launch of this file, for modes "sp" and "auto"."""
    out = tmp_path_factory.mktemp("spmd") / "results.pt"
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    env["OMP_NUM_THREADS"] = "1"  # as torchrun sets it
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(models_dir), str(out)],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    logs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), "\n".join(logs[-4000:] for logs in logs)
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize(("mode", "case"), PARAMS_2)
def test_two_processes_give_the_single_process_result(spmd_results, reference, mode, case):
    value, layout = spmd_results[mode][case]
    assert layout == LAYOUTS_2[mode][case]
    torch.testing.assert_close(value, reference[case], rtol=1e-4, atol=1e-5)


def test_cfg_split_and_sequence_split_combined_on_four_processes(models_dir, reference):
    import imagezoo

    pipe = imagezoo.load("tiny", device="cpu", torch_dtype=torch.float32, local_model_path=models_dir, gpus=4)
    try:
        results = _run_cases(pipe, ["cfg"])
        # Without CFG all 4 ranks would share one sequence, but the tiny DiT has 2 heads: every rank refuses before
        # any collective, the caller gets the error, and the ranks stay usable.
        with pytest.raises(ConfigError, match=r"heads \(2\)"):
            pipe(**CASES["no_cfg_odd_tokens"], progress_bar_cmd=_silent)
        again = _run_cases(pipe, ["cfg"])
    finally:
        pipe.close()
    assert results["cfg"][1] == "cfg+sp"  # 2 CFG halves x 2 sequence shards
    torch.testing.assert_close(results["cfg"][0], reference["cfg"], rtol=1e-4, atol=1e-5)
    assert torch.equal(again["cfg"][0], results["cfg"][0])


# ----------------------------------------------------------------------------------------------------------------------
# One process: the hooks are exact no-ops at size 1, undo restores the model, bad head counts are caught early.


@pytest.fixture
def dit_and_inputs(tiny_root: Path):
    from imagezoo.plugins.qwen_image.dit import build_dit
    from imagezoo.weights import files_from_path, find_config_json, load_safetensors

    files = files_from_path(tiny_root / "transformer")
    dit = build_dit(load_safetensors(files), find_config_json(files), dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, 18, 14, generator=generator)
    text = torch.randn(2, 5, dit.params.text_dim, generator=generator)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    return dit, (latents, torch.tensor([0.7, 0.7]), text, mask)


def test_hooks_change_nothing_in_one_process_and_undo_restores(dit_and_inputs):
    from imagezoo.plugins.qwen_image.parallel import UlyssesAttention, enable_sequence_parallel

    dit, inputs = dit_and_inputs
    with torch.no_grad():
        before = dit(*inputs)
        undo = enable_sequence_parallel(dit, SequenceGroup())
        assert "run_blocks" in vars(dit)
        assert all(isinstance(block.attn.attention_fn, UlyssesAttention) for block in dit.transformer_blocks)
        with pytest.raises(ConfigError, match="already installed"):
            enable_sequence_parallel(dit, SequenceGroup())
        hooked = dit(*inputs)
        undo()
        after = dit(*inputs)
    assert torch.equal(hooked, before)
    assert torch.equal(after, before)
    assert "run_blocks" not in vars(dit)
    assert all(block.attn.attention_fn is None for block in dit.transformer_blocks)


def test_heads_not_divisible_by_the_ranks_is_a_config_error(dit_and_inputs):
    from imagezoo.plugins.qwen_image.parallel import enable_sequence_parallel

    dit, inputs = dit_and_inputs
    sequence = SequenceGroup()
    enable_sequence_parallel(dit, sequence)
    # The tiny DiT has 2 heads; 3 ranks can't share them. Raised before any collective, so no group is needed.
    with sequence.use(None, 3, 0), torch.no_grad(), pytest.raises(ConfigError, match=r"heads \(2\).*multiple of 3"):
        dit(*inputs)


if __name__ == "__main__":
    _spmd_main(sys.argv[1], sys.argv[2])
