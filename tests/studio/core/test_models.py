"""Base models: family detection, offline tokenizer, loading, single-file round trips, UNet path mapping."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors.torch import save_file
from transformers import CLIPTokenizer

from studio.core.checkpoints import empty_components, save_single_file, to_ldm_state_dict
from studio.core.devices import pick_device_dtype
from studio.core.errors import BadFileError, FamilyMismatchError, StudioError
from studio.core.io import read_header, read_safetensors
from studio.core.keys import unet_diffusers_to_ldm, unet_ldm_to_diffusers
from studio.core.models import CONFIGS, detect_family, load_base, model_hash, shipped_config_dir
from studio.core.tokenizers import clip_tokenizer, write_tokenizer_files

FAMILIES = ("sd15", "sdxl")


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def tiny(family, request):
    """(pipe, diffusers folder, single file, config folder) of the tiny model of `family`."""
    names = ("", "_dir", "_file", "_config")
    return tuple(request.getfixturevalue(f"tiny_{family}{n}") for n in names)


# --- tokenizer -----------------------------------------------------------------------------------------


def test_tokenizer_known_ids():
    tok = clip_tokenizer()
    assert tok("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]
    assert len(tok) == 49408 and tok.model_max_length == 77
    padded = tok("a dog", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(padded) == 77 and padded[-1] == 49407  # SD1.5 pads with <|endoftext|>
    tok2 = clip_tokenizer(pad_token="!")
    assert tok2.pad_token_id == 0
    assert tok2("a dog", padding="max_length", max_length=6).input_ids == [49406, 320, 1929, 49407, 0, 0]


def test_tokenizer_files_match_clip_layout(tmp_path):
    write_tokenizer_files(tmp_path, pad_token="!")
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    merges = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 49408 and sorted(vocab.values()) == list(range(49408))
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["a</w>"] == 320
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert merges[0].startswith("#version") and len(merges) == 1 + 49152 - 256 - 2
    tok = CLIPTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert tok.pad_token == "!" and tok("A Photo of a DOG").input_ids == [
        49406,
        320,
        1125,
        539,
        320,
        1929,
        49407,
    ]


# --- family detection ----------------------------------------------------------------------------------


def test_detects_folders_and_files(tiny, family):
    _, folder, file, config = tiny
    assert detect_family(folder) == family
    assert detect_family(file) == family
    assert detect_family(config) == family
    assert detect_family(CONFIGS / family) == family
    assert detect_family(read_header(file)[0]) == family


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"cond_stage_model.model.transformer.resblocks.0.ln_1.weight": [1024]}, "2.x"),
        ({"conditioner.embedders.0.model.text_projection": [1280, 1280]}, "refiner"),
        ({"model.diffusion_model.input_blocks.0.0.weight": [320, 9, 3, 3],
          "cond_stage_model.transformer.text_model.final_layer_norm.weight": [768]}, "inpainting"),
        ({"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": [320, 1024]}, "2.x"),
        ({"model.diffusion_model.label_emb.0.0.weight": [1280, 2560],
          "model.diffusion_model.input_blocks.11.0.in_layers.0.weight": [1536]}, "refiner"),
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": [4, 320]}, "LoRA file"),
        ({"encoder.layers.0.weight": [3], "decoder.weight": [3]}, "not a Stable Diffusion checkpoint"),
        ({}, "not a Stable Diffusion checkpoint"),
    ],
)  # fmt: skip
def test_unsupported_checkpoints_are_named(keys, message):
    entries = {k: {"shape": shape} for k, shape in keys.items()}
    with pytest.raises(StudioError, match=message) as info:
        detect_family(entries)
    assert "supports Stable Diffusion 1.5 and SDXL" in str(info.value)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"cross_attention_dim": 1024, "use_linear_projection": True}, "2.x"),
        ({"in_channels": 9}, "inpainting"),
    ],
)
def test_unsupported_folders_are_named(tiny_sd15_config, tmp_path, change, message):
    folder = shutil.copytree(tiny_sd15_config, tmp_path / "model")
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps(config | change))
    with pytest.raises(StudioError, match=message):
        detect_family(folder)
    with pytest.raises(StudioError, match=message):
        load_base(folder)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(BadFileError, match="no unet/config.json"):
        load_base(tmp_path)


# --- loading ---------------------------------------------------------------------------------------------


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_load_diffusers_folder(tiny, family):
    pipe, folder, _, _ = tiny
    model = load_base(folder, device="cpu")
    assert (model.family, model.kind, model.path) == (family, "diffusers", folder)
    assert type(model.pipe) is type(pipe) and model.dtype == torch.float32
    assert getattr(model.pipe, "safety_checker", None) is None
    assert_same_weights(model.pipe.unet, pipe.unet)
    assert re.fullmatch(r"[0-9a-f]{64}", model.model_hash)
    assert model_hash(folder) == model.model_hash  # a fingerprint of the files, stable across loads


def components_out(pipe) -> list[torch.Tensor]:
    """UNet, VAE decoder and text encoder outputs on fixed inputs."""
    g = torch.Generator().manual_seed(1)
    ids = pipe.tokenizer("a photo of a dog", padding="max_length", return_tensors="pt").input_ids
    outs = [pipe.text_encoder(ids).last_hidden_state]
    context = outs[0]
    extra = {}
    if getattr(pipe, "text_encoder_2", None) is not None:
        te2 = pipe.text_encoder_2(ids, output_hidden_states=True)
        outs += [te2.text_embeds, te2.hidden_states[-2]]
        context = torch.cat([outs[0], te2.hidden_states[-2]], dim=-1)
        extra = {
            "added_cond_kwargs": {
                "text_embeds": te2.text_embeds,
                "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64.0]]),
            }
        }
    latents = torch.randn(1, 4, 8, 8, generator=g)
    outs.append(pipe.unet(latents, 500, encoder_hidden_states=context, **extra).sample)
    outs.append(pipe.vae.decode(latents).sample)
    return outs


@torch.no_grad()
def test_single_file_round_trip_gives_identical_outputs(tiny, family):
    pipe, _, file, config = tiny
    model = load_base(file, config_dir=config, device="cpu")
    assert (model.family, model.kind, type(model.pipe)) == (family, "single_file", type(pipe))
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            assert_same_weights(getattr(model.pipe, name), getattr(pipe, name))
    for a, b in zip(components_out(model.pipe), components_out(pipe), strict=True):
        assert torch.equal(a, b)
    kwargs = {"num_inference_steps": 2, "height": 64, "width": 64, "output_type": "np"}
    image = model.pipe("a photo of a dog", generator=torch.Generator().manual_seed(0), **kwargs).images
    expected = pipe("a photo of a dog", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert image.shape == (1, 64, 64, 3) and (image == expected).all()


def test_single_file_uses_original_layout(tiny, family):
    _, _, file, _ = tiny
    index, metadata = read_header(file)
    prefixes = {"sd15": ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."),
                "sdxl": ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.text_model.",
                         "conditioner.embedders.1.model.")}[family]  # fmt: skip
    assert all(k.startswith(prefixes) for k in index)
    assert not any(
        part in k for k in index for part in ("down_blocks", "up_blocks", "mid_block", "to_q.weight.lora")
    )
    upsampler = {"sd15": "output_blocks.2.1.conv.weight", "sdxl": "output_blocks.2.2.conv.weight"}[family]
    assert "model.diffusion_model." + upsampler in index
    assert "first_stage_model.decoder.up.3.upsample.conv.weight" in index
    assert len(index["first_stage_model.encoder.mid.attn_1.q.weight"]["shape"]) == 4  # 1x1 conv, not linear
    if family == "sdxl":
        te2 = "conditioner.embedders.1.model."
        assert index[te2 + "text_projection"]["shape"] == [48, 40]  # stored transposed: [width, projection]
        assert index[te2 + "transformer.resblocks.0.attn.in_proj_weight"]["shape"] == [3 * 48, 48]
    assert metadata["modelspec.architecture"].startswith("stable-diffusion")


def test_pickle_refused_unless_allowed(tiny_sd15, tiny_sd15_config, tmp_path):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": to_ldm_state_dict(tiny_sd15.components, "sd15")}, ckpt)
    with pytest.raises(BadFileError, match="arbitrary code") as info:
        load_base(ckpt, config_dir=tiny_sd15_config)
    assert str(ckpt) in str(info.value) and "--allow-pickle" in str(info.value)
    model = load_base(ckpt, config_dir=tiny_sd15_config, allow_pickle=True)
    assert model.family == "sd15" and model.kind == "single_file"
    assert_same_weights(model.pipe.unet, tiny_sd15.unet)


def test_truncated_and_garbage_files(tiny_sd15_file, tmp_path):
    data = tiny_sd15_file.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadFileError, match="truncated") as info:
        load_base(truncated)
    assert str(truncated) in str(info.value)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(BadFileError, match=str(garbage)):
        load_base(garbage)


def test_missing_path(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(BadFileError, match="no such file") as info:
        load_base(missing)
    assert str(missing) in str(info.value)


def test_wrong_family_forced(tiny_sd15_file, tiny_sd15_config, tiny_sdxl_config):
    with pytest.raises(FamilyMismatchError, match="SDXL"):
        load_base(tiny_sd15_file, family="sdxl", config_dir=tiny_sd15_config)
    with pytest.raises(FamilyMismatchError, match="config folder"):
        load_base(tiny_sd15_file, config_dir=tiny_sdxl_config)


def test_incomplete_checkpoints(tiny_sd15_file, tiny_sd15_config, tmp_path):
    tensors, _ = read_safetensors(tiny_sd15_file)
    no_vae = tmp_path / "no_vae.safetensors"
    save_file({k: v for k, v in tensors.items() if not k.startswith("first_stage_model.")}, no_vae)
    with pytest.raises(BadFileError, match="no VAE"):
        load_base(no_vae, config_dir=tiny_sd15_config)
    holed = tmp_path / "holed.safetensors"
    save_file({k: v for k, v in tensors.items() if "middle_block.1.proj_in" not in k}, holed)
    with pytest.raises(BadFileError, match=r"2 tensors are missing .*middle_block\.1\.proj_in") as info:
        load_base(holed, config_dir=tiny_sd15_config)
    assert str(holed) in str(info.value)
    shapes = tmp_path / "shapes.safetensors"  # weights that do not fit the configuration
    save_file(tensors | {"model.diffusion_model.out.2.weight": torch.zeros(4, 7, 3, 3)}, shapes)
    with pytest.raises(
        BadFileError, match=r"out\.2\.weight has shape \[4, 7, 3, 3\] .* expects \[4, 32, 3, 3\]"
    ):
        load_base(shapes, config_dir=tiny_sd15_config)


def test_default_configs_are_the_real_ones(tiny_sd15_file):
    """Without config_dir the shipped SD1.5 config is used (offline); a tiny file does not fit it."""
    with pytest.raises(
        BadFileError, match=r"has shape \[.*\] but the model configuration in .* expects \["
    ) as info:
        load_base(tiny_sd15_file)
    assert str(tiny_sd15_file) in str(info.value)


def test_shipped_config_dir_is_complete(family):
    folder = shipped_config_dir(family)
    assert detect_family(folder) == family
    tokenizers = ["tokenizer"] + (["tokenizer_2"] if family == "sdxl" else [])
    pads = [
        CLIPTokenizer.from_pretrained(str(folder / t), local_files_only=True).pad_token for t in tokenizers
    ]
    assert pads == ["<|endoftext|>", "!"][: len(pads)]
    assert shipped_config_dir(family) == folder  # built once, then reused


# --- saving ----------------------------------------------------------------------------------------------


def test_save_refuses_to_overwrite_and_checks_family(tiny_sd15, tiny_sd15_file, tmp_path):
    with pytest.raises(StudioError, match="already exists"):
        save_single_file(tiny_sd15, tiny_sd15_file, "sd15")
    with pytest.raises(StudioError, match=".safetensors"):
        save_single_file(tiny_sd15, tmp_path / "model.ckpt", "sd15")
    with pytest.raises(FamilyMismatchError):
        save_single_file(tiny_sd15, tmp_path / "model.safetensors", "sdxl")
    out = save_single_file(tiny_sd15, tmp_path / "half.safetensors", "sd15", dtype="fp16")
    assert {entry["dtype"] for entry in read_header(out)[0].values()} == {"F16"}


def test_fp16_file_loads_as_fp32_on_cpu(tiny_sd15, tiny_sd15_config, tmp_path):
    out = save_single_file(tiny_sd15, tmp_path / "half.safetensors", "sd15", dtype="fp16")
    model = load_base(out, config_dir=tiny_sd15_config, device="cpu")
    assert model.dtype == torch.float32
    assert {p.dtype for p in model.pipe.unet.parameters()} == {torch.float32}
    assert {p.dtype for p in model.pipe.text_encoder.parameters()} == {torch.float32}


def test_save_refuses_unfused_lora(fresh_sd15, tiny_sd15, tmp_path):
    from peft import LoraConfig

    fresh_sd15.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
    with pytest.raises(StudioError, match="LoRA layers"):
        save_single_file(fresh_sd15, tmp_path / "model.safetensors", "sd15")
    assert not (tmp_path / "model.safetensors").exists()
    assert not any("lora" in key for key in tiny_sd15.unet.state_dict())  # the shared pipeline is untouched


# --- device and dtype ------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks CPU-only defaults")
def test_device_dtype_on_cpu():
    assert pick_device_dtype("cpu") == (torch.device("cpu"), torch.float32)
    assert pick_device_dtype("cpu", "bf16") == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(StudioError, match="fp16 on the CPU"):
        pick_device_dtype("cpu", "fp16")
    with pytest.raises(StudioError, match="no CUDA GPU"):
        pick_device_dtype("cuda")
    with pytest.raises(StudioError, match="unknown dtype"):
        pick_device_dtype("cpu", "int8")
    with pytest.raises(StudioError, match="unknown device"):
        pick_device_dtype("tpu9")


# --- UNet module paths on the real architectures (meta device: no memory, no weights) --------------------


@pytest.fixture(scope="module")
def real_components() -> dict[str, dict]:
    """The real SD1.5 / SDXL UNet, VAE and text encoders from our shipped configs, on the meta device."""
    return {fam: empty_components(CONFIGS / fam, fam) for fam in FAMILIES}


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_shipped_configs_build_the_real_models(real_components):
    sd15, sdxl = real_components["sd15"], real_components["sdxl"]
    # published parameter counts of the original models
    assert n_params(sd15["unet"]) == 859_520_964 and n_params(sdxl["unet"]) == 2_567_463_684
    assert n_params(sd15["vae"]) == n_params(sdxl["vae"]) == 83_653_863
    assert n_params(sd15["text_encoder"]) == n_params(sdxl["text_encoder"]) == 123_060_480
    assert n_params(sdxl["text_encoder_2"]) == 694_659_840


def test_every_unet_module_round_trips(real_components, family):
    unet = real_components[family]["unet"]
    ldm_names = {}
    for name, module in unet.named_modules():
        if not name:
            continue
        try:
            ldm = unet_diffusers_to_ldm(name, family)
        except ValueError:
            # only containers, whole diffusers levels and parameter-free helpers have no counterpart
            assert (
                isinstance(module, torch.nn.ModuleList)
                or re.fullmatch(r"(down|up)_blocks\.\d+", name)
                or not any(True for _ in module.parameters())
            ), name
            continue
        assert unet_ldm_to_diffusers(ldm, family) == name
        assert ldm not in ldm_names, (name, ldm_names.get(ldm))
        ldm_names[ldm] = name
    for key in unet.state_dict():
        ldm = unet_diffusers_to_ldm(key, family)
        assert ldm.endswith((".weight", ".bias")) and unet_ldm_to_diffusers(ldm, family) == key


def test_ldm_state_dict_matches_diffusers_own_converters(real_components, family):
    parts = real_components[family]
    state = to_ldm_state_dict(parts, family)
    assert detect_family(state) == family
    reference = parts["unet"].state_dict()
    assert {k for k in state if k.startswith("model.diffusion_model.")} == {
        "model.diffusion_model." + unet_diffusers_to_ldm(k, family) for k in reference
    }
    # diffusers' converter only moves values: feed it names, and every name must come back to its own key
    names = {"model.diffusion_model." + unet_diffusers_to_ldm(k, family): k for k in reference}
    assert convert_ldm_unet_checkpoint(names, dict(parts["unet"].config)) == {k: k for k in reference}
    vae = convert_ldm_vae_checkpoint(state, dict(parts["vae"].config))
    assert {k: v.shape for k, v in vae.items()} == {k: v.shape for k, v in parts["vae"].state_dict().items()}
    te = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(state).items()}
    assert {k: v.shape for k, v in te.items()} == {
        k: v.shape for k, v in parts["text_encoder"].state_dict().items()
    }
    if family == "sdxl":
        te2 = convert_open_clip_checkpoint(
            parts["text_encoder_2"], state, prefix="conditioner.embedders.1.model."
        )
        expected = {k: v.shape for k, v in parts["text_encoder_2"].state_dict().items()}
        assert {k: v.shape for k, v in te2.items()} == expected


@pytest.mark.parametrize(
    "family, diffusers, ldm",
    [
        ("sdxl", "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "output_blocks.0.1.transformer_blocks.0.attn1.to_q"),
        ("sdxl", "up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
        ("sd15", "up_blocks.0.upsamplers.0.conv", "output_blocks.2.1.conv"),
        ("sd15", "up_blocks.1.upsamplers.0.conv.weight", "output_blocks.5.2.conv.weight"),
        ("sdxl", "down_blocks.1.attentions.1.proj_in", "input_blocks.5.1.proj_in"),
        ("sdxl", "down_blocks.0.downsamplers.0.conv.bias", "input_blocks.3.0.op.bias"),
        ("sd15", "down_blocks.1.resnets.0.conv_shortcut", "input_blocks.4.0.skip_connection"),
        ("sd15", "up_blocks.3.resnets.2.time_emb_proj", "output_blocks.11.0.emb_layers.1"),
        ("sdxl", "mid_block.attentions.0.transformer_blocks.9.ff.net.2", "middle_block.1.transformer_blocks.9.ff.net.2"),
        ("sdxl", "mid_block.resnets.1.norm2", "middle_block.2.out_layers.0"),
        ("sdxl", "add_embedding.linear_1", "label_emb.0.0"),
        ("sd15", "time_embedding.linear_2.weight", "time_embed.2.weight"),
        ("sd15", "conv_in", "input_blocks.0.0"),
        ("sd15", "conv_out", "out.2"),
        ("sdxl", "up_blocks.2.resnets.2.conv1", "output_blocks.8.0.in_layers.2"),
    ],
)  # fmt: skip
def test_known_path_pairs(family, diffusers, ldm):
    assert unet_diffusers_to_ldm(diffusers, family) == ldm
    assert unet_ldm_to_diffusers(ldm, family) == diffusers


def test_default_family_is_sdxl_and_bad_paths_raise():
    assert unet_diffusers_to_ldm("up_blocks.0.attentions.2.proj_out") == "output_blocks.2.1.proj_out"
    assert unet_ldm_to_diffusers("output_blocks.2.1.proj_out") == "up_blocks.0.attentions.2.proj_out"
    for bad in ("down_blocks.0", "down_blocks.0.resnets.0.nonlinearity", "text_model.encoder", "weight"):
        with pytest.raises(ValueError):
            unet_diffusers_to_ldm(bad)
    with pytest.raises(ValueError):
        unet_ldm_to_diffusers("input_blocks.1.0.in_layers.1")  # an activation shared in diffusers
    with pytest.raises(ValueError):
        unet_ldm_to_diffusers("output_blocks.2.1.conv", "sdxl")  # SD1.5's upsampler slot, SDXL's attention
    with pytest.raises(ValueError):
        unet_diffusers_to_ldm(
            "down_blocks.0.attentions.0.proj_in", "sdxl"
        )  # SDXL's first level has no attention


# --- tiny models -----------------------------------------------------------------------------------------


def test_tiny_models_keep_the_real_block_structure(tiny, family, real_components):
    pipe = tiny[0]
    real = real_components[family]["unet"].config
    for key in ("down_block_types", "up_block_types", "layers_per_block", "use_linear_projection",
                "addition_embed_type"):  # fmt: skip
        value, expected = pipe.unet.config[key], real[key]
        assert (list(value) if isinstance(value, tuple) else value) == expected, key

    def blocks(unet: torch.nn.Module) -> set[str]:
        return {
            m[0] for name, _ in unet.named_modules() if (m := re.match(r"(\w+_blocks?\.\d+\.\w+\.\d+)", name))
        }

    assert blocks(pipe.unet) == blocks(real_components[family]["unet"])


def test_tiny_generation_is_seeded(tiny):
    pipe = tiny[0]
    kwargs = {"num_inference_steps": 2, "height": 64, "width": 64, "output_type": "np"}
    first = pipe("a dog", generator=torch.Generator().manual_seed(3), **kwargs).images
    again = pipe("a dog", generator=torch.Generator().manual_seed(3), **kwargs).images
    other = pipe("a dog", generator=torch.Generator().manual_seed(4), **kwargs).images
    assert first.shape == (1, 64, 64, 3) and (first == again).all() and not (first == other).all()
