"""`lora-studio train`: train a LoRA headless (DreamBooth, style, B-LoRA, block-wise, orthogonal).

Options come from presets/train_*.toml (--preset), then flags (one per TrainConfig field), then --set key=value:

    lora-studio train --preset style_sd15 --model sd15.safetensors --data-dir art/ --prompt "sks style"
    lora-studio train --preset b_lora_sdxl --model sdxl.safetensors --data-dir one_image/ --split
    lora-studio train --preset dreambooth_sd15 --model sd15/ --data-dir dog/ --prompt "a photo of sks dog" \\
        --set max_steps=800 --set up_lr_weight=cosine+0.2
    lora-studio train --preset style_sd15 ... --resume latest          # continue an interrupted run

Under `accelerate launch -m studio.app.cli train ...` the same command trains on several GPUs.
Progress goes to the terminal; machine-readable events to <output_dir>/events.jsonl.
"""

from __future__ import annotations

import argparse
import json

from studio.core.options import add_config_args, config_from_args, config_to_dict, preset_names


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from trainers.config import TrainConfig

    p = sub.add_parser(
        "train",
        help="train a LoRA: DreamBooth, style, B-LoRA, block-wise, orthogonal",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    names = ", ".join(preset_names("train"))
    p.add_argument("--preset", help=f"a training preset ({names}) or a .toml file")
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="set any option, e.g. --set max_steps=200"
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved options as JSON and exit")
    add_config_args(p, TrainConfig)
    return p


def run(args: argparse.Namespace) -> int:
    from trainers.config import TrainConfig

    cfg = config_from_args(TrainConfig, args, preset_kind="train")
    if args.print_config:
        print(json.dumps(config_to_dict(cfg), indent=2, default=str))
        return 0
    from trainers.loop import train

    result = train(cfg)
    extra = "".join(f"\n  also {p}" for p in result.files[1:])
    print(f"saved {result.path} after {result.step} steps ({result.seconds:.0f} s){extra}")
    return 0
