"""The family-agnostic generation loop: encode -> sample(denoiser) -> decode, with CFG, batching and checks."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from imagezoo.config import ModelConfig
from imagezoo.errors import InputError, NumericalError, WeightsError
from imagezoo.guidance import guide
from imagezoo.images import pil_to_tensor, tensor_to_float_array, tensor_to_pil
from imagezoo.interfaces import Components, ModelFamily, Sampler, TextConditioning
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


class Pipeline:
    """Text-to-image (and image-to-image) generation for any registered model family.

    Build it with `from_registry` (model ID only) or `from_pretrained` (explicit `ModelConfig`s, the seed API).
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
    ) -> Pipeline:
        """Load a registered model by ID or alias; its files and defaults come from the registry entry.

        Args:
            model_id: Hub ID (`"Qwen/Qwen-Image"`) or alias (`"qwen-image"`), case-insensitive.
            device: Compute device.
            torch_dtype: Compute dtype.
            local_model_path: Download/cache folder (default `$IMAGEZOO_MODELS_DIR` or `./models`).
            skip_download: Use local files only.
            kernel: Plugin set to use (default: the process-wide one).
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
        components = family.build(files, dtype=torch_dtype, device=device)
        return cls(components, defaults=entry.defaults, device=device, dtype=torch_dtype, entry=entry, kernel=kernel)

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
        components = fam.build(files, dtype=torch_dtype, device=device)
        components.offload = offload
        entry = cls._entry_for(kernel, family_name, fam, model_ids.get("dit"))
        return cls(components, defaults=entry.defaults, device=device, dtype=torch_dtype, entry=entry, kernel=kernel)

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
        """Apply memory strategies by name, in order; options go to each strategy that accepts them.

        Unknown names are an error listing the available strategies; nothing is applied in that case.
        """
        factories = [self.kernel.memory_strategies.get(name) for name in names]
        for registered in factories:
            strategy = registered.value(**options)
            strategy.apply(self)
            self.memory_strategies.append(strategy)

    def disable_memory(self, name: str | None = None) -> None:
        """Remove one applied strategy by name (and those applied after it), or all when `name` is None."""
        names = [strategy.name for strategy in self.memory_strategies]
        if name is not None and name not in names:
            raise InputError(f"Memory strategy {name!r} is not applied; applied: {', '.join(names) or 'none'}.")
        stop = 0 if name is None else names.index(name)
        while len(self.memory_strategies) > stop:
            self.memory_strategies.pop().remove(self)

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

    def predict_velocity(
        self,
        latents: torch.Tensor,
        sigma: float,
        cond: TextConditioning,
        uncond: TextConditioning | None,
        cfg_scale: float,
        cfg_rescale: bool,
    ) -> torch.Tensor:
        """The (guided) velocity for float32 latents at `sigma`; CFG runs as one batched forward."""
        batch = latents.shape[0]
        x = latents.to(self.dtype)
        if uncond is None:
            text, x_in = cond, x
        else:
            text, x_in = _pad_text([cond, uncond]), torch.cat([x, x])
        sigmas = torch.full((x_in.shape[0],), sigma, device=x.device, dtype=self.dtype)
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

        Returns:
            One image for a string prompt, a list for a list of prompts (or a tensor / array batch for "latent" /
            "np" output).
        """
        defaults = self.defaults
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

        x = noise
        if input_image is not None:
            images = [input_image] if not isinstance(input_image, (list, tuple)) else list(input_image)
            if len(images) not in (1, batch):
                raise InputError(f"input_image has {len(images)} images for {batch} prompts; give 1 or one each.")
            pixels = torch.cat([pil_to_tensor(image, width, height) for image in images]).to(self.device, self.dtype)
            clean = self.vae.encode(pixels, tiled=tiled, tile_size=tile_size, tile_stride=tile_stride).float()
            clean = clean.expand(batch, -1, -1, -1) if clean.shape[0] == 1 else clean
            x = sigmas[0] * noise + (1.0 - sigmas[0]) * clean

        for index in progress_bar_cmd(range(len(sigmas) - 1)):
            sigma, sigma_next = sigmas[index], sigmas[index + 1]
            velocity = self.predict_velocity(x, sigma, cond, uncond, float(cfg_scale), rescale)
            x = chosen_sampler.step(x, velocity, sigma, sigma_next)
            if not torch.isfinite(x).all():
                raise NumericalError(
                    f"Non-finite values (NaN/inf) appeared in the latents at step {index + 1}/{len(sigmas) - 1} "
                    f"(sigma={sigma:.4f}, dtype={self.dtype}). Likely cause: overflow in low precision (fp16 "
                    "overflows past 65504); use torch.bfloat16 or torch.float32, or check LoRA scales and inputs."
                )
            if step_callback is not None:
                step_callback(index, sigma_next, x)

        if output_type == "latent":
            return x
        decoded = self.vae.decode(x.to(self.dtype), tiled=tiled, tile_size=tile_size, tile_stride=tile_stride)
        if output_type == "np":
            return tensor_to_float_array(decoded)
        images_out = tensor_to_pil(decoded)
        return images_out[0] if isinstance(prompt, str) else images_out
