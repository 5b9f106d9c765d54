"""How fast the command line answers: `lora-studio --help` and `lora-studio inspect` on real-size files.

    python bench/bench_cli.py --files /tmp/cli-files          # writes the files, prints the commands to time

The files have the real SD1.5 / SDXL shapes (configs in studio/core/configs, built on the meta device) with
random values: a kohya LoRA (rank 32, attention and text encoders), a LyCORIS LoHa (rank 16, with 3x3 convs)
and a PEFT save_pretrained folder. Time the printed commands with a whole-process timer (farm-bench here),
the cost of importing torch + diffusers + peft beside them as the yardstick; the results are recorded in
bench/results/cli_cpu.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def write_files(folder: Path) -> list[Path]:
    import torch
    from safetensors.torch import save_file

    from bench.bench_merge import meta_pipe
    from studio.core.keys import kohya_module_name
    from studio.core.lora_files import write_lora
    from studio.core.modules import model_module_shapes
    from tests.fixtures.lora_random import default_targets, random_lora

    folder.mkdir(parents=True, exist_ok=True)
    pipe = meta_pipe("sdxl")
    files = [write_lora(random_lora(pipe, "sdxl", rank=32, alpha=16, scale=0.02), folder / "sdxl_lora_r32.safetensors",
                        dtype=torch.float16, overwrite=True)]  # fmt: skip
    shapes = model_module_shapes(pipe)
    g = torch.Generator().manual_seed(0)
    state = {}
    for path in default_targets(shapes, conv=True):
        out, flat = shapes[path][0], int(torch.tensor(shapes[path][1:]).prod())
        name = kohya_module_name(path, "sdxl")
        for i in (1, 2):
            state[f"{name}.hada_w{i}_a"] = (torch.randn(out, 16, generator=g) * 0.05).half()
            state[f"{name}.hada_w{i}_b"] = (torch.randn(16, flat, generator=g) * 0.05).half()
        state[f"{name}.alpha"] = torch.tensor(8.0)
    save_file(state, str(folder / "sdxl_loha_r16.safetensors"))
    files.append(folder / "sdxl_loha_r16.safetensors")
    sd15 = meta_pipe("sd15")
    lora = random_lora(sd15, "sd15", rank=16, scale=0.02, text_encoder=False)
    peft = folder / "sd15_peft_adapter"
    peft.mkdir(exist_ok=True)
    save_file({f"base_model.model.{p.removeprefix('unet.')}.lora_{w}.weight": getattr(m, a).half().contiguous()
               for p, m in lora.modules.items() for w, a in (("A", "down"), ("B", "up"))},
              str(peft / "adapter_model.safetensors"))  # fmt: skip
    (peft / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 16, "lora_alpha": 8}))
    files.append(peft)
    return files


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=Path, required=True, help="folder for the files")
    args = parser.parse_args()
    files = write_files(args.files)
    print("time these (e.g. farm-bench -n 10 -- COMMAND):")
    print("  lora-studio --help")
    for f in files:
        size = sum(p.stat().st_size for p in f.iterdir()) if f.is_dir() else f.stat().st_size
        print(f"  lora-studio inspect {f}    # {size / 2**20:.0f} MB")
    print('  yardstick: python -c "import torch, diffusers, peft"')


if __name__ == "__main__":
    main()
