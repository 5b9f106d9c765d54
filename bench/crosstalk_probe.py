"""How much of one concept's LoRA acts on another concept's prompt after a sum: orthogonal against ordinary.

Orthogonal adaptation promises that a summed LoRA acts on concept i's inputs as LoRA i alone does, because
the other concepts' down-projections are orthogonal to i's. This bench measures it on the whole model: for
each concept's training images (noised at a few timesteps) and captions, the crosstalk is

    || eps(sum of LoRAs) - eps(LoRA i alone) ||  /  || eps(LoRA i alone) - eps(base) ||

(1 = the others change the prediction as much as concept i's own LoRA does; 0 = they do not touch it),
for each pair of LoRA files given as `--pair NAME:heart.safetensors,moon.safetensors:DATA_HEART,DATA_MOON`.

A second table tests the premise: the other LoRA leaves concept i alone when concept i's layer inputs X_i
lie outside its down-projection's row space. For every UNet linear layer both LoRAs adapt it gives the share
of X_i's energy (concept i's LoRA alone loaded, the same noisy inputs) inside the row space of each LoRA's down-projection,
median over layers, beside rank / width, what a random subspace of that rank holds.

    python bench/crosstalk_probe.py --model demo:sd15-128 \\
        --pair "orthogonal:/tmp/o/h.safetensors,/tmp/o/m.safetensors:/tmp/o/data/h,/tmp/o/data/m"
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from records import previous_notes, record_head  # noqa: E402  (bench/ is on the path as a script)

from studio.core.model_paths import resolve_model  # noqa: E402
from studio.generation.adapters import AdapterPool  # noqa: E402

TIMESTEPS = (200, 500, 800)


def noisy_inputs(pipe, folder: Path, generator: torch.Generator):
    """(noisy latents, timesteps, captions) of every training image at each of TIMESTEPS."""
    images = sorted(folder.glob("*.png"))
    pixels = torch.stack(
        [torch.from_numpy(np.asarray(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in images]
    )
    with torch.no_grad():
        latents = (
            pipe.vae.encode(pixels.float() / 127.5 - 1).latent_dist.mean * pipe.vae.config.scaling_factor
        )
    captions = [p.with_suffix(".txt").read_text().strip() for p in images]
    rows = []
    for t in TIMESTEPS:
        noise = torch.randn(latents.shape, generator=generator)
        steps = torch.full((len(images),), t)
        rows.append((pipe.scheduler.add_noise(latents, noise, steps), steps, captions))
    return rows


def predict(pipe, inputs) -> torch.Tensor:
    outs = []
    with torch.no_grad():
        for latents, steps, captions in inputs:
            emb = pipe.encode_prompt(captions, "cpu", 1, False)[0]
            outs.append(pipe.unet(latents, steps, encoder_hidden_states=emb).sample)
    return torch.cat(outs)


def crosstalk(pool: AdapterPool, files: list[str], concept_inputs: list) -> list[float]:
    """Through the studio's adapter pool, as generation runs them (token embeddings a file bundles included);
    `concept_inputs`: each concept's `noisy_inputs`."""
    pipe = pool.pipe
    adapters = [pool.load(path) for path in files]
    ratios = []
    for i, inputs in enumerate(concept_inputs):
        pool.activate([])
        base = predict(pipe, inputs)
        pool.activate([(adapters[i], 1.0, None)])
        alone = predict(pipe, inputs)
        pool.activate([(a, 1.0, None) for a in adapters])
        summed = predict(pipe, inputs)
        ratios.append(float((summed - alone).norm() / (alone - base).norm()))
    pool.activate([])
    return ratios


def row_spaces(file: str) -> dict[str, torch.Tensor]:
    """{UNet module path: orthonormal basis (width x rank) of the down-projection's row space}, linear only."""
    from merging.sources import module_factors
    from studio.core.lora_files import read_lora

    spaces = {}
    for path, module in read_lora(file).modules.items():
        if path.startswith("unet.") and not module.is_conv:
            down = module_factors(module).down.double()
            spaces[path.removeprefix("unet.")] = torch.linalg.qr(down.T).Q
    return spaces


def input_energy(pipe, inputs, bases: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{layer: [energy of its inputs inside each basis..., total energy]} over a base-model run of `inputs`."""
    sums = {path: torch.zeros(len(bases) + 1, dtype=torch.float64) for path in bases[0]}

    def hook(path):
        def record(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            inside = [(x @ basis[path]).pow(2).sum() for basis in bases]
            sums[path] += torch.stack([*inside, x.pow(2).sum()])

        return record

    handles = [pipe.unet.get_submodule(p).register_forward_pre_hook(hook(p)) for p in sums]
    try:
        predict(pipe, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return sums


def slice_shares(
    pool: AdapterPool, files: list[str], concept_inputs: list
) -> list[tuple[float, float, float]]:
    """Per concept i (its LoRA alone loaded, as when it generates): median over shared layers of the share of
    X_i's energy in LoRA i's row space, in the other LoRA's, and rank / width."""
    pipe = pool.pipe
    spaces = [row_spaces(f) for f in files]
    shared = sorted(set(spaces[0]) & set(spaces[1]))
    result = []
    for i, inputs in enumerate(concept_inputs):
        bases = [{p: spaces[k][p] for p in shared} for k in (i, 1 - i)]
        pool.activate([(pool.load(files[i]), 1.0, None)])
        sums = input_energy(pipe, inputs, bases)
        pool.activate([])
        own = [float(sums[p][0] / sums[p][2]) for p in shared]
        other = [float(sums[p][1] / sums[p][2]) for p in shared]
        random = [spaces[i][p].shape[1] / spaces[i][p].shape[0] for p in shared]
        result.append((statistics.median(own), statistics.median(other), statistics.median(random)))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="demo:sd15-128")
    parser.add_argument("--pair", action="append", required=True, help="NAME:FILE,FILE:DATA,DATA")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", type=Path, default=ROOT / "bench/results/crosstalk_probe.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffusers import StableDiffusionPipeline

    path, _ = resolve_model(args.model)
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None)
    pool = AdapterPool(pipe, "sd15")
    lines = ["| LoRAs | crosstalk on concept 1 | crosstalk on concept 2 |", "|---|---|---|"]
    shares = [
        "",
        "Share of concept i's layer-input energy in each LoRA's row space (median over shared linear layers):",
        "",
        "| LoRAs | concept 1: own LoRA / other LoRA / rank over width "
        "| concept 2: own LoRA / other LoRA / rank over width |",
        "|---|---|---|",
    ]
    for spec in args.pair:
        name, files, folders = spec.split(":")
        files = files.split(",")
        inputs = [
            noisy_inputs(pipe, Path(f), torch.Generator().manual_seed(i))
            for i, f in enumerate(folders.split(","))
        ]
        ratios = crosstalk(pool, files, inputs)
        lines.append(f"| {name} | " + " | ".join(f"{r:.2f}" for r in ratios) + " |")
        print(lines[-1], flush=True)
        cells = slice_shares(pool, files, inputs)
        shares.append(f"| {name} | " + " | ".join(" / ".join(f"{v:.3f}" for v in c) for c in cells) + " |")
        print(shares[-1], flush=True)
    lines += shares
    pairs = " ".join(f'--pair "{p}"' for p in args.pair)
    head = record_head(
        "Crosstalk of summed LoRAs on each concept's own inputs (SD1.5 demo model)",
        "crosstalk_probe.py",
        f"--model {args.model} {pairs}",
        f"timesteps {', '.join(map(str, TIMESTEPS))}, every training image of each concept.",
    )
    if notes := previous_notes(args.results):
        lines += ["", notes.rstrip()]
    args.results.write_text("\n".join(head + lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
