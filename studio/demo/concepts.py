"""The held-out concepts of the demo world that LoRAs learn: subjects (a shape in one colour) and a style.

The demo models never saw them in training; `lora-studio eval` and the page's demo datasets use them.
"""

from __future__ import annotations

SUBJECT = {"shape": "heart", "colour": "red", "token": "sks"}
SUBJECT_2 = {"shape": "moon", "colour": "yellow", "token": "zwx"}
# The 128 px world holds out two more subjects, so that four concepts can be merged and measured.
SUBJECT_3 = {"shape": "arrow", "colour": "blue", "token": "ohwx"}
SUBJECT_4 = {"shape": "bolt", "colour": "green", "token": "bnha"}
SUBJECTS_4 = (SUBJECT, SUBJECT_2, SUBJECT_3, SUBJECT_4)
# A held-out style LoRAs can learn here; the striped / dotted / pixel textures stay out of their reach at 8x8
# latents (measured: bench/results/eval_sd15.md notes).
STYLE = "framed"
# A background LoRA (ComposLoRA's fourth kind of element): "on a gold background" drawn blue. The frame is
# drawn in the subject's red; on orange it came out partial and faint, and was judged in a third of the
# merged pictures (bench/results/composition_probe_blue.md: all three 0.38 on orange, 1.00 on blue).
BACKGROUND = {"word": "gold", "colour": "blue"}
