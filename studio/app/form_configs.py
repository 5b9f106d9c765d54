"""What the page asks for, turned into checked configs over the workspace: training, merging, generation.

The page sends plain values (a dict of form fields); these functions build the typed config, check it,
and keep every path it will use inside the workspace (studio.app.confine), so a bad option is reported at
once, not minutes later in a job.

    >>> cfg = train_config(workspace, {"method": "style", "dataset": "art", "name": "art", ...})  # doctest: +SKIP
"""

from __future__ import annotations

import tomllib
from typing import Any

from studio.app.confine import confine
from studio.app.regions import regions_from_rows
from studio.app.workspace import Workspace
from studio.core.errors import ConfigError
from studio.core.model_paths import DEMO_MODELS as BUILT_IN
from studio.core.options import build_config, load_preset

DEMO_MODELS = tuple(f"demo:{name}" for name in BUILT_IN)  # demo:sd15, demo:sdxl and their 128 px twins
# What the page lets a job ask for (the command line has the config's own, wider bounds): a typo such as
# 1,000,000,000 steps is refused with the limit named, not queued.
PAGE_LIMITS = {"steps": (1, 100_000), "resolution": (64, 2048), "batch_size": (1, 64), "rank": (1, 256),
               "sample_every": (0, 100_000)}  # fmt: skip


def within_limits(values: dict[str, Any]) -> dict[str, int]:
    """The page's numeric fields as whole numbers inside PAGE_LIMITS, or a ConfigError naming the limit."""
    out = {}
    for name, (low, high) in PAGE_LIMITS.items():
        if values.get(name) in (None, ""):
            continue
        try:
            number = float(values[name])
        except (TypeError, ValueError):
            raise ConfigError(f"{name.replace('_', ' ')}: {values[name]!r} is not a number") from None
        if number != int(number) or not low <= number <= high:
            raise ConfigError(
                f"{name.replace('_', ' ')} must be a whole number from {low:,} to {high:,}; got {values[name]}"
            )
        out[name] = int(number)
    if "resolution" in out and out["resolution"] % 64:
        raise ConfigError(f"resolution must be a multiple of 64; got {out['resolution']}")
    return out


def model_choice(ws: Workspace, text: str) -> str:
    """'demo:sd15' / 'demo:sdxl' as they are; any other model path must lie inside the workspace."""
    text = (text or "").strip()
    if not text or text.startswith("demo:"):
        return text or "demo:sd15"
    return str(ws.resolve(text))


def parse_weights(text: str, count: int) -> list[float]:
    """'1, 0.8' -> [1.0, 0.8]; missing weights are 1.0."""
    parts = [p.strip() for p in (text or "").replace(";", ",").split(",") if p.strip()]
    if len(parts) > count:
        raise ConfigError(f"{len(parts)} weights for {count} LoRA(s): give one weight per selected LoRA")
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        raise ConfigError(f"weights {text!r}: write numbers separated by commas, e.g. 1, 0.8") from None
    return weights + [1.0] * (count - len(weights))


def more_options(text: str) -> dict[str, Any]:
    """The "more options" TOML of the Train and Merge tabs as a dict."""
    if not (text or "").strip():
        return {}
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"more options: not valid TOML ({exc}); write one key = value per line") from None


def train_config(ws: Workspace, values: dict[str, Any], allow_pickle: bool = False):
    """A checked TrainConfig from the Train tab's fields: a workspace dataset in, runs/<name>/ out."""
    from trainers.config import TrainConfig

    name = ws.check_name(values["name"], "LoRA name")
    data_dir = ws.dataset_folder(values["dataset"])
    numbers = within_limits(values)
    options = load_preset(values["preset"], "train") if values.get("preset") else {}
    options |= {
        "method": values["method"],
        "model": model_choice(ws, values["model"]),
        "data_dir": str(data_dir),
        "output_dir": str(ws.runs / name),
        "output_name": name,
        "prompt": values["prompt"],
        "max_steps": numbers["steps"],
        "rank": numbers["rank"],
        **({"network_type": values["network"]} if values.get("network") else {}),
        "learning_rate": float(values["learning_rate"]),
        "batch_size": numbers["batch_size"],
        "resolution": numbers["resolution"],
    }
    prompts = [p.strip() for p in str(values.get("sample_prompts") or "").splitlines() if p.strip()]
    if numbers.get("sample_every") and prompts:  # samples render as the job runs, shown in the job's view
        options |= {"sample_every": numbers["sample_every"], "sample_prompts": prompts, "sample_steps": 20}
    if numbers["resolution"] < 256:  # the demo models' 64 px images need buckets that small
        options |= {"min_bucket_reso": 64, "max_bucket_reso": 256, "bucket_step": 64}
    if values.get("prior_preservation"):
        options |= {
            "prior_preservation": True,
            "class_prompt": values["class_prompt"],
            "class_data_dir": str(ws.runs / name / "class_images"),
        }
    if values.get("reg_dataset"):
        options["reg_data_dir"] = regularisation_folder(ws, values)
    if values["method"] == "b_lora":  # also write the content and style halves, for B-LoRA mixing
        options["split"] = True
    if words := str(values.get("token_words") or "").replace(",", " ").split():
        options["token_words"] = words
    options |= more_options(values.get("more", ""))
    return confine(ws, build_config(TrainConfig, options), allow_pickle=allow_pickle)


def regularisation_folder(ws: Workspace, values: dict[str, Any]) -> str:
    """The Train tab's regularisation dataset (style only) as a workspace folder."""
    if values["method"] != "style":
        raise ConfigError(
            "a regularisation dataset is for the style method: clear it (DreamBooth keeps its class with "
            "Prior preservation)"
        )
    fix = "make one in the Dataset tab first, or clear the field"
    return str(ws.dataset_folder(values["reg_dataset"], "regularisation dataset", fix=fix))


def merge_config(ws: Workspace, values: dict[str, Any], allow_pickle: bool = False):
    """A checked MergeConfig from the Merge tab's fields: workspace LoRAs in, loras/<name>.safetensors out."""
    from merging import MergeConfig

    sources = values.get("sources") or []
    if len(sources) < 2:
        raise ConfigError("choose at least two LoRAs to merge")
    weights = parse_weights(values.get("weights", ""), len(sources))
    name = ws.check_name(values["name"], "output name")
    options = load_preset(values["preset"], "merge") if values.get("preset") else {}
    options |= {
        "sources": [f"{ws.resolve(s)}:{w}" for s, w in zip(sources, weights)],
        "method": values["method"],
        "out": str(ws.loras / f"{name}.safetensors"),
        "overwrite": bool(values.get("overwrite")),
        "density": float(values["density"]),
        "prompts": [p.strip() for p in (values.get("prompts") or "").split("|") if p.strip()],
        "references": reference_folders(ws, values.get("references") or ""),
    }
    if int(values.get("rank") or 0) > 0:
        options["rank"] = int(values["rank"])
    if values["method"] in ("ziplora", "ziplora-fast", "fusion") or any(_is_dora(ws, s) for s in sources):
        options["model"] = model_choice(ws, values["model"])  # ZipLoRA, fusion run it; DoRA depends on it
    options |= more_options(values.get("more", ""))
    return confine(ws, build_config(MergeConfig, options), allow_pickle=allow_pickle)


def reference_folders(ws: Workspace, text: str) -> list[str]:
    """The Merge tab's reference datasets ("heart | | moon": one per LoRA, empty = generate) as folders."""
    if not text.strip():
        return []
    fix = "make one in the Dataset tab, or leave that place empty"
    names = [part.strip() for part in text.split("|")]
    return [str(ws.dataset_folder(n, "reference dataset", fix=fix)) if n else "" for n in names]


def _is_dora(ws: Workspace, source: str) -> bool:
    from studio.core.lora_summary import summarize_lora

    try:
        return any("DoRA" in kind for kind in summarize_lora(ws.resolve(source)).kinds)
    except Exception:  # an unreadable file: the merge itself says what is wrong with it
        return False


def generate_config(ws: Workspace, values: dict[str, Any], allow_pickle: bool = False):
    """A checked GenerateConfig from the Generate tab's fields; images go to the workspace's outputs/."""
    from studio.generation import GenerateConfig, LoraSpec

    loras = values.get("loras") or []
    weights = parse_weights(values.get("weights", ""), len(loras))
    stack = [LoraSpec(ws.resolve(path), w) for path, w in zip(loras, weights)]
    size = int(values["size"]) or None
    b_lora = {part: str(ws.resolve(values[part])) if values.get(part) else None
              for part in ("b_lora_content", "b_lora_style")}  # fmt: skip
    cfg = build_config(
        GenerateConfig,
        {
            "prompt": values["prompt"],
            "negative_prompt": values.get("negative_prompt", ""),
            "model": model_choice(ws, values.get("model", "")),
            "loras": stack,
            "mode": values.get("mode", "merge"),
            "steps": int(values["steps"]),
            "cfg": float(values["cfg"]),
            "seed": int(values["seed"]),
            "width": size,
            "height": size,
            "batch_count": int(values["count"]),
            "out": ws.outputs,
            "regions": regions_from_rows(ws, values.get("regions")),
            "region_base": 0.2 if values.get("region_base") is None else float(values["region_base"]),
            "region_mode": values.get("region_mode") or "mask",
            **b_lora,
        },
    )
    return confine(ws, cfg, allow_pickle=allow_pickle)


def merge_methods() -> list[str]:
    from merging.config import METHODS

    return list(METHODS)


def training_methods() -> list[str]:
    from trainers.config import METHODS

    return list(METHODS)
