"""The rows of `lora-studio eval` with several concepts in one picture.

- composition: K = 2 (a subject and a style) in merge, switch and composite modes; in the 128 px world also
  K = 3 in one shape (and a background LoRA), and side by side: K = 3 (two subjects asked left and right,
  and the style) and K = 4 (and the background LoRA);
- orthogonal4: four subjects merged (the 128 px world), as the two-subject "orthogonal" rows;
- regional: two subjects asked left and right, with a region (and its LoRA) per side against the same prompt
  with both LoRAs loaded.

Two-shape scenes are judged side by side: each side's crop by the shape judge (World.pair_halves), the whole
picture by the style and background judges.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path

from studio.app.evaluate import Evaluator, Row, _backgrounds
from studio.demo.concepts import BACKGROUND, STYLE, SUBJECT, SUBJECT_2, SUBJECTS_4
from studio.demo.world import Pair, Sample

MODES = (("mode merge", {"mode": "merge"}), ("mode switch (tau 2)", {"mode": "switch", "tau": 2}),
         ("mode composite", {"mode": "composite"}))  # fmt: skip
# Where the regions go: each side's half, or each side's middle square (the crop the judges read,
# World.pair_halves, where a two-shape scene draws its shapes); (label, (left box, right box), mode)
HALVES, SQUARES = ("0,0,0.5,1", "0.5,0,1,1"), ("0,0.25,0.5,0.75", "0.5,0.25,1,0.75")
LAYOUTS = (("mask", HALVES, "mask"), ("area", HALVES, "area"), ("mask, square boxes", SQUARES, "mask"),
           ("area, square boxes", SQUARES, "area"))  # fmt: skip
BESIDE = 0.5  # the share of a "shown beside others" subject set with the subject beside another shape
# The subject LoRAs of the regional rows: (who, share shown beside others, also trained at half the size,
# training steps as a multiple of the plan's lora_steps)
SUBJECT_SETS = (("two subjects", 0.0, False, 1), ("two subjects shown beside others", BESIDE, False, 1),
                ("two subjects trained at two sizes", 0.0, True, 1),
                ("two subjects shown beside others, trained at two sizes", BESIDE, True, 1),
                ("two subjects trained at two sizes, twice the steps", 0.0, True, 2))  # fmt: skip


class WorldEvaluator(Evaluator):
    """Every row of the demo world (studio/app/evaluate.py) and the several-concept ones."""

    # ---------------------------------------------------------------- LoRAs
    def background_lora(
        self, word: str = BACKGROUND["word"], tag: str = "", colour: str = BACKGROUND["colour"], **kw
    ) -> Path:
        """A background LoRA: plain scenes on one colour (blue, or `colour`), captioned "on a gold
        background" (or `word`); `tag` names a variant trained with other `kw`."""
        rng = random.Random("background:0")
        world = self.plan.singles
        colours = tuple(c for c in world.colours if c != colour)
        specs = [world.random_spec(rng, world.base_shapes, world.base_styles, colours, (colour,))
                 for _ in range(self.plan.style_images)]  # fmt: skip
        said = f"on a {word} background"
        samples = [Sample(world.render(s), world.caption(s).replace(f"on a {s.background} background", said), s)
                   for s in specs]  # fmt: skip
        name = f"background_{word}_{colour}"
        data = self.write_set(name, samples)
        options = {
            "max_steps": self.plan.style_steps,
            "caption_dropout_rate": self.plan.style_caption_dropout,
        }
        return self.train(f"{name}{tag}", "style", data, **(options | kw))

    # ---------------------------------------------------------------- two subjects side by side
    def pair_prompts(
        self, left: dict, right: dict, style: str | None = None, background: bool = False
    ) -> tuple[list[str], list[str]]:
        """(prompts, expected backgrounds): "a sks shape on the left and a zwx shape on the right, on a blue
        background[, framed style]"; with `background`, on the background LoRA's word."""
        asked = _backgrounds(self.plan, (left["colour"], right["colour"]))
        expected = [BACKGROUND["colour"]] * len(asked) if background else asked
        words = [BACKGROUND["word"]] * len(asked) if background else asked
        suffix = f", {style} style" if style else ""
        prompts = [f"a {left['token']} shape on the left and a {right['token']} shape on the right, on a {w} "
                   f"background{suffix}" for w in words]  # fmt: skip
        return prompts, expected

    def pair_row(self, section: str, case: str, loras, left: dict, right: dict, style=None, background=False,
                 per_image=(), **extra) -> Row:  # fmt: skip
        """Each subject on its side ("left", "right"), the style and background over the whole picture;
        "both" = every element asked for in the same image."""
        prompts, expected = self.pair_prompts(left, right, style, background)
        images = self.generate(prompts, loras, per_image=per_image, **extra)
        hits = self.sides(images, [left["shape"]] * len(images), [right["shape"]] * len(images))
        whole = self.judge(images)
        if style:
            hits["style"] = [v == style for v in whole["style"]]
        hits["background"] = [v == bg for v, bg in zip(whole["background"], expected)]
        required = [name for name in hits if name != "background" or background]
        return Row(section, case, shares(hits, required), images)

    def sides(self, images, left: Sequence[str], right: Sequence[str]) -> dict[str, list[bool]]:
        """Whether each image's left and right crops show the shapes asked for on that side."""
        halves = [self.world.pair_halves(im) for im in images]
        return {
            "left": [v == want for v, want in zip(self.judge([h[0] for h in halves])["shape"], left)],
            "right": [v == want for v, want in zip(self.judge([h[1] for h in halves])["shape"], right)],
        }

    # ---------------------------------------------------------------- rows
    def base_pairs(self) -> list[Pair]:
        """The base row's two-shape scenes (held-out seeds): what the base model is asked to draw."""
        scenes = self.world.sample(self.plan.seed, 8 * self.plan.images, "base")
        return [s for s in scenes if isinstance(s, Pair)][: self.plan.images]

    def base_pair_row(self, section: str, case: str, per_image=(), **extra) -> Row:
        """The base model on two-shape prompts, each side judged on its crop (the judges' reading of the
        real renders' sides in the note)."""
        pairs = self.base_pairs()
        left, right = [p.left.shape for p in pairs], [p.right.shape for p in pairs]
        images = self.generate([self.world.caption(p) for p in pairs], per_image=per_image, **extra)
        hits = self.sides(images, left, right)
        return Row(section, case, shares(hits, hits), images, self.real_sides_note)

    @cached_property
    def real_sides_note(self) -> str:
        """How the judges read the sides of the base pairs' real renders (a two-shape row's ceiling)."""
        pairs = self.base_pairs()
        real = self.sides([self.world.render(p) for p in pairs], [p.left.shape for p in pairs],
                          [p.right.shape for p in pairs])  # fmt: skip
        return "judges on the real renders' sides: " + ", ".join(
            f"{k} {sum(v) / len(pairs):.2f}" for k, v in real.items()
        )

    def rows_base(self) -> list[Row]:
        """The base model on one-shape prompts; in the 128 px world also on two-shape prompts."""
        rows = super().rows_base()
        if self.plan.world.pair_share == 0:
            return rows
        return rows + [self.base_pair_row("base", "base model, two-shape prompts")]

    def rows_composition(self) -> list[Row]:
        """K LoRAs in one picture, merged, switched and composited: K = 2 a subject and a style; in the
        128 px world also K = 3 in one shape (and a background LoRA), and side by side (two subjects asked
        left and right, and the style) K = 3 and K = 4 (and the background LoRA)."""
        subject, style = self.subject_lora(), self.style_lora()
        rows = [self.subject_row("composition", f"K=2: {case}", [(subject, 1.0), (style, 1.0)], style=STYLE,
                                 **mode) for case, mode in MODES]  # fmt: skip
        if self.plan.world.pair_share == 0:
            return rows
        background = self.background_lora()
        three = [(subject, 1.0), (style, 1.0), (background, 1.0)]
        rows += [self.scene_row(f"K=3: {case}", three, **mode) for case, mode in MODES]
        second = self.subject_lora(SUBJECT_2)
        pair = [(subject, 1.0), (second, 1.0), (style, 1.0)]
        for k, loras, with_background in ((3, pair, False), (4, pair + [(background, 1.0)], True)):
            for case, mode in MODES:
                rows.append(self.pair_row("composition", f"K={k}, side by side: {case}", loras, SUBJECT,
                                          SUBJECT_2, STYLE, with_background, **mode))  # fmt: skip
        return rows

    def scene_row(
        self,
        case: str,
        loras,
        background: str = BACKGROUND["word"],
        colour: str = BACKGROUND["colour"],
        **extra,
    ) -> Row:
        """One shape: the subject, in the style, on the background LoRA's word (drawn `colour`); "both" = all
        three."""
        word = f"on a {background} background"
        images = self.generate([f"a {SUBJECT['token']} shape {word}, {STYLE} style"] * self.plan.images,
                               loras, **extra)  # fmt: skip
        verdict = self.judge(images)
        hits = {
            "subject": [v == SUBJECT["shape"] for v in verdict["shape"]],
            "style": [v == STYLE for v in verdict["style"]],
            "background": [v == colour for v in verdict["background"]],
        }
        return Row("composition", case, shares(hits, hits), images)

    def rows_orthogonal4(self) -> list[Row]:
        return self.concept_rows("orthogonal4", SUBJECTS_4)

    def rows_regional(self) -> list[Row]:
        """Two subjects asked left and right: a region per side with its LoRA and prompt (the rest follows
        the global prompt, no LoRA), each region seeing the whole picture (mask) or its box alone (area),
        against the same prompt with both LoRAs loaded; once with the subjects' LoRAs trained on the subject
        alone, once on sets where half the images show it beside another shape, and each of these also
        trained at half the image size (extra_resolutions: a region's box is that small); the subject-alone
        set at two sizes also for twice the steps (bench/results/regional_probe.md: at 300 steps the moon
        seldom holds in a region's box). Then the base
        model's own shapes with a region per side against its two-shape row (whether the regions place what
        the model can draw)."""
        rows = []
        for who, beside, sizes, times in SUBJECT_SETS:
            extra = {"tag": "_sizes", "extra_resolutions": [self.plan.image_size // 2]} if sizes else {}
            if times != 1:
                extra |= {
                    "tag": extra.get("tag", "") + f"_x{times}",
                    "max_steps": times * self.plan.lora_steps,
                }
            left, right = (
                self.subject_lora(SUBJECT, beside=beside, **extra),
                self.subject_lora(SUBJECT_2, beside=beside, **extra),
            )
            rows += self.subject_pair_rows(who, left, right)
        pairs = self.base_pairs()
        for label, boxes, mode in LAYOUTS:
            per_image = [{"regions": [f"{boxes[0]}:{self.world.caption(p.left)}",
                                      f"{boxes[1]}:{self.world.caption(p.right)}"]} for p in pairs]  # fmt: skip
            case = f"base model, two-shape prompts, a region per side ({label})"
            rows.append(self.base_pair_row("regional", case, per_image=per_image, region_mode=mode))
        return rows

    def subject_pair_rows(self, who: str, left: Path, right: Path, layouts=LAYOUTS) -> list[Row]:
        """The two subjects' LoRAs asked left and right: both loaded without regions, then a region and LoRA
        per side in each of `layouts` ((label, boxes, mode) as LAYOUTS)."""
        _, backgrounds = self.pair_prompts(SUBJECT, SUBJECT_2)
        loras = [(left, 1.0), (right, 1.0)]
        rows = [self.pair_row("regional", f"{who}, no regions (both LoRAs)", loras, SUBJECT, SUBJECT_2)]
        for label, boxes, mode in layouts:
            per_image = [{"regions": [f"{boxes[0]}:a {SUBJECT['token']} shape on a {bg} background:{left}:1.0",
                                      f"{boxes[1]}:a {SUBJECT_2['token']} shape on a {bg} background:{right}:1.0"]}
                         for bg in backgrounds]  # fmt: skip
            rows.append(self.pair_row("regional", f"{who}, a region and LoRA per side ({label})", [],
                                      SUBJECT, SUBJECT_2, per_image=per_image, region_mode=mode))  # fmt: skip
        return rows


def shares(hits: dict[str, list[bool]], required: Iterable[str]) -> dict[str, float]:
    """Each judged element's share of the images, and "both": the share with every `required` one right."""
    n = len(next(iter(hits.values())))
    metrics = {name: sum(h) / n for name, h in hits.items()}
    metrics["both"] = sum(all(t) for t in zip(*(hits[name] for name in required))) / n
    return metrics


def concept_names(subjects: Sequence[dict] = SUBJECTS_4) -> str:
    """ "heart for sks, moon for zwx, ..." for the report's legend."""
    return ", ".join(f"{s['shape']} for {s['token']}" for s in subjects)
