"""The family-agnostic generation loop: encode -> sample(denoiser) -> decode, with CFG, batching and checks."""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from imagezoo.config import ModelConfig
from imagezoo.errors import InputError, NumericalError, PluginError, WeightsError
from imagezoo.finite import FiniteWatch
from imagezoo.guidance import guide
from imagezoo.images import pil_to_tensor, tensor_to_float_array, tensor_to_pil
from imagezoo.interfaces import Components, GenerationContext, ModelFamily, Sampler, TextConditioning
from imagezoo.lora import LoraMixin
from imagezoo.plugin_manager import Kernel, get_kernel
from imagezoo.registry import Defaults, ModelEntry
from imagezoo.weights import files_from_path, read_shapes

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "latent")
StepCallback = Callable[[int, float, torch.Tensor], None]


def _as_prompts(prompt: str | Sequence[str], what: str) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    prompts = list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise InputError(f"{what} must be a string or a non-empty list of strings, got {prompt!r}.")
    return prompts


def _pad_text(conds: Sequence[TextConditioning]) -> TextConditioning:
    """Concatenate conditionings along the batch, right-padding shorter ones (masked out)."""
    length = max(c.embeds.shape[1] for c in conds)
    embeds = [F.pad(c.embeds, (0, 0, 0, length - c.embeds.shape[1])) for c in conds]
    masks = [F.pad(c.mask, (0, length - c.mask.shape[1]), value=False) for c in conds]
    return TextConditioning(torch.cat(embeds), torch.cat(masks), conds[0].extras)


class Pipeline(LoraMixin):
    """Text-to-image (and image-to-image) generation for any registered model family.

    Build it with `from_registry` (model ID only) or `from_pretrained` (explicit `ModelConfig`s, the seed API).
    LoRA methods (`load_lora`, `unload_lora`, `fuse_lora`, `unfuse_lora`, `save_lora`) come from `LoraMixin`.
    """

    family_name: str | None = None

    def __init__(
        self,
        components: Components,
        *,
        defaults: Defaults,
        device: torch.device | str,
        dtype: torch.dtype,
        entry: ModelEntry | None = None,
        kernel: Kernel | None = None,
        files: dict[str, list[Any]] | None = None,
    ) -> None:
        self.components = components
        self.text_encoder = components.text_encoder
        self.denoiser = components.denoiser
        self.vae = components.vae
        self.defaults = defaults
        self.device = torch.device(device)
        self.dtype = dtype
        self.entry = entry
        self.kernel = kernel or get_kernel()
        self.memory_strategies: list[Any] = []
        # Component name -> the safetensors files its weights came from (disk streaming and exact restores read them).
        self.files: dict[str, list[Any]] = dict(files or {})

    # ----------------------------------------------------------------- construction
    @classmethod
    def _family(cls, kernel: Kernel, family: str | None) -> tuple[str, ModelFamily]:
        name = family or cls.family_name
        if name is None:
            raise InputError("No model family given: pass family=... or use a family's pipeline class.")
        registered = kernel.families.get(name)
        return registered.name, registered.value

    @classmethod
    def from_registry(
        cls,
        model_id: str,
        *,
        device: torch.device | str = "cpu",
        torch_dtype: torch.dtype = torch.bfloat16,
        local_model_path: str | Path | None = None,
        skip_download: bool = False,
        kernel: Kernel | None = None,
        build_device: torch.device | str | None = None,
    ) -> Pipeline:
        """Load a registered model by ID or alias; its files and defaults come from the registry entry.

        The entry's `adapters` (LoRA files, e.g. EliGen's) are loaded onto the pipeline unfused, each named by its
        repo ID.

        Args:
            model_id: Hub ID (`"Qwen/Qwen-Image"`) or alias (`"qwen-image"`), case-insensitive.
            device: Compute device.
            torch_dtype: Compute dtype.
            local_model_path: Download/cache folder (default `$IMAGEZOO_MODELS_DIR` or `./models`).
            skip_download: Use local files only.
            kernel: Plugin set to use (default: the process-wide one).
            build_device: Where the weights are loaded (default: `device`); "cpu" when placement memory strategies
                will manage them, so a model larger than the GPU never has to fit on it.
        """
        kernel = kernel or get_kernel()
        entry = kernel.models.get(model_id)
        _, family = cls._family(kernel, entry.family)
        files = {}
        for component, source in entry.components.items():
            config = ModelConfig(
                model_id=entry.component_model_id(component),
                origin_file_pattern=source.pattern,
                local_model_path=local_model_path,
                skip_download=skip_download,
            )
            files[component] = kernel.resolve_weights(config)
        # Adapter files are fetched before the (slow) build so a missing one fails fast.
        adapters = []
        for source in entry.adapters:
            adapter_id = source.model_id or entry.id
            config = ModelConfig(
                model_id=adapter_id,
                origin_file_pattern=source.pattern,
                local_model_path=local_model_path,
                skip_download=skip_download,
            )
            adapters.append((adapter_id, kernel.resolve_weights(config)))
        components = family.build(files, dtype=torch_dtype, device=build_device or device)
        pipe = cls(
            components,
            defaults=entry.defaults,
            device=device,
            dtype=torch_dtype,
            entry=entry,
            kernel=kernel,
            files=files,
        )
        for adapter_id, adapter_files in adapters:
            name = adapter_id if len(adapters) == 1 else f"{adapter_id}:{Path(adapter_files[0]).stem}"
            pipe.load_lora(adapter_files, name=name)
        return pipe

    @classmethod
    def from_pretrained(
        cls,
        torch_dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cuda",
        model_configs: Sequence[ModelConfig] = (),
        tokenizer_config: ModelConfig | None = None,
        *,
        family: str | None = None,
        kernel: Kernel | None = None,
    ) -> Pipeline:
        """Load from explicit `ModelConfig`s (the seed's API); each file set's component is detected from its keys.

        Defaults come from the registry entry whose ID the DiT config names, else the family's main model.
        """
        kernel = kernel or get_kernel()
        family_name, fam = cls._family(kernel, family)
        files: dict[str, list[Any]] = {}
        offload: dict[str, tuple[Any, Any]] = {}
        model_ids: dict[str, str] = {}
        for config in model_configs:
            paths = files_from_path(config.path) if config.path is not None else kernel.resolve_weights(config)
            keys = list(read_shapes(paths))
            component = fam.detect_component(keys)
            if component is None:
                raise WeightsError(
                    f"Could not tell which {family_name} component {config.describe()} is from its "
                    f"{len(keys)} tensor names (first: {keys[:3]}). Expected one of {fam.component_names}."
                )
            if component in files:
                raise InputError(f"Two model_configs give the {component}: {config.describe()} and an earlier one.")
            files[component] = paths
            offload[component] = (config.offload_device, config.offload_dtype)
            if config.model_id:
                model_ids[component] = config.model_id
        if tokenizer_config is not None:
            if tokenizer_config.path is not None:
                files["tokenizer"] = [Path(tokenizer_config.path)]
            else:
                files["tokenizer"] = kernel.resolve_weights(tokenizer_config)
        missing = [name for name in fam.component_names if name not in files]
        if missing:
            raise InputError(
                f"model_configs lack the {', '.join(missing)} of {family_name}; give a ModelConfig for each."
            )
        # Components with an offload_device must not pass through the compute device (a 20B DiT would not fit a small
        # GPU): everything is built on the CPU and enable_vram_management() places it.
        offloaded = [name for name, (offload_device, _) in offload.items() if offload_device is not None]
        build_device = "cpu" if offloaded else device
        if offloaded and torch.device(device).type != "cpu":
            logger.info(
                "%s have an offload_device: built on the CPU; call pipe.enable_vram_management() before generating.",
                ", ".join(offloaded),
            )
        components = fam.build(files, dtype=torch_dtype, device=build_device)
        components.offload = offload
        entry = cls._entry_for(kernel, family_name, fam, model_ids.get("dit"))
        return cls(
            components,
            defaults=entry.defaults,
            device=device,
            dtype=torch_dtype,
            entry=entry,
            kernel=kernel,
            files=files,
        )

    @staticmethod
    def _entry_for(kernel: Kernel, family_name: str, family: ModelFamily, model_id: str | None) -> ModelEntry:
        for candidate in (model_id, family.default_model_id):
            if candidate and candidate in kernel.models:
                entry = kernel.models.get(candidate)
                if entry.family == family_name:
                    return entry
        return kernel.models.get(family.default_model_id)

    # ----------------------------------------------------------------- memory
    def enable_memory(self, names: Sequence[str], **options: Any) -> None:
        """Apply memory strategies by name; options go to each strategy that accepts them.

        Strategies apply in their declared stage order whatever the order of `names` (storage dtype such as `fp8`,
        then placement such as `offload` / `stream` / `disk`), and all-or-nothing: unknown names, an option no
        named strategy takes, or a combination that makes no sense (see `imagezoo.memory.check_combination`) raise
        before anything is applied, and a failure while applying undoes the strategies of this call.

        Args:
            names: Registered strategy names, e.g. `["fp8", "offload"]`.
            **options: e.g. `vram_limit=12`, `vram_buffer=0.5`, `components=["dit"]`.
        """
        from imagezoo.memory import accepted_options, stage_of

        factories = [self.kernel.memory_strategies.get(name) for name in names]
        taken = {name: accepted_options(registered.value) for name, registered in zip(names, factories, strict=True)}
        unused = [
            key for key in options if all(accepted is not None and key not in accepted for accepted in taken.values())
        ]
        if unused:
            raise InputError(
                f"Memory option(s) {', '.join(map(repr, unused))} are taken by none of {list(names)}; "
                + "; ".join(f"{n} takes {sorted(a) if a is not None else 'anything'}" for n, a in taken.items())
                + "."
            )
        strategies = []
        for name, registered in zip(names, factories, strict=True):
            accepted = taken[name]
            chosen = {k: v for k, v in options.items() if accepted is None or k in accepted}
            strategies.append(registered.value(**chosen))
        self.apply_memory_strategies(sorted(strategies, key=stage_of))

    def apply_memory_strategies(self, strategies: Sequence[Any]) -> None:
        """Apply already-built strategy objects (sorted by stage), all-or-nothing, after checking the combination."""
        from imagezoo.memory import check_combination

        check_combination(self, self.memory_strategies, strategies)
        done = len(self.memory_strategies)
        try:
            for strategy in strategies:
                strategy.apply(self)
                self.memory_strategies.append(strategy)
        except BaseException:
            while len(self.memory_strategies) > done:
                self.memory_strategies.pop().remove(self)
            raise

    def enable_vram_management(
        self,
        vram_limit: float | None = None,
        vram_buffer: float = 0.5,
        num_persistent_param_in_dit: int | None = None,
    ) -> None:
        """The seed's VRAM management: strategies chosen from each component's `ModelConfig` and the budget.

        A component's `offload_dtype` (e.g. `torch.float8_e4m3fn`) stores its weights in that dtype (`fp8`
        strategy); its `offload_device` (`"cpu"`, or `"disk"` to read the safetensors files on demand) makes it
        managed by the `stream` strategy: blocks stay on the compute device while they fit the budget, the rest is
        streamed, and components take turns when they do not fit together. A pipeline loaded without offload
        settings (e.g. from the registry) has every component managed as `offload_device="cpu"`.

        Args:
            vram_limit: GB of VRAM for the weights; None uses the free VRAM, 0 the least possible.
            vram_buffer: GB kept free below the limit (activations, allocator slack).
            num_persistent_param_in_dit: At most this many DiT parameters stay resident (deprecated in the seed).
        """
        registry = self.kernel.memory_strategies
        modules = self.components.modules
        settings = self.components.offload or {}
        if not any(device is not None or dtype is not None for device, dtype in settings.values()):
            settings = {name: ("cpu", None) for name in modules}
        strategies: list[Any] = []
        by_dtype: dict[torch.dtype, list[str]] = {}
        for name, (_, offload_dtype) in settings.items():
            if offload_dtype is not None and offload_dtype != self.dtype:
                by_dtype.setdefault(offload_dtype, []).append(name)
        for offload_dtype, names in by_dtype.items():
            # The originals are not kept in host memory: remove() re-reads them from the files.
            keep = not self.files
            strategies.append(registry.get("fp8").value(dtype=offload_dtype, components=names, keep_original=keep))
        placed = {name: str(device) for name, (device, _) in settings.items() if device is not None}
        for name, device in placed.items():
            if device not in ("cpu", "disk"):
                raise InputError(f"offload_device={device!r} of the {name} is not allowed; use 'cpu' or 'disk'.")
        # Components without an offload_device belong on the compute device (from_pretrained built them on the CPU
        # when any other component is offloaded).
        for name, module in modules.items():
            if name not in placed:
                module.to(self.device)
        if placed:
            strategies.append(
                registry.get("stream").value(
                    components=list(placed),
                    sources=placed,
                    vram_limit=vram_limit,
                    vram_buffer=vram_buffer,
                    num_persistent_param_in_dit=num_persistent_param_in_dit,
                )
            )
        self.apply_memory_strategies(strategies)

    def disable_memory(self, name: str | None = None) -> None:
        """Remove one applied strategy by name (and those applied after it), or all when `name` is None."""
        names = [strategy.name for strategy in self.memory_strategies]
        if name is not None and name not in names:
            raise InputError(f"Memory strategy {name!r} is not applied; applied: {', '.join(names) or 'none'}.")
        stop = 0 if name is None else names.index(name)
        while len(self.memory_strategies) > stop:
            # Popped only once removed: a strategy that cannot undo itself stays listed (and applied).
            self.memory_strategies[-1].remove(self)
            self.memory_strategies.pop()

    # ----------------------------------------------------------------- speed
    def _speed_modules(self) -> list[Any]:
        # Speed settings are the family's (compile, attention kernels, FP8, step caching): any component module
        # that offers `enable_speed` takes them, so the kernel needs no plugin import.
        return [m for m in self.components.modules.values() if callable(getattr(m, "enable_speed", None))]

    def enable_speed(self, profile: str = "auto", **options: Any) -> list[Any]:
        """Apply a speed profile to every component that offers one (for Qwen-Image: the DiT; see docs/speed.md).

        Args:
            profile: A profile name of the family ("auto" = the best exact settings for the device).
            **options: Individual settings overriding the profile's.

        Returns:
            What each component applied.

        Raises:
            InputError: No component of this pipeline has speed settings.
        """
        modules = self._speed_modules()
        if not modules:
            raise InputError(
                f"The {self.entry.family if self.entry else self.family_name} model has no speed profiles; "
                "drop --speed / enable_speed for it."
            )
        return [module.enable_speed(profile, **options) for module in modules]

    def disable_speed(self) -> None:
        """Undo `enable_speed` on every component."""
        for module in self._speed_modules():
            module.disable_speed()

    # ----------------------------------------------------------------- extra inputs
    def accepted_extra_inputs(self) -> dict[str, tuple[str, Any, str]]:
        """The extra keyword inputs this pipeline accepts, from the `register_inputs` extensions of its family.

        Returns:
            Input name (or alias) -> (extension name, extension, the input name it stands for).

        Raises:
            PluginError: Two extensions claim the same name.
        """
        family = self.entry.family if self.entry is not None else self.family_name
        accepted: dict[str, tuple[str, Any, str]] = {}
        for registered in self.kernel.input_extensions:
            extension = registered.value
            if extension.families and family not in extension.families:
                continue
            names = [(name, name) for name in extension.inputs]
            names += list(getattr(extension, "aliases", {}).items())
            for name, target in names:
                if name in accepted and accepted[name][0] != registered.name:
                    raise PluginError(
                        f"Input {name!r} is claimed by input extensions {accepted[name][0]!r} and "
                        f"{registered.name!r}; block one of their plugins."
                    )
                accepted[name] = (registered.name, extension, target)
        return accepted

    def route_extra_inputs(self, extra_inputs: dict[str, Any]) -> list[tuple[Any, dict[str, Any]]]:
        """Group extra keyword inputs by the extension that handles them; None values count as not given.

        Raises:
            InputError: A name no extension of this family accepts (the accepted ones are listed), or an input given
                both under its name and an alias.
        """
        if not extra_inputs:
            return []
        accepted = self.accepted_extra_inputs()
        unknown = sorted(set(extra_inputs) - set(accepted))
        if unknown:
            family = self.entry.family if self.entry is not None else self.family_name
            known = ", ".join(sorted(accepted)) or "none"
            raise InputError(
                f"Unknown keyword argument(s) {', '.join(map(repr, unknown))} for a {family} pipeline. Extra inputs "
                f"accepted (from input-extension plugins): {known}."
            )
        grouped: dict[str, tuple[Any, dict[str, Any]]] = {}
        for name, value in extra_inputs.items():
            if value is None:
                continue
            owner, extension, target = accepted[name]
            inputs = grouped.setdefault(owner, (extension, {}))[1]
            if target in inputs:
                raise InputError(f"{target!r} is given twice (once as {name!r}); give it once.")
            inputs[target] = value
        return list(grouped.values())

    # ----------------------------------------------------------------- generation
    def resolve_sampler(self, sampler: str | Sampler | None) -> Sampler:
        """A sampler object from a name (registry), an instance, or the model's default."""
        if sampler is not None and not isinstance(sampler, str):
            return sampler
        name = sampler or self.defaults.sampler
        options = self.defaults.sampler_options if sampler is None else {}
        return self.kernel.samplers.get(name).value(**options)

    def _check_size(self, height: int, width: int) -> None:
        multiple = self.vae.spatial_factor * self.denoiser.patch_size
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0 or value % multiple:
                raise InputError(f"{name}={value!r} must be a positive multiple of {multiple}.")

    def _noise(self, batch: int, height: int, width: int, seed: int | None, rand_device: str) -> torch.Tensor:
        if seed is None:
            seed = secrets.randbelow(2**63)
            logger.info("No seed given; using seed=%d", seed)
        generator = torch.Generator(rand_device).manual_seed(seed)
        shape = (batch, self.vae.latent_channels, height // self.vae.spatial_factor, width // self.vae.spatial_factor)
        return torch.randn(shape, generator=generator, device=rand_device, dtype=torch.float32)

    def _non_finite(self, index: int, sigma: float, n_steps: int) -> NumericalError:
        return NumericalError(
            f"Non-finite values (NaN/inf) appeared in the latents at step {index + 1}/{n_steps} "
            f"(sigma={sigma:.4f}, dtype={self.dtype}). Likely cause: overflow in low precision (fp16 "
            "overflows past 65504); use torch.bfloat16 or torch.float32, or check LoRA scales and inputs."
        )

    def _sigma_tensor(self, batch: int, sigma: float, device: torch.device) -> torch.Tensor:
        # A denoiser with `sampling` takes sigma on the CPU (see Denoiser): its per-step host work, such as finding
        # the step's row in a table, then reads the value without waiting for the GPU to finish the queued steps.
        where = "cpu" if callable(getattr(self.denoiser, "sampling", None)) else device
        return torch.full((batch,), sigma, device=where, dtype=self.dtype)

    def predict_velocity(
        self,
        latents: torch.Tensor,
        sigma: float,
        cond: TextConditioning,
        uncond: TextConditioning | None,
        cfg_scale: float,
        cfg_rescale: bool,
        *,
        batched: TextConditioning | None = None,
    ) -> torch.Tensor:
        """The (guided) velocity for float32 latents at `sigma`; CFG runs as one batched forward.

        `batched`: `cond` and `uncond` already joined into one right-padded batch (a loop passes the same one at
        every step); built here when None.
        """
        batch = latents.shape[0]
        x = latents.to(self.dtype)
        if uncond is not None and (cond.extras or uncond.extras):
            # Extras (e.g. attention masks) are laid out for their own text sequence: run the two passes apart.
            sigmas = self._sigma_tensor(batch, sigma, x.device)
            positive = self.denoiser(x, sigmas, cond).float()
            negative = self.denoiser(x, sigmas, uncond).float()
            return guide(positive, negative, cfg_scale, rescale=cfg_rescale, patch_size=self.denoiser.patch_size)
        if uncond is None:
            text, x_in = cond, x
        else:
            text = batched if batched is not None else _pad_text([cond, uncond])
            x_in = torch.cat([x, x])
        sigmas = self._sigma_tensor(x_in.shape[0], sigma, x.device)
        velocity = self.denoiser(x_in, sigmas, text).float()
        if uncond is None:
            return velocity
        return guide(
            velocity[:batch], velocity[batch:], cfg_scale, rescale=cfg_rescale, patch_size=self.denoiser.patch_size
        )

    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        cfg_scale: float | None = None,
        input_image: Any = None,
        denoising_strength: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        seed: int | None = None,
        rand_device: str = "cpu",
        num_inference_steps: int | None = None,
        tiled: bool = False,
        tile_size: int = 128,
        tile_stride: int = 64,
        progress_bar_cmd: Callable[[Any], Any] = tqdm,
        *,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        sampler: str | Sampler | None = None,
        cfg_rescale: bool | None = None,
        max_sequence_length: int | None = None,
        step_callback: StepCallback | None = None,
        **extra_inputs: Any,
    ) -> Any:
        """Generate images. Arguments left as None take the model's registry defaults.

        Args:
            prompt: A prompt, or a list of prompts generated as one batch.
            negative_prompt: Used when `cfg_scale > 1`; one string for all prompts or one per prompt.
            cfg_scale: Guidance scale; CFG is active when > 1.
            input_image: PIL image for image-to-image (resized to `width`×`height`).
            denoising_strength: In (0, 1]; below 1 only with `input_image`.
            height, width: Output size, multiples of 16.
            seed: Noise seed; None draws a random one (logged).
            rand_device: Device the noise is drawn on ("cpu" reproduces across GPUs).
            num_inference_steps: Sampling steps.
            tiled, tile_size, tile_stride: VAE tiling, sizes in latent pixels (×8 in image pixels).
            progress_bar_cmd: Wraps the step iterator (default tqdm; `lambda x: x` silences it).
            latents: Explicit initial noise (B, 16, H/8, W/8), instead of `seed`.
            output_type: "pil" (PIL images), "np" (float arrays in [0, 1]) or "latent" (final latents).
            sampler: Sampler name or object; default from the registry entry.
            cfg_rescale: Official per-token norm rescale of the guided velocity (default from registry).
            max_sequence_length: Prompt token cap (default 512, at most 1024); longer prompts are truncated with a
                warning.
            step_callback: Called as `step_callback(step_index, sigma, latents)` after each step.
            **extra_inputs: Inputs handled by plugins' input extensions (`register_inputs`), e.g. EliGen's
                `eligen_entity_prompts`; see `accepted_extra_inputs()`. Unknown names are an `InputError`.

        Returns:
            One image for a string prompt, a list for a list of prompts (or a tensor / array batch for "latent" /
            "np" output).
        """
        defaults = self.defaults
        extensions = self.route_extra_inputs(extra_inputs)
        prompts = _as_prompts(prompt, "prompt")
        cfg_scale = defaults.cfg_scale if cfg_scale is None else cfg_scale
        if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float)) or cfg_scale < 0:
            raise InputError(f"cfg_scale={cfg_scale!r} must be a number >= 0 (CFG is active above 1).")
        negatives = _as_prompts(
            defaults.negative_prompt if negative_prompt is None else negative_prompt, "negative_prompt"
        )
        if len(negatives) == 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise InputError(
                f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts; give 1 or one each."
            )
        if output_type not in OUTPUT_TYPES:
            raise InputError(f"output_type={output_type!r} is not allowed; use one of {', '.join(OUTPUT_TYPES)}.")
        if not 0.0 < denoising_strength <= 1.0:
            raise InputError(f"denoising_strength={denoising_strength!r} must be in (0, 1].")
        if denoising_strength != 1.0 and input_image is None:
            raise InputError(
                f"denoising_strength={denoising_strength!r} needs an input_image; without one it must be 1."
            )
        if input_image is not None and (height is None or width is None):
            image_w, image_h = input_image.size
            height = height or image_h
            width = width or image_w
        height = defaults.height if height is None else height
        width = defaults.width if width is None else width
        self._check_size(height, width)
        steps = defaults.num_inference_steps if num_inference_steps is None else num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise InputError(f"num_inference_steps={steps!r} must be a positive integer.")
        rescale = defaults.cfg_rescale if cfg_rescale is None else cfg_rescale
        max_length = defaults.max_sequence_length if max_sequence_length is None else max_sequence_length

        batch = len(prompts)
        if latents is not None:
            expected = (
                batch,
                self.vae.latent_channels,
                height // self.vae.spatial_factor,
                width // self.vae.spatial_factor,
            )
            if tuple(latents.shape) != expected:
                raise InputError(
                    f"latents have shape {tuple(latents.shape)}; expected {expected} for this batch and size."
                )
            noise = latents.to(torch.float32)
        else:
            noise = self._noise(batch, height, width, seed, rand_device)
        noise = noise.to(self.device)

        chosen_sampler = self.resolve_sampler(sampler)
        factor = self.vae.spatial_factor * self.denoiser.patch_size
        strength = denoising_strength if input_image is not None else 1.0
        sigmas = chosen_sampler.sigmas(steps, (height // factor) * (width // factor), strength).tolist()

        cond = self.text_encoder.encode(prompts, max_length)
        uncond = self.text_encoder.encode(negatives, max_length) if cfg_scale > 1 else None
        if extensions:
            context = GenerationContext(
                self, tuple(prompts), tuple(negatives), height, width, max_length, uncond is not None
            )
            for extension, inputs in extensions:
                cond, uncond = extension.condition(context, inputs, cond, uncond)

        x = noise
        if input_image is not None:
            images = [input_image] if not isinstance(input_image, (list, tuple)) else list(input_image)
            if len(images) not in (1, batch):
                raise InputError(f"input_image has {len(images)} images for {batch} prompts; give 1 or one each.")
            pixels = torch.cat([pil_to_tensor(image, width, height) for image in images]).to(self.device, self.dtype)
            clean = self.vae.encode(pixels, tiled=tiled, tile_size=tile_size, tile_stride=tile_stride).float()
            clean = clean.expand(batch, -1, -1, -1) if clean.shape[0] == 1 else clean
            x = sigmas[0] * noise + (1.0 - sigmas[0]) * clean

        # One padded CFG batch for the whole loop: the denoiser then sees the same text tensors at every step (and may
        # keep what it derived from them on the host, instead of syncing with the GPU each step to derive it again).
        batched = _pad_text([cond, uncond]) if uncond is not None and not (cond.extras or uncond.extras) else None
        watch = FiniteWatch(x.device)
        n_steps = len(sigmas) - 1
        # A denoiser may prepare for the whole loop once its sigmas are known (optional `sampling`, see Denoiser).
        sampling = getattr(self.denoiser, "sampling", None)
        with sampling(sigmas[:-1]) if callable(sampling) else contextlib.nullcontext():
            for index in progress_bar_cmd(range(n_steps)):
                sigma, sigma_next = sigmas[index], sigmas[index + 1]
                velocity = self.predict_velocity(x, sigma, cond, uncond, float(cfg_scale), rescale, batched=batched)
                x = chosen_sampler.step(x, velocity, sigma, sigma_next)
                bad = watch.push(x, (index, sigma))
                if bad is not None:
                    raise self._non_finite(*bad, n_steps)
                if step_callback is not None:
                    step_callback(index, sigma_next, x)
        bad = watch.finish()
        if bad is not None:
            raise self._non_finite(*bad, n_steps)

        if output_type == "latent":
            return x
        decoded = self.vae.decode(x.to(self.dtype), tiled=tiled, tile_size=tile_size, tile_stride=tile_stride)
        if output_type == "np":
            return tensor_to_float_array(decoded)
        images_out = tensor_to_pil(decoded)
        return images_out[0] if isinstance(prompt, str) else images_out
