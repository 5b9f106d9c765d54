"""`lora-studio generate`: images from a base model and a stack of LoRAs, parameters saved in each PNG.

Examples:
  lora-studio generate --model sd15.safetensors --prompt "a fox" --lora fox.safetensors:0.8 --seed 42
  lora-studio generate --model sd15.safetensors --prompt "a fox in the snow" --mode switch --tau 5 \\
      --lora fox.safetensors --lora snow.safetensors:0.9:OUTALL --scheduler "DPM++ 2M Karras"
  lora-studio generate --model sdxl.safetensors --prompt "a dog in [s] style" \\
      --b-lora-content dog_b.safetensors --b-lora-style watercolor_b.safetensors:0.9
  lora-studio generate --prompt "two shapes" --region "0,0,0.5,1:a red circle" \\
      --region "0.5,0,1,1:a sks shape:sks.safetensors:0.9"   # a prompt (and LoRA) per region
  lora-studio generate --from outputs/00003-42.png            # the same pixels again
  lora-studio generate --from outputs/00003-42.png --seed 7   # same settings, another seed
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from studio.core.options import (
    add_config_args,
    build_config,
    config_from_args,
    load_preset,
    parse_set_options,
)
from studio.generation.config import GenerateConfig, LoraSpec, Region, config_from_record


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "generate",
        help="generate images with a stack of LoRAs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--lora",
        action="append",
        default=None,
        metavar="FILE[:WEIGHT[:BLOCKS]]",
        help="a LoRA of the stack (repeatable); BLOCKS is a preset (OUTALL...) or a 12/17/20/26-value vector",
    )
    p.add_argument(
        "--region",
        action="append",
        default=None,
        metavar="X0,Y0,X1,Y1:PROMPT[:FILE[:WEIGHT]]",
        help="a region with its own prompt (and LoRA), repeatable; corners as fractions (0-1) or pixels",
    )
    p.add_argument(
        "--from",
        dest="from_image",
        default=None,
        metavar="IMAGE.png",
        help="regenerate an image made by LoRA Studio from the parameters in its PNG; other flags override them",
    )
    p.add_argument("--preset", default=None, help="TOML file (or name under presets/) with generate options")
    p.add_argument("--set", action="append", default=None, metavar="KEY=VALUE", help="set any option")
    add_config_args(p, GenerateConfig, skip=("loras", "regions", "expect_model_hash"))
    return p


def config_from_cli(args: argparse.Namespace) -> GenerateConfig:
    """defaults < --from image < --preset < flags < --set; --lora replaces the stack when given."""
    if not args.from_image:
        cfg = config_from_args(GenerateConfig, args, preset_kind="generate")
    else:
        from studio.generation.records import read_record

        base = config_from_record(read_record(args.from_image))
        values = {f.name: getattr(base, f.name) for f in fields(base)}
        if args.preset:
            values.update(load_preset(args.preset, "generate"))
        values.update({k: v for k, v in vars(args).items() if k in values and v is not None})
        values.update(parse_set_options(args.set))
        if args.model:  # another base model on purpose: no hash check
            values["expect_model_hash"] = None
        cfg = build_config(GenerateConfig, values)
    if args.lora:
        cfg.loras = [LoraSpec.parse(text) for text in args.lora]
    if args.region:
        cfg.regions = [Region.parse(text) for text in args.region]
    cfg.check()
    return cfg


def run(args: argparse.Namespace) -> int:
    cfg = config_from_cli(args)

    from studio.generation.service import GenerationService

    noted: set[str] = set()

    def report(result) -> None:
        for note in set(result.notes) - noted:  # the same for every image of a run: printed once
            print(f"note: {note}", file=sys.stderr, flush=True)
            noted.add(note)
        print(f"{result.path}  seed {result.seed}  {result.seconds:.1f} s", flush=True)

    images = GenerationService().generate(cfg, on_image=report, save=True)
    print(f"{len(images)} image(s) in {cfg.out}", file=sys.stderr)
    return 0
