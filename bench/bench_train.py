"""Training throughput and peak memory: lora-studio's trainer against diffusers' DreamBooth LoRA examples.

Both train the same random-weight SD-architecture model (saved as a local diffusers folder), on the same
instance images, at the same resolution, batch size, rank, precision and learning rate. Each run is a
fresh subprocess; a run of N1 steps and one of N2 steps are timed, and the difference gives the
steady-state speed (model loading and saving cancel out). Peak memory is the subprocess's peak RSS on the
CPU, or torch's peak allocated memory on CUDA.

The reference scripts are not part of this project; get them from the diffusers repository
(examples/dreambooth/train_dreambooth_lora.py and train_dreambooth_lora_sdxl.py) and pass their paths:

    python bench/bench_train.py --reference path/to/train_dreambooth_lora.py \\
        --reference-sdxl path/to/train_dreambooth_lora_sdxl.py --family both

They need torchvision (and a tracker such as tensorboard); when torchvision cannot be imported, the bench
runs them with a small stand-in for the four PIL transforms they use (Resize, CenterCrop, ToTensor,
Normalize), and says so in the results. Results: a table on stdout and bench/results/<name>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# A small model with SD1.5's / SDXL's block structure: real layer types and block layout, fewer channels,
# so a CPU finishes a step in about a second. "--size tiny" uses tests.fixtures.tiny (64 px).
SMALL = {
    "sd15": {"block_out_channels": (64, 128, 256, 256), "attention_head_dim": 8, "cross_attention_dim": 256,
             "text_hidden": 256, "text_layers": 4},
    "sdxl": {"block_out_channels": (64, 128, 256), "attention_head_dim": (2, 4, 8), "cross_attention_dim": 512,
             "text_hidden": 256, "text_layers": 4},
}  # fmt: skip

LAUNCHER = textwrap.dedent(
    """
    import json, os, runpy, sys, time
    import torch
    import diffusers, transformers  # noqa: their optional-package checks run before any stand-in is visible
    if os.environ.get("BENCH_TV_SHIM"):
        sys.path.insert(0, os.environ["BENCH_TV_SHIM"])
    torch.set_num_threads(int(sys.argv[1]))
    kind, argv = sys.argv[2], sys.argv[3:]
    start = time.perf_counter()
    if kind == "ours":
        from studio.app.cli import main
        code = main(argv)
    else:
        sys.argv = [argv[0]] + argv[1:]
        runpy.run_path(argv[0], run_name="__main__")
        code = 0
    wall = time.perf_counter() - start
    # VmHWM, not getrusage: a process forked from a larger one starts with that one's size in getrusage's peak
    hwm = int(next(x for x in open("/proc/self/status") if x.startswith("VmHWM")).split()[1]) * 1024
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else hwm
    print("BENCH " + json.dumps({"wall": wall, "peak": peak, "code": code}))
    """
)

TV_SHIM = {
    "torchvision/__init__.py": "from . import transforms  # noqa\n__version__ = 'bench-shim'\n",
    "torchvision/transforms/__init__.py": textwrap.dedent(
        """
        import enum
        import numpy as np
        import torch
        from PIL import Image
        from . import functional

        class InterpolationMode(enum.Enum):
            NEAREST = "nearest"
            BILINEAR = "bilinear"
            BICUBIC = "bicubic"
            LANCZOS = "lanczos"

        _PIL = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                "lanczos": Image.LANCZOS}

        class Compose:
            def __init__(self, ts): self.ts = ts
            def __call__(self, x):
                for t in self.ts: x = t(x)
                return x

        class Resize:
            def __init__(self, size, interpolation=InterpolationMode.BILINEAR):
                self.size, self.mode = size, _PIL[getattr(interpolation, "value", "bilinear")]
            def __call__(self, img):
                w, h = img.size
                s = self.size / min(w, h)
                return img.resize((max(self.size, round(w * s)), max(self.size, round(h * s))), self.mode)

        class CenterCrop:
            def __init__(self, size): self.size = size
            def __call__(self, img):
                w, h = img.size
                left, top = (w - self.size) // 2, (h - self.size) // 2
                return img.crop((left, top, left + self.size, top + self.size))

        class RandomCrop(CenterCrop):
            @staticmethod
            def get_params(img, output_size):
                w, h = img.size
                th, tw = output_size
                return (h - th) // 2, (w - tw) // 2, th, tw

        class RandomHorizontalFlip:
            def __init__(self, p=0.5): self.p = p
            def __call__(self, img): return img.transpose(Image.FLIP_LEFT_RIGHT)

        class ToTensor:
            def __call__(self, img):
                return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()

        class Normalize:
            def __init__(self, mean, std): self.mean, self.std = mean[0], std[0]
            def __call__(self, x): return (x - self.mean) / self.std
        """
    ),
    "torchvision/transforms/functional.py": "def crop(img, top, left, h, w):\n"
    "    return img.crop((left, top, left + w, top + h))\n",
}


def build_model(family: str, size: str, folder: Path) -> Path:
    """Save a random-weight model of `family` as a diffusers folder."""
    sys.path.insert(0, str(ROOT))
    import torch

    from tests.fixtures import tiny

    if size == "tiny":
        pipe = tiny.tiny_sd15_pipeline(0) if family == "sd15" else tiny.tiny_sdxl_pipeline(0)
        return tiny.save_tiny(pipe, folder)
    if size == "real":  # the real architecture, random weights, fp32 as most SD1.5 downloads
        return build_real(family, folder, "fp32")
    spec = SMALL[family]
    patched = dict(tiny.TINY_SD15_UNET if family == "sd15" else tiny.TINY_SDXL_UNET)
    patched.update(block_out_channels=spec["block_out_channels"], attention_head_dim=spec["attention_head_dim"],
                   cross_attention_dim=spec["cross_attention_dim"], norm_num_groups=32)  # fmt: skip
    text = dict(tiny.TINY_TEXT, hidden_size=spec["text_hidden"], intermediate_size=4 * spec["text_hidden"],
                num_hidden_layers=spec["text_layers"], projection_dim=spec["text_hidden"])  # fmt: skip
    text2 = dict(getattr(tiny, "TINY_TEXT_2", tiny.TINY_TEXT), hidden_size=2 * spec["text_hidden"],
                 intermediate_size=8 * spec["text_hidden"], num_hidden_layers=spec["text_layers"],
                 projection_dim=2 * spec["text_hidden"])  # fmt: skip
    if family == "sdxl":  # both encoders' states are concatenated; the pooled one comes from the second
        patched["cross_attention_dim"] = text["hidden_size"] + text2["hidden_size"]
        patched["projection_class_embeddings_input_dim"] = 6 * 8 + text2["projection_dim"]
    names = ("TINY_SD15_UNET", "TINY_SDXL_UNET", "TINY_TEXT", "TINY_TEXT_2")
    saved = {n: getattr(tiny, n) for n in names if hasattr(tiny, n)}
    try:
        setattr(tiny, "TINY_SD15_UNET" if family == "sd15" else "TINY_SDXL_UNET", patched)
        tiny.TINY_TEXT = text
        if "TINY_TEXT_2" in saved:
            tiny.TINY_TEXT_2 = text2
        torch.manual_seed(0)
        pipe = tiny.tiny_sd15_pipeline(0) if family == "sd15" else tiny.tiny_sdxl_pipeline(0)
    finally:
        for n, v in saved.items():
            setattr(tiny, n, v)
    return tiny.save_tiny(pipe, folder)


def build_real(family: str, folder: Path, dtype: str = "fp16") -> Path:
    """A random-weight model of the real architecture as a diffusers folder (once per folder)."""
    if (folder / "model_index.json").is_file():
        return folder
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from studio.core.models import CONFIGS
    from studio.core.tokenizers import SDXL_PAD_2, clip_tokenizer

    torch.manual_seed(0)
    cfg = CONFIGS / family
    parts = {
        "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(cfg / "vae")),
        "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(cfg / "unet")),
        "text_encoder": CLIPTextModel(CLIPTextConfig.from_json_file(cfg / "text_encoder" / "config.json")),
        "tokenizer": clip_tokenizer(),
        "scheduler": EulerDiscreteScheduler.from_config(
            EulerDiscreteScheduler.load_config(cfg / "scheduler")
        ),
    }
    if family == "sdxl":
        parts["text_encoder_2"] = CLIPTextModelWithProjection(
            CLIPTextConfig.from_json_file(cfg / "text_encoder_2" / "config.json")
        )
        parts["tokenizer_2"] = clip_tokenizer(SDXL_PAD_2)
        pipe = StableDiffusionXLPipeline(**parts)
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)  # fmt: skip
    pipe.to(torch.float16 if dtype == "fp16" else torch.float32).save_pretrained(
        folder, safe_serialization=True
    )
    return folder


def make_images(folder: Path, n: int, size: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", (size, size), (40 * i % 255, 120, 200))
        img.paste((230, 200, 40), (size // 4, size // 4, size // 2 + 8 * i, size // 2 + 8 * i))
        img.save(folder / f"img_{i}.png")
    return folder


def ours_argv(a, model: Path, data: Path, out: Path, steps: int, cache: bool, gc: bool = False) -> list[str]:
    sets = [f"gradient_checkpointing={str(gc).lower()}", f"max_steps={steps}", f"resolution={a.resolution}", f"batch_size={a.batch}", f"rank={a.rank}",
            f"alpha={a.rank}", f"learning_rate={a.lr}", f"mixed_precision={a.precision}", "enable_buckets=false",
            "use_captions=false", f"cache_latents={str(cache).lower()}", "checkpoint_every=0",
            "lr_scheduler=constant", "seed=0", "progress_bar=false", "max_grad_norm=1.0",
            # the diffusers examples adapt attention projections only (kohya's default adds ff and proj_in/out)
            "layers=to_q,to_k,to_v,to_out.0"]  # fmt: skip
    argv = ["train", "--method", "dreambooth", "--model", str(model), "--data-dir", str(data),
            "--prompt", "a photo of sks dog", "--output-dir", str(out)]  # fmt: skip
    for item in sets:
        argv += ["--set", item]
    return argv


def reference_argv(
    a, script: Path, model: Path, data: Path, out: Path, steps: int, gc: bool = False
) -> list[str]:
    return [str(script), *(["--gradient_checkpointing"] if gc else []), f"--pretrained_model_name_or_path={model}", f"--instance_data_dir={data}",
            "--instance_prompt=a photo of sks dog", f"--output_dir={out}", f"--resolution={a.resolution}",
            f"--train_batch_size={a.batch}", f"--max_train_steps={steps}", f"--learning_rate={a.lr}",
            f"--rank={a.rank}", f"--mixed_precision={a.precision}", "--lr_scheduler=constant",
            "--lr_warmup_steps=0", "--seed=0", "--checkpointing_steps=100000", "--center_crop",
            "--report_to=tensorboard"]  # fmt: skip


def timed(kind: str, argv: list[str], env: dict, threads: int) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(LAUNCHER)
    proc = subprocess.run([sys.executable, f.name, str(threads), kind, *argv], env=env, capture_output=True,
                          text=True, cwd=ROOT)  # fmt: skip
    os.unlink(f.name)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCH ")), None)
    if proc.returncode or line is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
        return {"error": " | ".join(tail)}
    return json.loads(line[6:])


def measure(kind: str, make_argv, env: dict, a) -> dict:
    """Steady-state images/s from two runs (n1, n2 steps) and the peak memory of the longer run."""
    short, long = (
        timed(kind, make_argv(a.steps_short), env, a.threads),
        timed(kind, make_argv(a.steps), env, a.threads),
    )
    if "error" in short or "error" in long:
        return {"error": short.get("error") or long.get("error")}
    seconds = long["wall"] - short["wall"]
    return {"images_per_s": (a.steps - a.steps_short) * a.batch / seconds, "step_s": seconds / (a.steps - a.steps_short),
            "peak_mb": long["peak"] / 2**20, "wall_s": long["wall"],
            "startup_s": short["wall"] - a.steps_short * seconds / (a.steps - a.steps_short)}  # fmt: skip


def reference_env(tmp: Path, extra_path: str | None) -> tuple[dict, str]:
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(filter(None, [extra_path, str(ROOT)]))
    )
    probe = subprocess.run(
        [sys.executable, "-c", "import torchvision.transforms"], env=env, capture_output=True
    )
    if probe.returncode == 0:
        return env, "torchvision"
    shim = tmp / "tv_shim"
    for rel, code in TV_SHIM.items():
        (shim / rel).parent.mkdir(parents=True, exist_ok=True)
        (shim / rel).write_text(code)
    env["BENCH_TV_SHIM"] = str(shim)
    return env, "bench stand-in for torchvision transforms (torchvision does not import here)"


def machine() -> str:
    import torch
    from records import cpu_name  # bench/ is on the path when run as a script

    cpu = cpu_name()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return f"CPU {cpu}, {os.cpu_count()} cores, GPU {gpu}, torch {torch.__version__}, Python {platform.python_version()}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", type=Path, help="diffusers' examples/dreambooth/train_dreambooth_lora.py")
    p.add_argument("--reference-sdxl", type=Path, help="diffusers' train_dreambooth_lora_sdxl.py")
    p.add_argument("--reference-path", help="extra PYTHONPATH for the reference's packages (tensorboard...)")
    p.add_argument("--family", choices=["sd15", "sdxl", "both"], default="sd15")
    p.add_argument("--size", choices=["tiny", "small", "real"], default="small")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--precision", default="no", help="no, fp16 or bf16 (fp16/bf16 need CUDA)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--steps-short", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: no contention on shared cores)")
    p.add_argument("--name", default="train_cpu")
    p.add_argument(
        "--checkpointing", action="store_true", help="also measure both with gradient checkpointing"
    )
    p.add_argument("--only", default="", help="comma list of trainer names to run (default: all)")
    a = p.parse_args()
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = make_images(tmp / "instance", 4, a.resolution)
        ref_env, tv_note = reference_env(tmp, a.reference_path)
        ours_env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
        for family in ("sd15", "sdxl") if a.family == "both" else (a.family,):
            model = build_model(family, a.size, tmp / f"model_{family}")
            runs = {
                "lora-studio (no latent cache)": ("ours", lambda n, f=family, m=model: ours_argv(
                    a, m, data, tmp / f"ours_{f}_{n}", n, cache=False)),
                "lora-studio (default: cached latents)": ("ours", lambda n, f=family, m=model: ours_argv(
                    a, m, data, tmp / f"ourc_{f}_{n}", n, cache=True)),
            }  # fmt: skip
            if a.checkpointing:
                runs["lora-studio (cached latents + gradient checkpointing)"] = ("ours", lambda n, f=family, m=model:
                    ours_argv(a, m, data, tmp / f"ourg_{f}_{n}", n, cache=True, gc=True))  # fmt: skip
            script = a.reference if family == "sd15" else a.reference_sdxl
            if script:
                runs["diffusers example"] = ("ref", lambda n, f=family, m=model, s=script: reference_argv(
                    a, s, m, data, tmp / f"ref_{f}_{n}", n))  # fmt: skip
                if a.checkpointing:
                    runs["diffusers example (gradient checkpointing)"] = ("ref", lambda n, f=family, m=model,
                        s=script: reference_argv(a, s, m, data, tmp / f"refg_{f}_{n}", n, gc=True))  # fmt: skip
            else:
                notes.append(f"{family}: no reference script given; lora-studio measured alone")
            if a.only:
                runs = {k: v for k, v in runs.items() if k in a.only.split(",")}
            results = {name: measure(kind, make, ref_env if kind == "ref" else ours_env, a)
                       for name, (kind, make) in runs.items()}  # fmt: skip
            ref = results.get("diffusers example", {})
            for name, r in results.items():
                rows.append((family, name, r, ref))
    write_results(a, rows, notes, tv_note)


def write_results(a, rows, notes, tv_note) -> None:
    header = ("| family | trainer | images/s | s/step | start-up and save s | peak memory (MB) | speed vs diffusers "
              "| memory vs diffusers |")  # fmt: skip
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for family, name, r, ref in rows:
        if "error" in r:
            lines.append(f"| {family} | {name} | failed: {r['error'][:300]} | | | | | |")
            continue
        speed = f"{r['images_per_s'] / ref['images_per_s']:.2f}x" if "images_per_s" in ref else "-"
        mem = f"{r['peak_mb'] / ref['peak_mb']:.2f}x" if "peak_mb" in ref else "-"
        lines.append(f"| {family} | {name} | {r['images_per_s']:.3f} | {r['step_s']:.3f} | {r['startup_s']:.1f} "
                     f"| {r['peak_mb']:.0f} "
                     f"| {speed} | {mem} |")  # fmt: skip
    table = "\n".join(lines)
    print(table)
    settings = (f"model {a.size} random-weight SD-architecture, resolution {a.resolution}, batch {a.batch}, "
                f"rank {a.rank}, precision {a.precision}, lr {a.lr}, steps {a.steps} - {a.steps_short}, "
                f"{a.threads} torch threads")  # fmt: skip
    text = "\n".join([
        f"# Training throughput: {a.name}", "", f"Machine: {machine()}", "", f"Settings: {settings}", "",
        f"Reference data transforms: {tv_note}", "", table, "", *(f"- {n}" for n in notes), "",
        "Speed is steady-state (difference of a long and a short run); memory is peak RSS on the CPU, peak "
        "allocated CUDA memory on a GPU. Produced by bench/bench_train.py.", "",
    ])  # fmt: skip
    out = ROOT / "bench" / "results" / f"{a.name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
