"""The `imagezoo` command: models, plugins, generate, download, inspect, lora."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from imagezoo.errors import ImagezooError

logger = logging.getLogger("imagezoo.cli")


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def cmd_models(args: argparse.Namespace) -> int:
    from imagezoo.plugin_manager import get_kernel

    rows = []
    for registered in get_kernel().models:
        entry, d = registered.value, registered.value.defaults
        rows.append(
            [
                entry.id,
                ", ".join(entry.aliases),
                registered.plugin,
                entry.family,
                f"{d.num_inference_steps} steps, cfg {d.cfg_scale:g}, {d.width}x{d.height}, {d.sampler}",
            ]
        )
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "id": r[0],
                        "aliases": r[1].split(", ") if r[1] else [],
                        "plugin": r[2],
                        "family": r[3],
                        "defaults": registered_defaults,
                    }
                    for r, registered_defaults in zip(
                        rows, [reg.value.defaults.model_dump() for reg in get_kernel().models], strict=True
                    )
                ],
                indent=2,
            )
        )
    else:
        print(_table(rows, ["ID", "ALIASES", "PLUGIN", "FAMILY", "DEFAULTS"]))
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from imagezoo.plugin_manager import get_kernel

    infos = get_kernel().plugins()
    if args.json:
        print(
            json.dumps(
                [{"name": i.name, "version": i.version, "hooks": list(i.hooks), "builtin": i.builtin} for i in infos],
                indent=2,
            )
        )
    else:
        rows = [[i.name, i.version or ("built-in" if i.builtin else "-"), ", ".join(i.hooks)] for i in infos]
        print(_table(rows, ["NAME", "VERSION", "HOOKS"]))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image

    import imagezoo
    from imagezoo.images import numbered_paths
    from imagezoo.memory import places_weights
    from imagezoo.parallel import is_main_process
    from imagezoo.plugin_manager import get_kernel
    from imagezoo.run_config import generate_config, lora_specs

    overrides = {
        key: getattr(args, key)
        for key in (
            "model",
            "prompt",
            "negative_prompt",
            "out",
            "cfg_scale",
            "num_inference_steps",
            "height",
            "width",
            "seed",
            "rand_device",
            "device",
            "dtype",
            "tiled",
            "tile_size",
            "tile_stride",
            "input_image",
            "denoising_strength",
            "sampler",
            "speed",
            "local_model_path",
            "skip_download",
            "gpus",
            "parallel",
        )
    }
    if args.memory:
        overrides["memory"] = [name.strip() for name in args.memory.split(",") if name.strip()]
    if args.vram_limit is not None:
        overrides["memory_options"] = {"vram_limit": args.vram_limit}
    if args.fuse_lora:
        overrides["fuse_loras"] = True
    config = generate_config(args.config, overrides)
    if config.memory_options.get("vram_limit") is not None and not config.memory:
        # A budget alone means block streaming under it, as the seed's enable_vram_management(vram_limit=...).
        config.memory = ["stream"]
    # --lora and the entity flags add to what a --config file gives rather than replacing it.
    config.loras.extend(lora_specs(args.lora or []))
    entity_flags = {
        "entity_prompts": args.entity_prompt,
        "entity_masks": args.entity_mask,
        "entity_enable_on_negative": args.entity_on_negative,
    }
    config.inputs.update({key: value for key, value in entity_flags.items() if value is not None})
    if not config.prompt:
        raise imagezoo.InputError("No prompt given: pass --prompt TEXT (or 'prompt:' in --config).")
    # Checked before the (slow) model load.
    if len(args.entity_prompt or []) != len(args.entity_mask or []):
        raise imagezoo.InputError(
            f"--entity-prompt is given {len(args.entity_prompt or [])} time(s) and --entity-mask "
            f"{len(args.entity_mask or [])}; give one mask file per entity prompt."
        )
    missing = [lora.path for lora in config.loras if not Path(lora.path).exists()]
    if missing:
        raise imagezoo.InputError(f"LoRA file(s) not found: {', '.join(missing)}.")
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = config.torch_dtype_name() or ("bfloat16" if device != "cpu" else "float32")
    pipe = imagezoo.load(
        config.model,
        device=device,
        torch_dtype=getattr(torch, dtype_name),
        local_model_path=config.local_model_path,
        skip_download=config.skip_download,
        build_on_host=places_weights(config.memory, get_kernel().memory_strategies),
        **({"gpus": config.gpus, "parallel": config.parallel} if config.gpus is not None else {}),
    )
    # LoRAs go on before memory strategies, so the strategies see (and may move) the final weights.
    for lora in config.loras:
        pipe.load_lora(lora.path, scale=lora.scale, name=lora.name)
    if config.fuse_loras:
        pipe.fuse_lora()
    if config.memory:
        pipe.enable_memory(config.memory, **config.memory_options)
    if config.speed:  # last: compiled blocks and FP8 weights are made from the weights where they finally live
        pipe.enable_speed(config.speed)
    input_image = Image.open(config.input_image) if config.input_image else None
    images = pipe(
        config.prompt,
        negative_prompt=config.negative_prompt,
        cfg_scale=config.cfg_scale,
        input_image=input_image,
        denoising_strength=config.denoising_strength,
        height=config.height,
        width=config.width,
        seed=config.seed,
        rand_device=config.rand_device,
        num_inference_steps=config.num_inference_steps,
        tiled=config.tiled,
        tile_size=config.tile_size,
        tile_stride=config.tile_stride,
        sampler=config.sampler,
        **config.inputs,
    )
    images = images if isinstance(images, list) else [images]
    if not is_main_process(pipe):  # another rank of a torchrun launch: rank 0 writes the files
        return 0
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = numbered_paths(out, len(images))
    for image, path in zip(images, paths, strict=True):
        image.save(path)
        print(f"wrote {path} ({image.width}x{image.height})")
    return 0


def _lora_layers(args: argparse.Namespace, alpha: float | None = None) -> tuple[str, dict]:
    from imagezoo.lora import detect_lora_format, module_names_from_checkpoint, parse_lora_state_dict, read_lora

    tensors, file_alpha = read_lora(args.input)
    fmt = detect_lora_format(tensors)
    names = module_names_from_checkpoint(args.base) if args.base else None
    alpha = alpha if alpha is not None else file_alpha
    return fmt, parse_lora_state_dict(tensors, module_names=names, alpha=alpha, format=fmt)


def cmd_lora_convert(args: argparse.Namespace) -> int:
    from imagezoo.lora import save_lora_file

    fmt, layers = _lora_layers(args, args.alpha)
    path = save_lora_file(layers, args.output, args.to)
    print(f"wrote {path} ({len(layers)} modules, {fmt} -> {args.to})")
    return 0


def cmd_lora_info(args: argparse.Namespace) -> int:
    fmt, layers = _lora_layers(args)
    ranks = sorted({layer.rank for layer in layers.values()})
    alphas = sorted({layer.alpha for layer in layers.values() if layer.alpha is not None})
    dtypes = sorted({str(layer.down.dtype).removeprefix("torch.") for layer in layers.values()})
    print(f"format: {fmt}")
    print(f"modules: {len(layers)} (e.g. {', '.join(list(layers)[:3])})")
    print(f"rank: {', '.join(map(str, ranks))}")
    print(f"alpha: {', '.join(f'{a:g}' for a in alphas) or 'none (= rank)'}")
    print(f"dtype: {', '.join(dtypes)}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from imagezoo.config import ModelConfig
    from imagezoo.plugin_manager import get_kernel

    kernel = get_kernel()
    entry = kernel.models.get(args.model)
    for component, source in entry.components.items():
        config = ModelConfig(
            model_id=entry.component_model_id(component),
            origin_file_pattern=source.pattern,
            local_model_path=args.local_model_path,
            source=args.source,
        )
        files = kernel.resolve_weights(config)
        print(f"{component}: {len(files)} file(s) under {Path(files[0]).parent}")
    for source in entry.adapters:  # LoRA files the entry loads onto the model
        config = ModelConfig(
            model_id=source.model_id or entry.id,
            origin_file_pattern=source.pattern,
            local_model_path=args.local_model_path,
            source=args.source,
        )
        files = kernel.resolve_weights(config)
        print(f"adapter: {len(files)} file(s) under {Path(files[0]).parent}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from imagezoo.train import EXIT_INTERRUPTED
    from imagezoo.training.config import config_from_namespace
    from imagezoo.training.trainer import train

    result = train(config_from_namespace(args))
    return EXIT_INTERRUPTED if result.interrupted else 0


def cmd_validate(args: argparse.Namespace) -> int:
    from imagezoo.training.validate import run_validate

    for path in run_validate(args):
        print(f"wrote {path}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from imagezoo.inspect import inspect_checkpoint

    report = inspect_checkpoint(args.path)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            if isinstance(value, list):
                print(f"{key}: {len(value)}" + (f" (e.g. {', '.join(map(str, value[:5]))})" if value else ""))
            else:
                print(f"{key}: {value}")
    return 0 if report.get("matches_architecture") else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imagezoo", description="Plugin-based text-to-image model zoo.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list registered models (ID, aliases, plugin, defaults)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("plugins", help="list loaded plugins (name, version, hooks)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("generate", help="generate an image")
    p.add_argument("--config", help="YAML/JSON file with the same settings; flags override it")
    p.add_argument("--model", help="model ID or alias (default: tiny)")
    p.add_argument("--prompt")
    p.add_argument("--negative-prompt", dest="negative_prompt")
    p.add_argument("--out", help="output image path (default image.png); batches get -0, -1, ... suffixes")
    p.add_argument("--cfg-scale", dest="cfg_scale", type=float)
    p.add_argument("--steps", dest="num_inference_steps", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--rand-device", dest="rand_device")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--dtype", help="bf16 | fp16 | fp32 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--tiled", action="store_true", default=None, help="VAE tiling")
    p.add_argument("--tile-size", dest="tile_size", type=int)
    p.add_argument("--tile-stride", dest="tile_stride", type=int)
    p.add_argument("--input-image", dest="input_image")
    p.add_argument("--denoising-strength", dest="denoising_strength", type=float)
    p.add_argument("--sampler")
    p.add_argument("--memory", help="comma-separated memory strategies, in order")
    p.add_argument("--vram-limit", dest="vram_limit", type=float, help="GB of VRAM the memory strategies may use")
    p.add_argument(
        "--speed",
        metavar="PROFILE",
        help="speed profile: auto (best exact settings for this GPU), exact, fp8, cache, fastest, off (docs/speed.md)",
    )
    p.add_argument("--local-model-path", dest="local_model_path")
    p.add_argument("--skip-download", dest="skip_download", action="store_true", default=None)
    p.add_argument(
        "--gpus",
        type=int,
        help="processes (one per GPU) sharing each generation: spawned here, or torchrun's ranks (docs/parallel.md)",
    )
    p.add_argument("--parallel", choices=["auto", "sp", "cfg"], help="how the GPUs share it (default auto)")
    p.add_argument(
        "--lora",
        action="append",
        metavar="PATH[:SCALE]",
        help="load a LoRA file (any key format) at SCALE (default 1); repeatable",
    )
    p.add_argument("--fuse-lora", dest="fuse_lora", action="store_true", help="fuse the LoRAs into the weights")
    p.add_argument(
        "--entity-prompt",
        dest="entity_prompt",
        action="append",
        metavar="TEXT",
        help="regional (entity) prompt, e.g. for EliGen models; repeatable, one per --entity-mask",
    )
    p.add_argument(
        "--entity-mask",
        dest="entity_mask",
        action="append",
        metavar="FILE",
        help="mask image of the matching --entity-prompt (white = its region); repeatable",
    )
    p.add_argument(
        "--entity-on-negative",
        dest="entity_on_negative",
        action="store_true",
        default=None,
        help="apply the entity layout to the negative (CFG) pass too",
    )
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("lora", help="LoRA file tools")
    lora_sub = p.add_subparsers(dest="lora_command", required=True)
    c = lora_sub.add_parser("convert", help="rewrite a LoRA file in another key format")
    c.add_argument("input", help="LoRA .safetensors file (format detected from its keys)")
    c.add_argument("output", help="output .safetensors file")
    c.add_argument("--to", required=True, dest="to", help="peft | diffusers | diffsynth | kohya | comfyui")
    c.add_argument(
        "--base",
        help="checkpoint (file or folder) of the model the LoRA is for; needed to read kohya names (headers only)",
    )
    c.add_argument("--alpha", type=float, help="alpha of modules the file gives none for (default: alpha = rank)")
    c.set_defaults(func=cmd_lora_convert)
    c = lora_sub.add_parser("info", help="show a LoRA file's format, modules, rank and alpha")
    c.add_argument("input")
    c.add_argument("--base", help="checkpoint of the model the LoRA is for (needed for kohya names)")
    c.set_defaults(func=cmd_lora_info)

    p = sub.add_parser("download", help="download a registered model's files")
    p.add_argument("model")
    p.add_argument("--local-model-path", dest="local_model_path")
    p.add_argument("--source", default="modelscope", choices=["modelscope", "huggingface"])
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("inspect", help="describe a safetensors checkpoint (headers only)")
    p.add_argument("path", help="a .safetensors file, or a folder of shards")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    from imagezoo.training.config import add_validate_arguments
    from imagezoo.training.config import build_parser as build_train_parser

    p = sub.add_parser("train", help="train a LoRA or fine-tune (the seed's train.py flags; accelerate-launchable)")
    build_train_parser(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("validate", help="generate with a trained LoRA or full checkpoint")
    add_validate_arguments(p)
    p.set_defaults(func=cmd_validate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `imagezoo` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except ImagezooError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
