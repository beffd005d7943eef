"""The `imagezoo` command: models, plugins, generate, download, inspect."""

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
    from imagezoo.run_config import generate_config

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
            "local_model_path",
            "skip_download",
        )
    }
    if args.memory:
        overrides["memory"] = [name.strip() for name in args.memory.split(",") if name.strip()]
    if args.vram_limit is not None:
        overrides["memory_options"] = {"vram_limit": args.vram_limit}
    config = generate_config(args.config, overrides)
    if not config.prompt:
        raise imagezoo.InputError("No prompt given: pass --prompt TEXT (or 'prompt:' in --config).")
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = config.torch_dtype_name() or ("bfloat16" if device != "cpu" else "float32")
    pipe = imagezoo.load(
        config.model,
        device=device,
        torch_dtype=getattr(torch, dtype_name),
        memory=config.memory,
        local_model_path=config.local_model_path,
        skip_download=config.skip_download,
        **config.memory_options,
    )
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
    )
    images = images if isinstance(images, list) else [images]
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(images))]
    for image, path in zip(images, paths, strict=True):
        image.save(path)
        print(f"wrote {path} ({image.width}x{image.height})")
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
    p.add_argument("--local-model-path", dest="local_model_path")
    p.add_argument("--skip-download", dest="skip_download", action="store_true", default=None)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("download", help="download a registered model's files")
    p.add_argument("model")
    p.add_argument("--local-model-path", dest="local_model_path")
    p.add_argument("--source", default="modelscope", choices=["modelscope", "huggingface"])
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("inspect", help="describe a safetensors checkpoint (headers only)")
    p.add_argument("path", help="a .safetensors file, or a folder of shards")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)
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
