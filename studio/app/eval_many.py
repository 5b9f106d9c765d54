"""The rows of `lora-studio eval` with several concepts in one picture.

- composition: K = 2 (a subject and a style) in merge, switch and composite modes; in the 128 px world also
  K = 3 (two subjects asked left and right, and the style) and K = 4 (and a background LoRA);
- orthogonal4: four subjects merged (the 128 px world), as the two-subject "orthogonal" rows;
- regional: two subjects asked left and right, with a region (and its LoRA) per side against the same prompt
  with both LoRAs loaded.

Two-shape scenes are judged side by side: each side's crop by the shape judge (World.pair_halves), the whole
picture by the style and background judges.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from studio.app.evaluate import Evaluator, Row, _backgrounds
from studio.demo.concepts import BACKGROUND, STYLE, SUBJECT, SUBJECT_2, SUBJECTS_4
from studio.demo.world import Pair, Sample

MODES = (("mode merge", {"mode": "merge"}), ("mode switch (tau 2)", {"mode": "switch", "tau": 2}),
         ("mode composite", {"mode": "composite"}))  # fmt: skip


class WorldEvaluator(Evaluator):
    """Every row of the demo world (studio/app/evaluate.py) and the several-concept ones."""

    # ---------------------------------------------------------------- LoRAs
    def background_lora(self) -> Path:
        """A background LoRA: plain scenes on one colour, captioned "on a gold background"."""
        rng = random.Random("background:0")
        world = self.plan.singles
        colours = tuple(c for c in world.colours if c != BACKGROUND["colour"])
        specs = [world.random_spec(rng, world.base_shapes, world.base_styles, colours, (BACKGROUND["colour"],))
                 for _ in range(self.plan.style_images)]  # fmt: skip
        word = f"on a {BACKGROUND['word']} background"
        samples = [Sample(world.render(s), world.caption(s).replace(f"on a {s.background} background", word), s)
                   for s in specs]  # fmt: skip
        data = self.write_set(f"background_{BACKGROUND['word']}", samples)
        return self.train(f"background_{BACKGROUND['word']}", "style", data, max_steps=self.plan.style_steps,
                          caption_dropout_rate=self.plan.style_caption_dropout)  # fmt: skip

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
        required = [h for name, h in hits.items() if name != "background" or background]
        metrics = {name: sum(h) / len(images) for name, h in hits.items()}
        metrics["both"] = sum(all(t) for t in zip(*required)) / len(images)
        return Row(section, case, metrics, images)

    def sides(self, images, left: Sequence[str], right: Sequence[str]) -> dict[str, list[bool]]:
        """Whether each image's left and right crops show the shapes asked for on that side."""
        halves = [self.world.pair_halves(im) for im in images]
        return {
            "left": [v == want for v, want in zip(self.judge([h[0] for h in halves])["shape"], left)],
            "right": [v == want for v, want in zip(self.judge([h[1] for h in halves])["shape"], right)],
        }

    # ---------------------------------------------------------------- rows
    def rows_base(self) -> list[Row]:
        """The base model on one-shape prompts; in the 128 px world also on two-shape prompts, each side
        judged on its crop (the judges' reading of the real renders' sides in the note)."""
        rows = super().rows_base()
        if self.plan.world.pair_share == 0:
            return rows
        scenes = self.world.sample(self.plan.seed, 8 * self.plan.images, "base")
        pairs = [s for s in scenes if isinstance(s, Pair)][: self.plan.images]
        left, right = [p.left.shape for p in pairs], [p.right.shape for p in pairs]
        images = self.generate([self.world.caption(p) for p in pairs])
        hits = self.sides(images, left, right)
        metrics = {name: sum(h) / len(pairs) for name, h in hits.items()}
        metrics["both"] = sum(a and b for a, b in zip(*hits.values())) / len(pairs)
        real = self.sides([self.world.render(p) for p in pairs], left, right)
        note = "judges on the real renders' sides: " + ", ".join(
            f"{k} {sum(v) / len(pairs):.2f}" for k, v in real.items()
        )
        return rows + [Row("base", "base model, two-shape prompts", metrics, images, note)]

    def rows_composition(self) -> list[Row]:
        """K LoRAs in one picture, merged, switched and composited (K = 3, 4 need the 128 px world's
        two-shape scenes)."""
        subject, style = self.subject_lora(), self.style_lora()
        rows = [self.subject_row("composition", f"K=2: {case}", [(subject, 1.0), (style, 1.0)], style=STYLE,
                                 **mode) for case, mode in MODES]  # fmt: skip
        if self.plan.world.pair_share == 0:
            return rows
        second = self.subject_lora(SUBJECT_2)
        three = [(subject, 1.0), (second, 1.0), (style, 1.0)]
        four = three + [(self.background_lora(), 1.0)]
        for k, loras, background in ((3, three, False), (4, four, True)):
            for case, mode in MODES:
                rows.append(self.pair_row("composition", f"K={k}: {case}", loras, SUBJECT, SUBJECT_2, STYLE,
                                          background, **mode))  # fmt: skip
        return rows

    def rows_orthogonal4(self) -> list[Row]:
        return self.concept_rows("orthogonal4", SUBJECTS_4)

    def rows_regional(self) -> list[Row]:
        """Two subjects asked left and right: a region per side with its LoRA and prompt (the rest follows
        the global prompt, no LoRA), each region seeing the whole picture (mask) or its box alone (area),
        against the same prompt with both LoRAs loaded."""
        left, right = self.subject_lora(SUBJECT), self.subject_lora(SUBJECT_2)
        prompts, backgrounds = self.pair_prompts(SUBJECT, SUBJECT_2)
        regions = [
            {"regions": [f"0,0,0.5,1:a {SUBJECT['token']} shape on a {bg} background:{left}:1.0",
                         f"0.5,0,1,1:a {SUBJECT_2['token']} shape on a {bg} background:{right}:1.0"]}
            for bg in backgrounds
        ]  # fmt: skip
        loras = [(left, 1.0), (right, 1.0)]
        rows = [self.pair_row("regional", "two subjects, no regions (both LoRAs)", loras, SUBJECT, SUBJECT_2)]
        for mode in ("mask", "area"):
            rows.append(self.pair_row("regional", f"two subjects, a region and LoRA per side ({mode})", [],
                                      SUBJECT, SUBJECT_2, per_image=regions, region_mode=mode))  # fmt: skip
        return rows


def concept_names(subjects: Sequence[dict] = SUBJECTS_4) -> str:
    """ "heart for sks, moon for zwx, ..." for the report's legend."""
    return ", ".join(f"{s['shape']} for {s['token']}" for s in subjects)
