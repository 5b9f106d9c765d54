"""Small CNN judges for the demo world: which shape, colour, background and style an image shows.

They are trained on the whole world (held-out shapes and styles included) so they can judge what a LoRA
learned, and they are shipped in `studio/demo/weights/judges/` (safetensors + a JSON config).

    >>> from studio.demo.classifiers import load_judges
    >>> judges = load_judges()
    >>> result = judges.judge(images)           # list of PIL images (any size; resized to 64 px)
    >>> result["shape"].labels[0], result["shape"].confidence[0]
    ('circle', 0.99)

Train (about 6 minutes on one CPU thread):
    python -m studio.demo.classifiers train --out studio/demo/weights/judges --minutes 6 --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from studio.core.errors import StudioError
from studio.demo.world import IMAGE_SIZE, World, world_for

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
JUDGES_DIR = WEIGHTS_DIR / "judges"
# the 128 px world's judges also know its two extra held-out subjects; they read images at 64 px too
JUDGES_DIRS = {64: JUDGES_DIR, 128: WEIGHTS_DIR / "judges-128"}
WEIGHTS_NAME = "judges.safetensors"
CONFIG_NAME = "config.json"


class WorldJudge(nn.Module):
    """A five-layer CNN with one linear head per attribute (shape, colour, background, style)."""

    def __init__(self, classes: dict[str, Sequence[str]], width: int = 32) -> None:
        super().__init__()
        self.classes = {name: tuple(labels) for name, labels in classes.items()}
        # 64 -> 32 -> 16 -> 16 -> 8 -> 4: the world's shapes are large and smooth, so the first layer strides
        chans = [3, width, width, 2 * width, 2 * width, 2 * width]
        strides = [2, 2, 1, 2, 2]
        layers: list[nn.Module] = []
        for i, stride in enumerate(strides):
            layers += [
                nn.Conv2d(chans[i], chans[i + 1], 3, stride, 1),
                nn.BatchNorm2d(chans[i + 1]),
                nn.ReLU(),
            ]
        self.features = nn.Sequential(*layers)
        self.heads = nn.ModuleDict(
            {name: nn.Linear(2 * chans[-1], len(labels)) for name, labels in classes.items()}
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute for images in [-1, 1], shape (B, 3, 64, 64)."""
        h = self.features(x)
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        return {name: head(pooled) for name, head in self.heads.items()}


@dataclass(frozen=True)
class AttributePrediction:
    """Predictions for one attribute over a batch: best label, its probability, and all probabilities."""

    classes: tuple[str, ...]
    labels: list[str]
    confidence: list[float]
    probs: np.ndarray  # (batch, len(classes))


class Judges:
    """Loaded judges; call `judge(images)`."""

    def __init__(self, model: WorldJudge) -> None:
        self.model = model.eval()

    @torch.no_grad()
    def judge(self, images: Sequence[Image.Image] | torch.Tensor) -> dict[str, AttributePrediction]:
        """Predict shape, colour, background and style for PIL images or a (B, 3, H, W) tensor in [-1, 1]."""
        x = images if isinstance(images, torch.Tensor) else images_to_tensor(images)
        if x.shape[-1] != IMAGE_SIZE or x.shape[-2] != IMAGE_SIZE:
            x = F.interpolate(
                x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False
            )
        out: dict[str, AttributePrediction] = {}
        for name, logits in self.model(x.float()).items():
            probs = logits.softmax(-1)
            conf, idx = probs.max(-1)
            classes = self.model.classes[name]
            out[name] = AttributePrediction(
                classes, [classes[i] for i in idx.tolist()], conf.tolist(), probs.numpy()
            )
        return out


def images_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images -> float tensor (B, 3, H, W) in [-1, 1]."""
    arrays = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def load_judges(path: str | Path | None = None, image_size: int = IMAGE_SIZE) -> Judges:
    """Load judges from `path` (default: the shipped ones of the `image_size` px world). Raises StudioError
    if they are missing."""
    folder = Path(path) if path is not None else JUDGES_DIRS[world_for(image_size).image_size]
    weights, config = folder / WEIGHTS_NAME, folder / CONFIG_NAME
    if not weights.is_file() or not config.is_file():
        raise StudioError(
            f"World judges not found in {folder}. Train them with "
            f"`python -m studio.demo.classifiers train --out {folder} --world {image_size}`."
        )
    meta = json.loads(config.read_text())
    model = WorldJudge(meta["classes"], width=meta["width"])
    state = {k: v.float() for k, v in load_file(str(weights)).items()}
    model.load_state_dict(state)
    return Judges(model)


def judge(
    images: Sequence[Image.Image] | torch.Tensor, path: str | Path | None = None
) -> dict[str, AttributePrediction]:
    """Load the judges and judge `images` in one call (see `Judges.judge`)."""
    return load_judges(path).judge(images)


# -------------------------------------------------------------------------------------------- training
def render_dataset(
    seed: int, n: int, split: str = "all", world: World | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Render `n` one-shape scenes of `world` as uint8 (n, 3, 64, 64) with integer labels per attribute
    (drawn at the judges' 64 px, whatever the world's size: the same designs at half the detail)."""
    world = (world or world_for(IMAGE_SIZE)).singles()
    specs = world.sample(seed, n, split)
    images = [np.asarray(world.render(s, size=IMAGE_SIZE)) for s in specs]
    labels = {
        name: torch.tensor([classes.index(getattr(s, name)) for s in specs])
        for name, classes in world.attributes().items()
    }
    images = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    return images.contiguous(), labels


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur, softening and noise like a decoder's output, so judges also read generated images."""
    b = x.shape[0]
    soft = F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="bilinear", align_corners=False)
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    pick = torch.rand(b, 1, 1, 1, generator=gen)
    x = torch.where(pick < 0.25, soft, torch.where(pick < 0.5, blur, x))
    x = x + torch.randn(x.shape, generator=gen) * torch.rand(b, 1, 1, 1, generator=gen) * 0.08
    x = x * (1 + (torch.rand(b, 1, 1, 1, generator=gen) - 0.5) * 0.1)
    return x.clamp(-1, 1)


def evaluate(model: WorldJudge, images: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, float]:
    """Accuracy per attribute on uint8 images."""
    model.eval()
    correct = {name: 0 for name in labels}
    with torch.no_grad():
        for i in range(0, len(images), 256):
            logits = model(images[i : i + 256].float() / 127.5 - 1.0)
            for name, lg in logits.items():
                correct[name] += int((lg.argmax(-1) == labels[name][i : i + 256]).sum())
    return {name: c / len(images) for name, c in correct.items()}


def train(
    out: Path,
    seed: int,
    n_train: int,
    minutes: float,
    batch: int,
    lr: float,
    width: int,
    image_size: int = 64,
) -> dict:
    """Train the judges of the `image_size` px world, evaluate on held-out seeds, save safetensors + config.
    Returns the metadata."""
    torch.manual_seed(seed)
    random.seed(seed)
    gen = torch.Generator().manual_seed(seed)
    started = time.time()
    world = world_for(image_size)
    images, labels = render_dataset(seed, n_train, world=world)
    test_images, test_labels = render_dataset(seed + 100_000, 4000, world=world)
    model = WorldJudge(world.attributes(), width=width)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    budget, step = minutes * 60, 0
    while time.time() - started < budget:
        model.train()
        order = torch.randperm(len(images), generator=gen)
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i : i + batch]
            x = augment(images[idx].float() / 127.5 - 1.0, gen)
            logits = model(x)
            loss = sum(F.cross_entropy(logits[name], labels[name][idx]) for name in labels)
            frac = min(1.0, (time.time() - started) / budget)
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + np.cos(np.pi * frac))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % 200 == 0:
                print(f"step {step} loss {loss.item():.4f} {time.time() - started:.0f}s", flush=True)
            if time.time() - started > budget:
                break
    accuracy = evaluate(model, test_images, test_labels)
    meta = {
        "classes": {k: list(v) for k, v in world.attributes().items()},
        "width": width,
        "world": image_size,
        "seed": seed,
        "train_images": n_train,
        "train_split": "all",
        "steps": step,
        "minutes": round((time.time() - started) / 60, 2),
        "test": {"seed": seed + 100_000, "images": 4000, "split": "all", "accuracy": accuracy},
        "command": " ".join(["python -m studio.demo.classifiers", *sys.argv[1:]]),
    }
    save_judges(model, meta, out)
    return meta


def save_judges(model: WorldJudge, meta: dict, out: Path) -> None:
    """The weights (fp16 safetensors) and their config with `meta` into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().to(torch.float16).contiguous()
        for k, v in model.state_dict().items()
        if v.is_floating_point()
    }
    save_file(state, str(out / WEIGHTS_NAME))
    (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: `python -m studio.demo.classifiers train --out DIR`."""
    parser = argparse.ArgumentParser(description="Train the demo-world judges.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--out", type=Path, default=None, help="output folder (default: the world's shipped one)")
    t.add_argument("--world", type=int, default=IMAGE_SIZE, help="the demo world: 64 or 128 px")
    t.add_argument("--seed", type=int, default=0, help="seed for data and weights")
    t.add_argument("--images", type=int, default=30000, help="training images (split 'all')")
    t.add_argument("--minutes", type=float, default=6.0, help="training time budget")
    t.add_argument("--batch", type=int, default=128, help="batch size")
    t.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (cosine decay)")
    t.add_argument("--width", type=int, default=32, help="base channel width")
    t.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out or JUDGES_DIRS[world_for(args.world).image_size]
    meta = train(out, args.seed, args.images, args.minutes, args.batch, args.lr, args.width, args.world)
    print(json.dumps(meta["test"], indent=2))


if __name__ == "__main__":
    main()
