"""What every bench record shares: the machine's CPU name and the hand-written notes kept across reruns."""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

NOTES = "## Notes (written by hand)"  # a results file's section that a rerun keeps as it was


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what platform knows."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "unknown CPU"


def previous_notes(path: Path, end_marker: str | None = None) -> str:
    """The hand-written notes section of the file at `path` (up to `end_marker`), or ''."""
    text = path.read_text() if path.exists() else ""
    if NOTES not in text:
        return ""
    notes = text[text.index(NOTES) :]
    if end_marker and end_marker in notes:
        notes = notes[: notes.index(end_marker)]
    return notes.rstrip() + "\n"


def variant_args(doc: str, variants: list[str], results: Path, argv: list[str] | None, sep: str, more=None):
    """The command line of a bench that trains one variant per line: --out, --images, --variants (names
    joined by `sep`), --threads, --seed, --results and --append (keep recorded lines of variants not run now);
    `more(parser)` adds the bench's own options."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if more:
        more(parser)
    parser.add_argument("--out", type=Path, required=True, help="work folder (LoRAs, data)")
    parser.add_argument("--images", type=int, default=24, help="judged images per line")
    parser.add_argument("--variants", default=sep.join(variants), help=f"names separated by {sep!r}")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=5000, help="first prompt / noise seed (the eval's: 5000)")
    parser.add_argument("--results", type=Path, default=results)
    parser.add_argument("--append", action="store_true", help="keep recorded variants not run this time")
    args = parser.parse_args(argv)
    args.names = args.variants.split(sep)
    return args


def with_kept_variants(args, record: list[dict]) -> tuple[list[dict], list[str]]:
    """With --append, the recorded lines of variants not run now, ahead of this run's: (record, names)."""
    names = list(args.names)
    json_path = args.results.with_suffix(".json")
    if args.append and json_path.is_file():
        kept = [r for r in json.loads(json_path.read_text()) if r["variant"] not in names]
        names = list(dict.fromkeys(r["variant"] for r in kept)) + names
        record = kept + record
    return record, names


def write_variant_results(args, lines: list[str], record: list[dict]) -> None:
    """The table (hand-written notes kept below it) and its JSON record, next to each other."""
    if notes := previous_notes(args.results):
        lines = [*lines, "", notes.rstrip()]
    args.results.write_text("\n".join(lines) + "\n")
    args.results.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.results}")


def command_flags(args, variants: list[str], default_results: Path, root: Path) -> str:
    """A variant bench's options as typed for its record (the ones left at their default left out)."""
    flags = [f"--out {args.out}", f"--images {args.images}", f"--threads {args.threads}"]
    flags += [f"--seed {args.seed}"] * (args.seed != 5000) + ["--append"] * args.append
    if args.names != list(variants):
        flags.append(f'--variants "{"|".join(args.names)}"')
    if args.results != default_results:
        shown = args.results.relative_to(root) if args.results.is_relative_to(root) else args.results
        flags.append(f"--results {shown}")
    return " ".join(flags)


def run_variants(args, run) -> tuple[list[dict], list[str], float]:
    """`run(name)` -> record lines, for each variant asked for (each printed as it ends); then the recorded
    lines kept with --append: (record, names, minutes this run took)."""
    import time

    record, started = [], time.time()
    for name in args.names:
        lines = run(name)
        print(lines, flush=True)
        record += lines
    minutes = (time.time() - started) / 60
    return *with_kept_variants(args, record), minutes


def record_head(title: str, script: str, flags: str, about: str) -> list[str]:
    """A bench record's first lines: its title, the command that made it, the machine and date, `about`."""
    import os
    import time

    import torch

    return [
        f"# {title}",
        "",
        f"Command: `python bench/{script} {flags}`  ",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
        f"; {about}",
        "",
    ]


def reuse_trained_loras(ev) -> None:
    """Let an Evaluator reuse the LoRAs an earlier run trained into its work folder (a trained LoRA has its
    config beside it; merges, which have none, are made again)."""
    for config in sorted((ev.work / "loras").glob("*.config.json")):
        lora = config.with_name(config.name.removesuffix(".config.json") + ".safetensors")
        if lora.is_file():
            ev.loras.setdefault(lora.stem, lora)


def metric_table(record: list[dict], names: list[str], metrics: tuple[str, ...]) -> list[str]:
    """A table of one line per variant (its record entry) and one column per metric (shares, two decimals)."""
    lines = ["| variant | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for name in names:
        cells = next(r for r in record if r["variant"] == name)
        lines.append(f"| {name} | " + " | ".join(f"{cells[m]:.2f}" for m in metrics) + " |")
    return lines


def subject_and_style(
    ev, learn_words: bool, style_reg: str = "", subject_prior: bool = False
) -> tuple[Path, Path]:
    """The eval's subject and style LoRAs; with `learn_words`, the ones that also learnt their trigger words
    ("sks", "framed") as token embeddings (token_lr: the default); with `style_reg` "reg", a style LoRA
    trained with a regularisation set (`regularisation_set`), with "contrast" one trained with its own
    scenes unframed (`contrast_set`), so that it learns the style where its word is said; with
    `subject_prior`, a subject LoRA trained with prior preservation."""
    from studio.demo.concepts import STYLE, SUBJECT

    words = {"tag": "_token_words", "token_words": [SUBJECT["token"]]} if learn_words else {}
    subject = ev.subject_lora(prior=subject_prior, **words)
    style_kw = {"token_words": [STYLE]} if learn_words else {}
    tag = "_token_words" * learn_words
    if style_reg:
        sets = {"reg": regularisation_set, "contrast": contrast_set}
        style_kw["reg_data_dir"] = str(sets[style_reg](ev))
        tag += f"_{style_reg}"
    return subject, ev.style_lora(tag=tag, **style_kw)


REG_SEED = 4242  # world scenes other than the style set's; the eval's prompts come from seed 5000


def regularisation_set(ev) -> Path:
    """Plain world scenes with their captions, as many as the style set has (none in a held-out style)."""
    return ev.write_set("reg_world", ev.world.scene_set(ev.plan.style_images, seed=REG_SEED))


def contrast_set(ev) -> Path:
    """The style set's own scenes drawn flat, captioned without the style: pictures that differ from the
    style set's in the style alone."""
    from dataclasses import replace

    from studio.demo.concepts import STYLE

    styled = ev.world.style_set(STYLE, n=ev.plan.style_images)
    plain = ev.world.render_samples([replace(sample.spec, style="flat") for sample in styled])
    return ev.write_set(f"contrast_{STYLE}", plain)
