"""`lora-studio eval`: how well every method works, measured on the demo world by the world judges.

Each row trains (or merges) LoRAs on the built-in demo model with the same code a user runs, generates
images for prompts drawn from held-out seeds, and lets the judges say what the images show:

- base: prompt adherence of the base model (shape / colour / background accuracy, chance level beside it);
- dreambooth: "a sks shape on a <bg> background" before and after training on a held-out subject (a red
  heart), with and without prior preservation; "kept" = the background still follows the prompt, and plain
  world prompts still work with the LoRA loaded;
- style: a held-out style (framed) learnt from 32 images; content (shape, colour, background) kept;
- merge: subject LoRA + style LoRA merged by exact sum (concat), SVD, ZipLoRA and fast ZipLoRA; both the
  subject and the style must be in the same image;
- orthogonal: two subjects trained with orthogonal adaptation, each alone and after summing, against two
  ordinary LoRAs summed the same way (the exact sum), gradient-fused (Mix-of-Show) and ZipLoRA-merged;
- composition: the subject and style LoRAs generated together in merge, switch and composite modes;
- b_lora: content-only, style-only and mixed B-LoRA transfers (needs the SDXL demo model).

    lora-studio eval --out eval-report            # the recorded table: bench/results/eval_sd15.md
    lora-studio eval --quick --out /tmp/eval      # a few images per row (what CI runs)

The table, a JSON file and a PNG grid of example images are written to --out.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from studio.core.model_paths import demo_model_name, demo_model_path
from studio.demo.adherence import chance_levels
from studio.demo.classifiers import Judges, load_judges
from studio.demo.concepts import STYLE, SUBJECT, SUBJECT_2
from studio.demo.world import BACKGROUNDS, Sample, World, world_for

ROWS = ("base", "dreambooth", "style", "merge", "orthogonal", "composition", "b_lora")
# the 128 px world also merges four subjects and asks for two subjects side by side
ROWS_128 = ROWS + ("orthogonal4", "regional")


def world_rows(image_size: int) -> tuple[str, ...]:
    """Every section `lora-studio eval` has for the world drawn at `image_size` pixels."""
    return ROWS_128 if image_size == 128 else ROWS


@dataclass
class EvalPlan:
    """What to run; defaults make the recorded table, `quick()` the CI version."""

    out: Path
    family: str = "sd15"
    image_size: int = 64  # the demo world: 64 (the built-in models) or 128 (the larger world's models)
    model: str | None = None  # another base model folder (default: the family's demo model)
    images: int = 24  # generated images per measurement
    seed: int = 5000  # prompts and noise come from seeds the base model never trained on
    lora_steps: int = 300
    lora_rank: int = 8
    lora_lr: float = 1e-3
    train_images: int = 8  # DreamBooth instance images
    style_images: int = 32  # style LoRAs need more images than a subject to carry the style to new prompts
    style_steps: int = 600
    style_caption_dropout: float = 0.1  # the style presets' value (bench/results/style_drift.md)
    # orthogonal LoRAs train only their up-projections: twice the steps (bench/results/orthogonal_probe.md)
    ortho_steps: int = 600
    batch_size: int = 4
    class_images: int = 16
    steps: int = 20  # denoising steps per image
    guidance: float = 7.5
    ziplora_steps: int = 100
    fusion_variants: Sequence[dict] = ()  # fusion measured again with these merge options (fusion_ridge: ...)
    rows: Sequence[str] | None = None  # default: every row of the world (ROWS, ROWS_128)

    def __post_init__(self) -> None:
        world_for(self.image_size)  # a clear error for a size without a world
        if self.rows is None:
            self.rows = world_rows(self.image_size)

    @property
    def world(self) -> World:
        """The world the plan measures in (its scenes, LoRA sets and judges)."""
        return world_for(self.image_size)

    @property
    def singles(self) -> World:
        """The world without its two-shape scenes: prompts whose every attribute one judge can read."""
        return self.world.singles()

    @classmethod
    def quick(cls, out: Path, **overrides) -> EvalPlan:
        """A few images per row: the short version CI runs (same training, fewer measurements)."""
        return cls(out=out, **({"images": 8, "class_images": 8} | overrides))


@dataclass
class Row:
    """One measured line of the table; metrics are shares of judged images in [0, 1]."""

    section: str
    case: str
    metrics: dict[str, float]
    images: list[Image.Image] = field(default_factory=list, repr=False)
    note: str = ""


# ------------------------------------------------------------------------------------------------ prompts
def _backgrounds(plan: EvalPlan, avoid: Sequence[str]) -> list[str]:
    """One background per image, cycling through the palette minus `avoid` (the subject's own colour)."""
    options = [b for b in BACKGROUNDS if b not in avoid]
    return [options[(plan.seed + i) % len(options)] for i in range(plan.images)]


def subject_prompts(plan: EvalPlan, subject: dict, style: str | None = None) -> tuple[list[str], list[str]]:
    """(prompts, backgrounds): "a sks shape on a blue background[, framed style]"."""
    backgrounds = _backgrounds(plan, (subject["colour"],))
    suffix = f", {style} style" if style else ""
    prompts = [f"a {subject['token']} shape on a {bg} background{suffix}" for bg in backgrounds]
    return prompts, backgrounds


def world_prompts(plan: EvalPlan, style: str | None = None) -> tuple[list[str], list]:
    """Canonical captions of one-shape base-world specs (optionally with a style word) and the specs."""
    specs = plan.singles.sample(plan.seed, plan.images, "base")
    suffix = f", {style} style" if style else ""
    return [plan.world.caption(s).split(",")[0] + suffix for s in specs], specs


def subject_style_metrics(
    verdict: dict[str, list[str]], subject: dict, style: str | None
) -> dict[str, float]:
    """Share of images showing the subject's shape; with `style`, also the style, and both at once."""
    subject_hit = [v == subject["shape"] for v in verdict["shape"]]
    metrics = {"subject": sum(subject_hit) / len(subject_hit)}
    if style:
        style_hit = [v == style for v in verdict["style"]]
        metrics["style"] = sum(style_hit) / len(style_hit)
        metrics["both"] = sum(a and b for a, b in zip(subject_hit, style_hit)) / len(style_hit)
    return metrics


# ------------------------------------------------------------------------------------------------ running
class Evaluator:
    """Runs the rows of a plan on one demo model; LoRAs are trained into plan.out/work."""

    def __init__(self, plan: EvalPlan, log: Callable[[str], None] = print) -> None:
        from studio.generation import GenerationService

        self.plan = plan
        self.log = log
        self.world = plan.world
        self.model = plan.model or str(demo_model_path(demo_model_name(plan.family, plan.image_size)))
        self.work = plan.out / "work"
        self.work.mkdir(parents=True, exist_ok=True)
        self.judges: Judges = load_judges(image_size=plan.image_size)
        self.service = GenerationService()
        self.loras: dict[str, Path] = {}

    # ---------------------------------------------------------------- primitives
    def generate(
        self, prompts: Sequence[str], loras: Sequence[tuple[Path, float]] = (), per_image=(), **extra
    ) -> list:
        """One image per prompt through the product's generation path, seeds plan.seed + i; `per_image`
        holds options of each image (its regions), `extra` those of all."""
        from studio.core.options import build_config
        from studio.generation import GenerateConfig, LoraSpec

        images = []
        for i, prompt in enumerate(prompts):
            cfg = build_config(
                GenerateConfig,
                {
                    "prompt": prompt,
                    "model": self.model,
                    "loras": [LoraSpec(Path(path), *rest) for path, *rest in loras],  # weight[, blocks]
                    "seed": self.plan.seed + i,
                    "steps": self.plan.steps,
                    "cfg": self.plan.guidance,
                    "width": self.plan.image_size,
                    "height": self.plan.image_size,
                    "device": "cpu",
                    "dtype": "fp32",
                    "fuse": "off",
                }
                | extra
                | (per_image[i] if per_image else {}),
            )
            images.extend(r.image for r in self.service.generate(cfg, save=False))
        return images

    def judge(self, images: Sequence[Image.Image]) -> dict[str, list[str]]:
        return {name: pred.labels for name, pred in self.judges.judge(images).items()}

    def write_set(self, name: str, samples: Sequence[Sample]) -> Path:
        """A training folder: PNG + caption .txt per sample."""
        folder = self.work / "data" / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, sample in enumerate(samples):
            sample.image.save(folder / f"{i:03d}.png")
            (folder / f"{i:03d}.txt").write_text(sample.caption)
        return folder

    def train(self, name: str, method: str, data: Path, **options) -> Path:
        """Train a LoRA with the studio's trainer (cached in work/ across rows)."""
        if name in self.loras:
            return self.loras[name]
        from studio.core.options import build_config
        from trainers.config import TrainConfig
        from trainers.loop import train

        p = self.plan
        values = {
            "method": method,
            "model": self.model,
            "data_dir": str(data),
            "output_dir": str(self.work / "loras"),
            "output_name": name,
            "overwrite": True,
            "save_dtype": "fp32",
            "resolution": p.image_size,
            "bucket_step": 64,
            "min_bucket_reso": 64,
            "max_bucket_reso": p.image_size,
            "rank": p.lora_rank,
            "alpha": p.lora_rank,
            "learning_rate": p.lora_lr,
            "max_steps": p.lora_steps,
            "batch_size": p.batch_size,
            "lr_scheduler": "constant",
            "device": "cpu",
            "mixed_precision": "no",
            "seed": 0,
            "progress_bar": False,
        } | options
        started = time.time()
        result = train(build_config(TrainConfig, values))
        self.log(f"  trained {name} ({method}, {values['max_steps']} steps) in {time.time() - started:.0f} s")
        self.loras[name] = result.path
        return result.path

    def merge(self, name: str, method: str, sources: Sequence[str], **options) -> Path:
        from merging import MergeConfig, run_merge
        from studio.core.options import build_config

        out = self.work / "loras" / f"{name}.safetensors"
        values = {"sources": list(sources), "method": method, "out": str(out), "overwrite": True} | options
        started = time.time()
        run_merge(build_config(MergeConfig, values))
        self.log(f"  merged {name} ({method}) in {time.time() - started:.0f} s")
        return out

    # ---------------------------------------------------------------- LoRAs used by several rows
    def subject_lora(
        self, subject: dict = SUBJECT, prior: bool = False, method: str = "dreambooth", tag: str = "",
        beside: float = 0.0, **kw,
    ) -> Path:  # fmt: skip
        """The subject's DreamBooth (or orthogonal) LoRA; `tag` names a variant trained with other `kw`;
        `beside`: the share of its images showing it beside another shape (World.dreambooth_set)."""
        samples = self.world.dreambooth_set(
            n=self.plan.train_images, shape=subject["shape"], colour=subject["colour"], token=subject["token"],
            beside=beside,
        )  # fmt: skip
        variant = "_beside" if beside else ""
        data = self.write_set(f"subject_{subject['shape']}{variant}", samples)
        options = {"prompt": f"a {subject['token']} shape", "use_captions": True} | kw
        if prior:
            options |= {
                "prior_preservation": True,
                "class_prompt": "a shape on a blue background",
                "class_data_dir": str(self.work / "data" / "class"),
                "num_class_images": self.plan.class_images,
                "class_generation_steps": self.plan.steps,
            }
        name = f"{method}_{subject['shape']}" + ("_prior" if prior else "") + variant + tag
        return self.train(name, method, data, **options)

    def style_lora(self, tag: str = "", **kw) -> Path:
        """The style's LoRA; `tag` names a variant trained with other `kw`."""
        data = self.write_set(f"style_{STYLE}", self.world.style_set(STYLE, n=self.plan.style_images))
        options = {
            "max_steps": self.plan.style_steps,
            "caption_dropout_rate": self.plan.style_caption_dropout,
        }
        return self.train(f"style_{STYLE}{tag}", "style", data, **(options | kw))

    # ---------------------------------------------------------------- measurements
    def subject_row(
        self, section: str, case: str, loras, subject: dict = SUBJECT, style: str | None = None, **extra
    ) -> Row:
        """Subject fidelity (judged shape is the subject's) and kept background; with `style`, the style too.
        `extra` are generation options (mode, tau)."""
        prompts, backgrounds = subject_prompts(self.plan, subject, style)
        images = self.generate(prompts, loras, **extra)
        verdict = self.judge(images)
        metrics = subject_style_metrics(verdict, subject, style)
        metrics["background"] = sum(b == bg for b, bg in zip(verdict["background"], backgrounds)) / len(
            images
        )
        return Row(section, case, metrics, images)

    def world_row(self, section: str, case: str, loras=(), style: str | None = None) -> Row:
        """Adherence to plain world prompts (content), and with `style` the share drawn in that style."""
        prompts, specs = world_prompts(self.plan, style)
        images = self.generate(prompts, loras)
        verdict = self.judge(images)
        n = len(images)
        hits = {
            a: [p == getattr(s, a) for p, s in zip(verdict[a], specs)]
            for a in ("shape", "colour", "background")
        }
        metrics = {a: sum(h) / n for a, h in hits.items()}
        metrics["all"] = sum(all(t) for t in zip(*hits.values())) / n
        if style:
            metrics["style"] = sum(s == style for s in verdict["style"]) / n
        return Row(section, case, metrics, images)

    # ---------------------------------------------------------------- rows
    def rows_base(self) -> list[Row]:
        row = self.world_row("base", "base model, world prompts")
        specs = world_prompts(self.plan)[1]
        chance = chance_levels(specs)
        row.note = "chance: " + ", ".join(f"{a} {chance[a]:.2f}" for a in ("shape", "colour", "background"))
        real = self.judge([self.world.render(s) for s in specs])
        ceiling = sum(p == s.shape for p, s in zip(real["shape"], specs)) / len(specs)
        row.note += f"; judges on the real renders: shape {ceiling:.2f}"
        return [row]

    def rows_dreambooth(self) -> list[Row]:
        plain, prior = self.subject_lora(), self.subject_lora(prior=True)
        rows = [
            self.subject_row("dreambooth", "before training (base model)", []),
            self.subject_row("dreambooth", "after, no prior preservation", [(plain, 1.0)]),
            self.subject_row("dreambooth", "after, prior preservation", [(prior, 1.0)]),
            self.world_row("dreambooth", "world prompts, LoRA loaded (no prior)", [(plain, 1.0)]),
            self.world_row("dreambooth", "world prompts, LoRA loaded (prior)", [(prior, 1.0)]),
        ]
        return rows

    def rows_style(self) -> list[Row]:
        lora = self.style_lora()
        return [
            self.world_row("style", "before training (base model)", [], style=STYLE),
            self.world_row("style", "after training", [(lora, 1.0)], style=STYLE),
        ]

    def rows_merge(self) -> list[Row]:
        subject, style = self.subject_lora(), self.style_lora()
        sources = [f"{subject}:1.0", f"{style}:1.0"]
        prompts = [f"a {SUBJECT['token']} shape", f"a red circle on a blue background, {STYLE} style"]
        merged = {
            "exact sum (concat)": self.merge("merge_concat", "concat", sources),
            "SVD to rank 8": self.merge("merge_svd", "svd", sources, rank=self.plan.lora_rank),
            "ZipLoRA": self.merge(
                "merge_ziplora", "ziplora", sources, model=self.model, prompts=prompts,
                steps=self.plan.ziplora_steps, device="cpu",
            ),
            "ZipLoRA fast": self.merge(
                "merge_ziplora_fast", "ziplora-fast", sources, model=self.model, prompts=prompts, device="cpu"
            ),
        }  # fmt: skip
        rows = [self.subject_row("merge", "subject LoRA alone", [(subject, 1.0)], style=STYLE)]
        rows.append(self.subject_row("merge", "style LoRA alone", [(style, 1.0)], style=STYLE))
        for case, path in merged.items():
            rows.append(self.subject_row("merge", case, [(path, 1.0)], style=STYLE))
        return rows

    def rows_orthogonal(self) -> list[Row]:
        return self.concept_rows("orthogonal", (SUBJECT, SUBJECT_2))

    def concept_rows(self, section: str, subjects: Sequence[dict]) -> list[Row]:
        """Subjects each alone and after merging them all: orthogonal LoRAs summed, ordinary LoRAs summed
        (the exact sum), and the same ordinary LoRAs merged by gradient fusion and by ZipLoRA."""
        k = len(subjects)
        tag = "" if k == 2 else f"_of{k}"  # LoRA and merge names (two subjects keep their first names)
        rows: list[Row] = []
        files: dict[str, list[Path]] = {}
        ortho = {"ortho_num_concepts": k, "max_steps": self.plan.ortho_steps}
        for kind, method in (("orthogonal", "orthogonal"), ("ordinary", "dreambooth")):
            extra = [{"ortho_slice": i, "tag": tag} | ortho if kind == "orthogonal" else {} for i in range(k)]
            files[kind] = [self.subject_lora(s, method=method, **e) for s, e in zip(subjects, extra)]
            merged = self.merge(f"{kind}_sum{tag}", "orthogonal" if kind == "orthogonal" else "concat",
                                [f"{f}:1.0" for f in files[kind]])  # fmt: skip
            for subject, alone in zip(subjects, files[kind]):
                rows.append(self.subject_row(section, f"{kind}: {subject['shape']} alone", [(alone, 1.0)],
                                             subject))  # fmt: skip
                rows.append(self.subject_row(section, f"{kind}: {subject['shape']} after sum",
                                             [(merged, 1.0)], subject))  # fmt: skip
        sources = [f"{f}:1.0" for f in files["ordinary"]]
        prompts = [f"a {s['token']} shape" for s in subjects]
        # fusion records each concept on its training images (bench/results/fusion_probe.md)
        data = [str(self.work / "data" / f"subject_{s['shape']}") for s in subjects]
        merges = [("fusion", "fusion", "", {"references": data})]
        for options in self.plan.fusion_variants:
            label = ", ".join(f"{k.removeprefix('fusion_')} {v:g}" if isinstance(v, float) else str(v)
                              for k, v in options.items())  # fmt: skip
            suffix = "_" + "".join(c if c.isalnum() else "_" for c in label)
            merges.append((f"fusion ({label})", "fusion", suffix, {"references": data} | options))
        merges.append(("ZipLoRA", "ziplora", "", {"steps": self.plan.ziplora_steps}))
        for kind, method, variant, options in merges:
            merged = self.merge(f"subjects_{method}{variant}{tag}", method, sources, model=self.model,
                                prompts=prompts, device="cpu", **options)  # fmt: skip
            for subject in subjects:
                rows.append(self.subject_row(section, f"{kind}: {subject['shape']} after merge",
                                             [(merged, 1.0)], subject))  # fmt: skip
        return rows

    def rows_b_lora(self) -> list[Row]:
        """B-LoRA on the SDXL demo model: one image of the subject, one image in the style, then content
        alone, style alone and content of one with style of the other (the paper's transfers)."""
        if self.plan.family != "sdxl":
            return [Row("b_lora", "content / style / mixed transfer", {}, note="run with --family sdxl")]
        return self.b_lora_rows(*self.b_lora_pair())

    def b_lora_pair(
        self, tag: str = "", images: int = 1, method: str = "b_lora", **options
    ) -> tuple[str, str]:
        """(content file, style file): B-LoRAs trained on `images` pictures of the subject ("a sks") and in
        the style ("a zwx"), their content and style halves; with another `method`, its whole LoRAs."""
        subjects = self.world.dreambooth_set(n=images, shape=SUBJECT["shape"], colour=SUBJECT["colour"])
        styled = [self.world.render(s.spec) for s in self.world.style_set(STYLE, n=images)]
        files = {}
        for half, pictures, token in (
            ("content", [s.image for s in subjects], "sks"),
            ("style", styled, "zwx"),
        ):
            name = f"b_lora{tag}_{half}"
            data = self.write_set(name, [Sample(image, f"a {token}", None) for image in pictures])
            self.train(name, method, data, prompt=f"a {token}", use_captions=False, split=True, **options)
            files[half] = self.work / "loras" / name
        if method != "b_lora":
            return f"{files['content']}.safetensors", f"{files['style']}.safetensors"
        return f"{files['content']}_content.safetensors", f"{files['style']}_style.safetensors"

    def b_lora_rows(
        self, content: str, style: str, weight: float = 1.0, stacked: bool = False, blocks: dict | None = None
    ) -> list[Row]:
        """Content alone, style alone, and both: the halves at `weight` (`stacked`: as a plain LoRA stack,
        each half with its `blocks` weights, {"content": {block id: weight}, ...})."""
        backgrounds = _backgrounds(self.plan, (SUBJECT["colour"],))
        specs = self.plan.singles.sample(self.plan.seed, self.plan.images, "base")
        subject_prompts = [f"a sks shape on a {bg} background" for bg in backgrounds]
        cases = {
            "content only (sks)": (subject_prompts, {"content": content}),
            "style only (zwx)": ([self.world.caption(s).split(",")[0] + ", zwx style" for s in specs], {"style": style}),
            "content sks + style zwx": ([p + ", zwx style" for p in subject_prompts], {"content": content, "style": style}),
        }  # fmt: skip
        rows = []
        for case, (prompts, halves) in cases.items():
            if stacked:
                stack = [(Path(f), weight, (blocks or {}).get(half)) for half, f in halves.items()]
                images = self.generate(prompts, stack)
            else:
                images = self.generate(
                    prompts, (), **{f"b_lora_{k}": f"{f}:{weight}" for k, f in halves.items()}
                )
            rows.append(
                Row("b_lora", case, subject_style_metrics(self.judge(images), SUBJECT, STYLE), images)
            )
        return rows

    def run(self, done: Callable[[list[Row]], None] = lambda rows: None) -> list[Row]:
        """Every section of the plan; `done` gets the rows so far after each section."""
        rows: list[Row] = []
        for name in self.plan.rows:
            self.log(f"{name} ...")
            started = time.time()
            rows.extend(getattr(self, f"rows_{name}")())
            self.log(f"{name}: {time.time() - started:.0f} s")
            done(rows)
        return rows
