"""Several processes (one per GPU) working on one generation: CFG-parallel and sequence-parallel inference.

Family-agnostic. Every rank holds the denoiser; per denoiser call the batch (under CFG: [conditional, unconditional])
is split into `batch_degree` chunks, one per group of ranks, and inside a group the token sequence is split over its
ranks (sequence parallelism) when the family's denoiser supports it (`SequenceParallelDenoiser`). Each rank then
gathers the full velocity, so every rank runs the same sampler loop on the same latents. The text encoder and VAE run
on rank 0 only and their results are broadcast; the other ranks drop them after loading.

Two ways to start:

- a launcher (`torchrun`, `accelerate launch`) runs the same script on every rank (SPMD): every rank calls
  `ParallelPipeline.from_registry(..., gpus=N)` (or `imagezoo.load(..., gpus=N)`) and then `pipe(...)` with the same
  arguments; every rank returns the same images;
- from one process, `imagezoo.load(..., gpus=N)` spawns N - 1 worker processes; the caller is rank 0 and its calls
  (`pipe(...)`, `enable_memory`, LoRA methods, `run_on_all`) are replayed on the workers.

Modes (per call, the same decision on every rank): "auto" splits the batch over gcd(ranks, batch) groups and the
sequence inside each group; "sp" only splits the sequence (over all ranks); "cfg" only splits the batch (ranks of a
group compute the same chunk). NCCL's NVLink multicast (NVLS) is off unless the environment sets it: these
collectives (all-to-all, all-gather, broadcast) gain nothing from it, and on shared hosts it has taken GPUs out of
service.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import inspect
import logging
import math
import os
import pickle
import secrets
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist

from imagezoo.errors import ConfigError, ImagezooError, InputError
from imagezoo.interfaces import Components, TextConditioning
from imagezoo.pipeline import Pipeline

logger = logging.getLogger(__name__)

MODES = ("auto", "sp", "cfg")
ROOT = 0
# Set (unless already set) in every process that starts NCCL: see the module docstring.
NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
# Components only rank 0 runs; other ranks drop them after loading (names as in `Components.modules`).
ROOT_ONLY_MODULES = ("text_encoder", "vae")
# Pipeline methods that change state and so must run on every rank; a leader replays them on its workers.
FORWARDED_METHODS = (
    "enable_memory",
    "disable_memory",
    "enable_vram_management",
    "enable_speed",
    "disable_speed",
    "load_lora",
    "unload_lora",
    "set_lora_scale",
    "fuse_lora",
    "unfuse_lora",
)
_START_TIMEOUT_S = 600.0
# How long rank 0, after failing in a call, waits for workers to finish it before stopping them.
_ERROR_GRACE_S = 20.0


# ----------------------------------------------------------------------------------------------------------------------
# Process groups


@dataclasses.dataclass(frozen=True)
class DistEnv:
    """This process's place in the process group.

    Attributes:
        rank: Global rank (0 runs the text encoder and VAE).
        world_size: Number of processes.
        local_rank: Rank on this host (the GPU index).
        device: This rank's compute device.
        backend: "nccl" (CUDA) or "gloo" (CPU).
        owns_group: Whether `init_distributed` started the default process group (and so may destroy it).
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    owns_group: bool


def launched_world_size() -> int | None:
    """The world size a launcher (`torchrun`, `accelerate launch`, mpirun-style env) set, or None outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return None


def init_distributed(
    device: str | torch.device = "cuda",
    *,
    rank: int | None = None,
    world_size: int | None = None,
    local_rank: int | None = None,
    init_method: str | None = None,
) -> DistEnv:
    """Join (or start) the default process group: NCCL for CUDA devices, gloo for CPU.

    Values not given come from the launcher's environment (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
    `MASTER_PORT`). An already initialized group (e.g. by accelerate) is reused. On CUDA, rank r uses GPU
    `LOCAL_RANK` and makes it the current device (object collectives rely on it).

    Raises:
        ConfigError: No rank/world size given or in the environment, or too few GPUs for the local rank.
    """
    for key, value in NO_MULTICAST_ENV.items():
        os.environ.setdefault(key, value)
    device_type = torch.device(device).type
    owns = not dist.is_initialized()
    if not owns:
        rank, world_size = dist.get_rank(), dist.get_world_size()
    else:
        try:
            rank = int(os.environ["RANK"]) if rank is None else rank
            world_size = int(os.environ["WORLD_SIZE"]) if world_size is None else world_size
        except KeyError as exc:
            raise ConfigError(
                f"No {exc.args[0]} in the environment: start the script with torchrun / accelerate launch, or pass "
                "gpus=N to imagezoo.load from a single process to have it start its own workers."
            ) from None
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device_type == "cuda":
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ConfigError(
                f"Rank {rank} needs GPU {local_rank} but only {count} GPU(s) are visible; start at most {count} "
                "processes per host (check CUDA_VISIBLE_DEVICES)."
            )
        rank_device = torch.device("cuda", local_rank)
        torch.cuda.set_device(rank_device)
    else:
        rank_device = torch.device(device_type)
    backend = "nccl" if device_type == "cuda" else "gloo"
    if owns:
        options: dict[str, Any] = {"device_id": rank_device} if backend == "nccl" else {}
        dist.init_process_group(
            backend, init_method=init_method or "env://", rank=rank, world_size=world_size, **options
        )
        atexit.register(_leave_group_at_exit)
    else:
        backend = str(dist.get_backend())
    return DistEnv(rank, world_size, local_rank, rank_device, backend, owns)


def _leave_group_at_exit() -> None:
    """Destroy a process group we started and nobody closed (under a launcher `close()` keeps it for later pipelines).

    A gloo group still alive when the interpreter tears down can abort the process ("terminate called without an
    active exception"): seen about once in 12 two-rank runs of the SPMD test script.
    """
    if dist.is_initialized():
        with contextlib.suppress(Exception):  # peers may be gone already
            dist.destroy_process_group()


def all_gather(x: torch.Tensor, group: Any, size: int) -> torch.Tensor:
    """`(size, *x.shape)`: every rank's `x` of `group`, in group-rank order."""
    x = x.contiguous()
    out = x.new_empty(size * x.numel())
    # all_gather_single is the newer name (torch >= 2.12); both take one flat output buffer, no list of copies.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x.view(-1), group=group)
    return out.view(size, *x.shape)


def all_to_all(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Exchange equal chunks along dim 0: `x[j]` goes to group rank j; the result's `[j]` came from rank j."""
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


class SequenceGroup:
    """The ranks one denoiser forward splits its token sequence over.

    The pipeline sets it around each denoiser call (`use`); outside a parallel call, and for ranks that don't split
    the sequence, its size is 1 and a family's sequence-parallel code must behave exactly as without it.

    Attributes:
        group: The process group (None = the default group).
        size: Number of ranks sharing the sequence.
        rank: This rank's index among them (its shard).
    """

    def __init__(self) -> None:
        self.group: Any = None
        self.size = 1
        self.rank = 0

    @contextlib.contextmanager
    def use(self, group: Any, size: int, rank: int) -> Iterator[SequenceGroup]:
        """Split sequences over `group` inside the block."""
        saved = (self.group, self.size, self.rank)
        self.group, self.size, self.rank = group, size, rank
        try:
            yield self
        finally:
            self.group, self.size, self.rank = saved

    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        """`x` is `(size, ...)`; chunk j goes to rank j, and the result's chunk j came from rank j."""
        return all_to_all(x, self.group)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """`(size, *x.shape)`: every rank's `x`, in rank order."""
        return all_gather(x, self.group, self.size)


@runtime_checkable
class SequenceParallelDenoiser(Protocol):
    """A denoiser whose family can split one forward's token sequence over several ranks."""

    def enable_sequence_parallel(self, sequence: SequenceGroup) -> Callable[[], None]:
        """From now on split each forward over `sequence` (a no-op while its size is 1); returns the undo."""
        ...


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one denoiser call is spread: `batch_degree` batch chunks, each over `sp_size` ranks.

    Rank r computes chunk `r // sp_size` as shard `r % sp_size` of its group.
    """

    batch_degree: int
    sp_size: int
    chunk_index: int
    sp_rank: int
    batch_group: Any
    sp_group: Any

    def describe(self, sequence_parallel: bool) -> str:
        """The mode name: "cfg" (batch split only), "sp" (sequence split only), "cfg+sp", or "single"."""
        split_sequence = sequence_parallel and self.sp_size > 1
        if self.batch_degree > 1:
            return "cfg+sp" if split_sequence else "cfg"
        return "sp" if split_sequence else "single"


# ----------------------------------------------------------------------------------------------------------------------
# Runtime: layouts, broadcasts from rank 0


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {key: _map_tensors(item, fn) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(item, fn) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: _map_tensors(getattr(value, f.name), fn) for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **changes)
    return value


def _portable_error(exc: BaseException) -> BaseException:
    """The exception itself when it pickles (so other ranks raise the same type), else an `ImagezooError`."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return ImagezooError(f"{type(exc).__name__}: {exc}")
    return exc


class ParallelRuntime:
    """A pipeline's parallel state on one rank: process layout per call and rank-0 work with broadcast.

    Attributes:
        env: This rank's `DistEnv`.
        mode: One of `MODES`; may be changed between calls (on every rank alike).
        role: "spmd" (a launcher runs every rank), "leader" (rank 0 of a self-spawned group) or "worker".
        sequence: The `SequenceGroup` handed to the family's sequence-parallel code.
        sequence_parallel: Whether the denoiser splits sequences (family support and mode allow it).
        last_layout: The layout of the latest denoiser call (benchmarks and tests read it).
    """

    def __init__(self, env: DistEnv, mode: str, role: str) -> None:
        check_mode(mode)
        self.env = env
        self.mode = mode
        self.role = role
        self.sequence = SequenceGroup()
        self.sequence_parallel = False
        self.last_layout: Layout | None = None
        self.workers: list[tuple[Any, Any]] = []
        self._layouts: dict[int, Layout] = {}

    @property
    def rank(self) -> int:
        """Global rank."""
        return self.env.rank

    @property
    def world_size(self) -> int:
        """Number of ranks."""
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (runs the text encoder and VAE; the one that should save files)."""
        return self.env.rank == ROOT

    def layout(self, batch: int, splittable: bool) -> Layout:
        """The layout for a denoiser call on `batch` samples (the same on every rank for the same call).

        Groups are created on first use of a batch degree; every rank reaches that point in the same call, as
        `new_group` requires.
        """
        world = self.world_size
        degree = math.gcd(world, batch) if splittable and self.mode != "sp" else 1
        if degree not in self._layouts:
            self._layouts[degree] = self._make_layout(degree)
        self.last_layout = self._layouts[degree]
        return self.last_layout

    def _make_layout(self, degree: int) -> Layout:
        world, rank = self.world_size, self.rank
        sp_size = world // degree
        chunk_index, sp_rank = divmod(rank, sp_size)
        batch_group = sp_group = None  # None = the default (world) group
        if 1 < degree < world:
            # Sequence groups are blocks of neighbouring ranks (the fastest links on most hosts). Every rank must
            # call new_group for every group, in the same order.
            for index in range(degree):
                group = dist.new_group(list(range(index * sp_size, (index + 1) * sp_size)))
                if index == chunk_index:
                    sp_group = group
            for index in range(sp_size):
                group = dist.new_group(list(range(index, world, sp_size)))
                if index == sp_rank:
                    batch_group = group
        return Layout(degree, sp_size, chunk_index, sp_rank, batch_group, sp_group)

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (pickled; keep it small)."""
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=ROOT)
        return box[0]

    def run_on_root(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on rank 0 only and return its result on every rank (tensors moved to each rank's device).

        An exception on rank 0 is raised on every rank, so no rank waits for a result that never comes.
        """
        value: Any = None
        error: BaseException | None = None
        message: Any = None
        if self.is_main:
            try:
                value = fn()
                message = ("ok", _map_tensors(value, lambda t: t.detach().cpu()))
            except Exception as exc:
                error = exc
                message = ("error", _portable_error(exc))
        message = self.broadcast_object(message)
        if self.is_main:
            if error is not None:
                raise error
            return value
        kind, payload = message
        if kind == "error":
            raise payload
        return _map_tensors(payload, lambda t: t.to(self.env.device))


def check_mode(mode: str) -> str:
    """Validate a parallel mode name.

    Raises:
        InputError: Not one of `MODES`.
    """
    if mode not in MODES:
        raise InputError(f"parallel={mode!r} is not a parallel mode; use one of {', '.join(MODES)}.")
    return mode


# ----------------------------------------------------------------------------------------------------------------------
# Component wrappers


class RootTextEncoder:
    """The text encoder as every rank sees it: rank 0 encodes, every rank gets the conditioning."""

    def __init__(self, inner: Any, runtime: ParallelRuntime) -> None:
        self.inner = inner
        self.runtime = runtime

    def encode(self, prompts: Sequence[str], max_length: int | None = None) -> TextConditioning:
        """Encode on rank 0; broadcast the result (same signature as `TextEncoder.encode`)."""
        return self.runtime.run_on_root(lambda: self.inner.encode(prompts, max_length))

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(f"{name!r}: the text encoder lives on rank 0 only (this is a rank > 0).")
        return getattr(inner, name)


class RootVAE:
    """The VAE as every rank sees it: rank 0 encodes/decodes, every rank gets the result."""

    def __init__(self, inner: Any, runtime: ParallelRuntime, *, latent_channels: int, spatial_factor: int) -> None:
        self.inner = inner
        self.runtime = runtime
        self.latent_channels = latent_channels
        self.spatial_factor = spatial_factor

    def encode(
        self, images: torch.Tensor, tiled: bool = False, tile_size: int = 128, tile_stride: int = 64
    ) -> torch.Tensor:
        """Encode on rank 0; broadcast the latents."""
        return self.runtime.run_on_root(lambda: self.inner.encode(images, tiled, tile_size, tile_stride))

    def decode(
        self, latents: torch.Tensor, tiled: bool = False, tile_size: int = 128, tile_stride: int = 64
    ) -> torch.Tensor:
        """Decode on rank 0; broadcast the images (so every rank returns the same output)."""
        return self.runtime.run_on_root(lambda: self.inner.decode(latents, tiled, tile_size, tile_stride))

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(f"{name!r}: the VAE lives on rank 0 only (this is a rank > 0).")
        return getattr(inner, name)


def _trim_padding(text: TextConditioning) -> TextConditioning:
    """Drop trailing columns that are padding in every row of this chunk (masked keys contribute nothing).

    Only without extras: family extras (e.g. attention masks) are laid out for the full text length.
    """
    if text.extras:
        return text
    used = text.mask.any(dim=0).nonzero()
    length = int(used.max()) + 1 if used.numel() else text.mask.shape[1]
    if length == text.mask.shape[1]:
        return text
    return TextConditioning(text.embeds[:, :length], text.mask[:, :length], text.extras)


class ParallelDenoiser:
    """Wraps a family's denoiser: splits the batch over rank groups and the sequence inside a group, gathers."""

    def __init__(self, inner: Any, runtime: ParallelRuntime) -> None:
        self.inner = inner
        self.runtime = runtime

    def __call__(self, latents: torch.Tensor, sigma: torch.Tensor, text: TextConditioning) -> torch.Tensor:
        """Same contract as `Denoiser.__call__`; every rank returns the full batch's velocity."""
        runtime = self.runtime
        batch = latents.shape[0]
        layout = runtime.layout(batch, splittable=not text.extras)
        if layout.batch_degree > 1:
            size = batch // layout.batch_degree
            rows = slice(layout.chunk_index * size, (layout.chunk_index + 1) * size)
            latents = latents[rows]
            sigma = sigma[rows] if sigma.ndim and sigma.shape[0] == batch else sigma
            text = _trim_padding(TextConditioning(text.embeds[rows], text.mask[rows], text.extras))
        sp_size = layout.sp_size if runtime.sequence_parallel else 1
        with runtime.sequence.use(layout.sp_group, sp_size, layout.sp_rank):
            velocity = self.inner(latents, sigma, text)
        if layout.batch_degree > 1:
            velocity = all_gather(velocity, layout.batch_group, layout.batch_degree).flatten(0, 1)
        return velocity

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["inner"], name)


def _silent(iterable: Any) -> Any:
    return iterable


# ----------------------------------------------------------------------------------------------------------------------
# The pipeline


class ParallelPipeline(Pipeline):
    """A `Pipeline` running one generation on several processes (one per GPU); same call API.

    Build it with `from_registry` / `from_pretrained` plus `gpus=N` (and `parallel=` one of `MODES`), or
    `imagezoo.load(..., gpus=N)`. Under a launcher every rank builds and calls it (SPMD); from a single process it
    spawns N - 1 workers and replays calls on them. `close()` (also run at exit) stops spawned workers.

    Attributes:
        parallel: The rank's `ParallelRuntime` (None for a one-process pipeline, `gpus=1`).
    """

    parallel: ParallelRuntime | None = None

    # --------------------------------------------------------------- construction
    @classmethod
    def from_registry(  # type: ignore[override]
        cls, model_id: str, *, gpus: int | None = None, parallel: str = "auto", **kwargs: Any
    ) -> ParallelPipeline:
        """`Pipeline.from_registry` on `gpus` processes (default: the launcher's world size)."""
        return launch(cls, "from_registry", (model_id,), kwargs, gpus=gpus, mode=parallel)

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls, *args: Any, gpus: int | None = None, parallel: str = "auto", **kwargs: Any
    ) -> ParallelPipeline:
        """`Pipeline.from_pretrained` on `gpus` processes; pass `family=` (e.g. "qwen_image")."""
        return launch(cls, "from_pretrained", args, kwargs, gpus=gpus, mode=parallel)

    @classmethod
    def from_components(
        cls, components: Components, *, env: DistEnv, parallel: str = "auto", **pipeline_kwargs: Any
    ) -> ParallelPipeline:
        """Wrap components already built on this rank's device (custom loaders, benchmarks), in SPMD mode.

        Ranks > 0 may pass `text_encoder=None`; every rank needs the VAE object (its sizes), which ranks > 0 drop.
        """
        pipe = cls(components, device=env.device, **pipeline_kwargs)
        pipe.setup_parallel(ParallelRuntime(env, parallel, "spmd"))
        return pipe

    def setup_parallel(self, runtime: ParallelRuntime) -> None:
        """Install the rank-0 text encoder/VAE, the splitting denoiser and (if supported) sequence parallelism."""
        self.parallel = runtime
        inner = self.denoiser
        runtime.sequence_parallel = runtime.mode != "cfg" and isinstance(inner, SequenceParallelDenoiser)
        self._undo_sequence_parallel = (
            inner.enable_sequence_parallel(runtime.sequence) if runtime.sequence_parallel else None
        )
        if runtime.mode != "cfg" and not runtime.sequence_parallel:
            logger.warning(
                "%s does not support sequence parallelism: ranks that would split a sequence compute it whole.",
                type(inner).__name__,
            )
        main = runtime.is_main
        vae = self.vae
        self.text_encoder = RootTextEncoder(self.text_encoder if main else None, runtime)
        self.vae = RootVAE(
            vae if main else None, runtime, latent_channels=vae.latent_channels, spatial_factor=vae.spatial_factor
        )
        self.denoiser = ParallelDenoiser(inner, runtime)
        if not main:
            # Only rank 0 encodes and decodes: free the other ranks' copies (memory strategies never see them).
            modules = {k: v for k, v in self.components.modules.items() if k not in ROOT_ONLY_MODULES}
            offload = self.components.offload
            if offload is not None:
                offload = {k: v for k, v in offload.items() if k in modules}
            self.components = dataclasses.replace(
                self.components, text_encoder=self.text_encoder, vae=self.vae, modules=modules, offload=offload
            )
            del vae
            if runtime.env.device.type == "cuda":
                torch.cuda.empty_cache()
        logger.info(
            "rank %d/%d on %s, parallel=%s, sequence parallel %s",
            runtime.rank,
            runtime.world_size,
            runtime.env.device,
            runtime.mode,
            "on" if runtime.sequence_parallel else "off",
        )

    # --------------------------------------------------------------- calls
    @property
    def is_main(self) -> bool:
        """Whether this process is rank 0 (or the pipeline is not parallel): the one that should write files."""
        return self.parallel is None or self.parallel.is_main

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Generate, as `Pipeline.__call__`; every rank returns the same result.

        Without `seed` and `latents`, rank 0 draws the seed for all ranks. `step_callback` runs on the caller's
        rank(s) only in spawned mode (rank 0); progress bars show on rank 0 unless `progress_bar_cmd` is given.
        """
        runtime = self.parallel
        if runtime is None:
            return super().__call__(*args, **kwargs)
        bound = inspect.signature(Pipeline.__call__).bind(self, *args, **kwargs)
        call = {name: value for name, value in bound.arguments.items() if name not in ("self", "extra_inputs")}
        call.update(bound.arguments.get("extra_inputs", {}))
        seedless = call.get("seed") is None and call.get("latents") is None
        if runtime.role == "leader":
            if seedless:
                call["seed"] = secrets.randbelow(2**63)
                logger.info("No seed given; using seed=%d", call["seed"])
            replay = {**call, "step_callback": None, "progress_bar_cmd": None}
            return self._on_all_ranks("__call__", (), replay, lambda: Pipeline.__call__(self, **call))
        if seedless:
            call["seed"] = runtime.broadcast_object(secrets.randbelow(2**63) if runtime.is_main else None)
        if call.get("progress_bar_cmd") is None:  # not given (or blanked by the leader): one bar, on rank 0
            call.pop("progress_bar_cmd", None)
            if not runtime.is_main:
                call["progress_bar_cmd"] = _silent
        return Pipeline.__call__(self, **call)

    def run_on_all(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run `fn(pipe, *args, **kwargs)` on every rank (spawned workers too; `fn` must be picklable there).

        For state changes with no forwarded method (see `FORWARDED_METHODS`); returns rank 0's result.
        """
        return self._on_all_ranks("run_on_all", (fn, *args), kwargs, lambda: fn(self, *args, **kwargs))

    def _on_all_ranks(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], local: Callable[[], Any]) -> Any:
        """Leader: replay (name, args, kwargs) on the workers while running `local`; raise any rank's error."""
        runtime = self.parallel
        if runtime is None or runtime.role != "leader":
            return local()
        try:
            payload = pickle.dumps((name, args, kwargs))
        except Exception as exc:
            raise InputError(
                f"Arguments of {name} can't be sent to the worker processes ({exc}); pass picklable values."
            ) from None
        for _, conn in runtime.workers:
            conn.send_bytes(payload)
        error: BaseException | None = None
        result = None
        try:
            result = local()
        except BaseException as exc:  # KeyboardInterrupt too: the workers must be answered for or stopped
            error = exc
        # After an error here, workers that did not fail alike may wait in a collective for this rank forever.
        replies = list(_replies(runtime.workers, timeout=None if error is None else _ERROR_GRACE_S))
        if any(kind == "timeout" for _, (kind, _) in replies):
            self._abort(f"the workers did not finish {name} after rank 0 failed")
        if error is not None:
            raise error
        failures = [(rank, message) for rank, (kind, message) in replies if kind != "ok"]
        if failures:
            rank, message = failures[0]
            raise ImagezooError(f"Rank {rank} failed in {name}: {message}")
        return result

    def _abort(self, reason: str) -> None:
        """Stop the workers for good (they can't be brought back in step); the pipeline is no longer parallel."""
        runtime = self.parallel
        assert runtime is not None
        logger.error("Stopping the parallel workers: %s. Rebuild the pipeline to use several GPUs again.", reason)
        for process, _ in runtime.workers:
            process.terminate()
        for process, _ in runtime.workers:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()
        runtime.workers = []
        self.close()

    def close(self) -> None:
        """Remove the sequence-parallel hooks, stop spawned workers and leave a process group this pipeline's
        spawning started. Afterwards the pipeline is no longer parallel (rebuild it to run on several GPUs)."""
        runtime = self.parallel
        if runtime is None:
            return
        undo = self.__dict__.pop("_undo_sequence_parallel", None)
        if undo is not None:
            undo()
        for process, conn in runtime.workers:
            with contextlib.suppress(OSError):
                conn.send_bytes(pickle.dumps(None))
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()
        runtime.workers = []
        if runtime.env.owns_group and runtime.role != "spmd" and dist.is_initialized():
            with contextlib.suppress(Exception):  # peers may be gone already
                dist.destroy_process_group()
        self.parallel = None

    def _serve(self, conn: Any) -> None:
        """Worker loop: replay the leader's calls until it sends None or goes away."""
        while True:
            try:
                message = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):
                break
            if message is None:
                break
            name, args, kwargs = message
            try:
                component = kwargs.get("component") if name in FORWARDED_METHODS else None
                if component is not None and component not in self.components.modules:
                    pass  # a LoRA etc. for a component only rank 0 runs
                elif name == "run_on_all":
                    fn, *rest = args
                    fn(self, *rest, **kwargs)
                elif name == "__call__":
                    self(**kwargs)
                else:
                    getattr(self, name)(*args, **kwargs)
                conn.send(("ok", None))
            except Exception as exc:
                # The caller gets the message; a traceback only helps for errors that are not the user's input.
                logger.log(
                    logging.DEBUG if isinstance(exc, ImagezooError) else logging.ERROR,
                    "rank %d: %s failed",
                    self.parallel.rank if self.parallel else -1,
                    name,
                    exc_info=True,
                )
                conn.send(("error", f"{type(exc).__name__}: {exc}"))
        if dist.is_initialized():
            dist.destroy_process_group()


def _forwarding(name: str) -> Callable[..., Any]:
    base = getattr(Pipeline, name)

    def method(self: ParallelPipeline, *args: Any, **kwargs: Any) -> Any:
        return self._on_all_ranks(name, args, kwargs, lambda: base(self, *args, **kwargs))

    method.__name__ = name
    method.__qualname__ = f"ParallelPipeline.{name}"
    method.__doc__ = f"`Pipeline.{name}` on every rank (a spawning leader replays it on its workers).\n\n{base.__doc__}"
    return method


for _name in FORWARDED_METHODS:
    if hasattr(Pipeline, _name):
        setattr(ParallelPipeline, _name, _forwarding(_name))


# ----------------------------------------------------------------------------------------------------------------------
# Launching


def _replies(workers: list[tuple[Any, Any]], timeout: float | None = None) -> Iterator[tuple[int, tuple[str, Any]]]:
    """Each worker's next message, waiting while it is alive: ("exited", ...) if it died, ("timeout", ...) after
    `timeout` seconds (None: no limit)."""
    start = time.monotonic()
    for rank, (process, conn) in enumerate(workers, start=1):
        while not conn.poll(0.2):
            if not process.is_alive():
                yield rank, ("exited", f"the worker process exited with code {process.exitcode}")
                break
            if timeout is not None and time.monotonic() - start > timeout:
                yield rank, ("timeout", f"no answer within {timeout:.0f} s")
                break
        else:
            yield rank, conn.recv()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _build(
    cls: type[ParallelPipeline],
    method: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    env: DistEnv,
    mode: str,
    role: str,
) -> ParallelPipeline:
    builder = getattr(super(ParallelPipeline, cls), method)
    pipe = builder(*args, **{**kwargs, "device": env.device})
    pipe.setup_parallel(ParallelRuntime(env, mode, role))
    return pipe


def _worker_main(
    rank: int,
    world_size: int,
    init_method: str,
    device: str,
    recipe: tuple[type[ParallelPipeline], str, tuple[Any, ...], dict[str, Any]],
    mode: str,
    conn: Any,
) -> None:
    """Entry point of a spawned worker: join the group, build the same pipeline, serve the leader's calls."""
    conn.send(("started", None))
    if device == "cpu":  # as torchrun does: N processes with all cores each would oversubscribe the CPU
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        env = init_distributed(device, rank=rank, world_size=world_size, local_rank=rank, init_method=init_method)
        cls, method, args, kwargs = recipe
        pipe = _build(cls, method, args, kwargs, env, mode, "worker")
    except Exception as exc:
        logger.exception("rank %d failed to start", rank)
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", None))
    pipe._serve(conn)


def launch(
    cls: type[ParallelPipeline],
    method: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    gpus: int | None,
    mode: str,
) -> ParallelPipeline:
    """Build a `ParallelPipeline` with `Pipeline.<method>(*args, **kwargs)` on each rank.

    Under a launcher (or an initialized process group) this rank joins it; otherwise `gpus - 1` workers are spawned
    and this process becomes rank 0.

    Raises:
        InputError: `gpus` is not a positive int, or `mode` is unknown.
        ConfigError: `gpus` differs from the launcher's world size, or too few GPUs are visible.
        ImagezooError: A worker failed to start or load (its error is quoted).
    """
    check_mode(mode)
    if gpus is not None and (isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1):
        raise InputError(f"gpus={gpus!r} must be a positive int (the number of processes, one per GPU).")
    signature = inspect.signature(getattr(Pipeline, method))
    # Everything by name, so each rank can swap in its own device.
    kwargs = dict(signature.bind_partial(*args, **kwargs).arguments)
    args = ()
    device = torch.device(kwargs.get("device") or signature.parameters["device"].default)
    if gpus == 1:
        return getattr(super(ParallelPipeline, cls), method)(**kwargs)
    launched = launched_world_size()
    if launched is not None:
        if gpus is not None and gpus != launched:
            raise ConfigError(
                f"gpus={gpus} but the launcher started {launched} processes; pass gpus={launched} or leave it out."
            )
        env = init_distributed(device)
        return _build(cls, method, args, kwargs, env, mode, "spmd")
    if gpus is None:
        raise ConfigError(
            "No launcher environment (RANK, WORLD_SIZE) and no gpus=N: pass gpus=N to spawn N processes here, or "
            "start the script with torchrun / accelerate launch."
        )
    if device.type == "cuda" and torch.cuda.device_count() < gpus:
        raise ConfigError(
            f"gpus={gpus} but only {torch.cuda.device_count()} CUDA device(s) are visible; lower gpus or check "
            "CUDA_VISIBLE_DEVICES."
        )
    if kwargs.get("kernel") is not None:
        raise InputError("kernel= can't be sent to spawned workers; leave it out (workers use the default plugins).")
    return _spawn(cls, method, args, kwargs, gpus=gpus, mode=mode, device=device)


def _spawn(
    cls: type[ParallelPipeline],
    method: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    gpus: int,
    mode: str,
    device: torch.device,
) -> ParallelPipeline:
    for key, value in NO_MULTICAST_ENV.items():  # workers inherit this environment
        os.environ.setdefault(key, value)
    context = torch.multiprocessing.get_context("spawn")
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    workers = []
    for rank in range(1, gpus):
        parent, child = context.Pipe()
        process = context.Process(
            target=_worker_main,
            args=(rank, gpus, init_method, device.type, (cls, method, args, kwargs), mode, child),
            name=f"imagezoo-rank{rank}",
            daemon=True,
        )
        process.start()
        child.close()
        workers.append((process, parent))

    def stop() -> None:
        for process, _ in workers:
            if process.is_alive():
                process.terminate()
        if dist.is_initialized():
            dist.destroy_process_group()

    for rank, (kind, message) in _replies(workers, timeout=_START_TIMEOUT_S):
        if kind != "started":
            stop()
            raise ImagezooError(f"Worker rank {rank} did not start: {message}")
    env = init_distributed(device.type, rank=0, world_size=gpus, local_rank=0, init_method=init_method)
    try:
        pipe = _build(cls, method, args, kwargs, env, mode, "leader")
    except Exception:
        stop()
        raise
    for rank, (kind, message) in _replies(workers):
        if kind != "ready":
            stop()
            raise ImagezooError(f"Worker rank {rank} failed to load the pipeline: {message}")
    assert pipe.parallel is not None  # set by _build
    pipe.parallel.workers = workers
    atexit.register(pipe.close)
    return pipe


def is_main_process(pipe: Any) -> bool:
    """Whether `pipe` (any pipeline) runs on rank 0 or alone: the process that should write outputs."""
    runtime = getattr(pipe, "parallel", None)
    return runtime is None or runtime.is_main
