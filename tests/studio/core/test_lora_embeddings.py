"""Token embeddings bundled in LoRA files (A1111's bundle_emb keys): read, written, inspected, loaded with
the stack at generation, carried by merges."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from merging import MergeConfig, run_merge
from studio.core.errors import BadFileError, ConfigError, StudioError
from studio.core.lora_files import read_lora, write_lora
from studio.core.lora_summary import summarize_lora
from studio.core.modules import model_module_shapes
from studio.core.options import build_config
from studio.generation.adapters import AdapterPool
from tests.fixtures.lora_random import default_targets, random_lora
from tests.probes import unet_output as unet_output_of


def width(pipe, name="text_encoder") -> int:
    return getattr(pipe, name).get_input_embeddings().weight.shape[1]


def bundled(pipe, family, path, words=("sks",), seed=1, n=1):
    """A small LoRA file bundling an embedding of n vectors for each of `words`."""
    targets = [p for p in default_targets(model_module_shapes(pipe)) if p.endswith("to_q")]
    lora = random_lora(pipe, family, targets=targets, seed=seed, scale=0.01)
    g = torch.Generator().manual_seed(seed)
    encoders = {"clip_l": "text_encoder"} | ({"clip_g": "text_encoder_2"} if family == "sdxl" else {})
    lora.embeddings = {w: {e: torch.randn(n, width(pipe, te), generator=g) for e, te in encoders.items()}
                       for w in words}  # fmt: skip
    return write_lora(lora, path)


def image(pipe, prompt):
    g = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=2, height=64, width=64, generator=g, output_type="np").images[0]


def test_a1111_keys_read_written_and_inspected(tiny_sd15, tiny_sdxl, tmp_path):
    path = bundled(tiny_sd15, "sd15", tmp_path / "a.safetensors", n=2)
    state = load_file(path)
    assert state["bundle_emb.sks.string_to_param.*"].shape == (2, width(tiny_sd15))
    lora = read_lora(path)
    assert set(lora.embeddings) == {"sks"} and lora.embeddings["sks"]["clip_l"].shape[0] == 2
    again = load_file(write_lora(lora, tmp_path / "b.safetensors"))
    assert set(again) == set(state) and all(torch.equal(again[k], state[k]) for k in state)
    assert summarize_lora(path).embeddings == {"sks": 2}
    with pytest.raises(StudioError, match="kohya"):
        write_lora(lora, tmp_path / "c.safetensors", fmt="peft")

    xl = load_file(bundled(tiny_sdxl, "sdxl", tmp_path / "xl.safetensors"))
    assert {k for k in xl if k.startswith("bundle_emb")} == {"bundle_emb.sks.clip_l", "bundle_emb.sks.clip_g"}


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("bundle_emb.sks.string_to_param.*", torch.full((1, 8), float("nan")), "NaN"),
        ("bundle_emb.sks.clip_x", torch.zeros(1, 8), "not a bundled embedding"),
    ],
)
def test_broken_bundles_are_refused_by_reader_and_inspector(tiny_sd15, tmp_path, key, value, message):
    state = load_file(bundled(tiny_sd15, "sd15", tmp_path / "a.safetensors", words=()))
    state[key] = value
    save_file(state, tmp_path / "bad.safetensors")
    for read in (read_lora, summarize_lora):
        with pytest.raises(BadFileError, match=message):
            read(tmp_path / "bad.safetensors")


def test_the_stack_loads_its_words_and_leaves_the_encoder_as_it_was(fresh_sd15, tmp_path):
    pipe, prompt = fresh_sd15, "a sks dog"
    with_word = bundled(pipe, "sd15", tmp_path / "a.safetensors")
    plain = tmp_path / "plain.safetensors"
    lora = read_lora(with_word)
    lora.embeddings = {}
    write_lora(lora, plain)
    vocab, base = len(pipe.tokenizer), image(pipe, prompt)
    pool = AdapterPool(pipe, "sd15")

    pool.activate([(pool.load(plain), 1.0, None)])
    without = image(pipe, prompt)
    pool.activate([(pool.load(with_word), 1.0, None)])
    assert len(pipe.tokenizer) == vocab + 1
    assert np.abs(image(pipe, prompt) - without).max() > 1e-3  # the word now stands for its vectors
    np.testing.assert_allclose(image(pipe, "a dog"), image_with(pool, plain, pipe, "a dog"), atol=1e-6)
    # the word only where it stands alone, as A1111 reads it: "asks" is still a word of its own
    np.testing.assert_allclose(image(pipe, "he asks"), image_with(pool, plain, pipe, "he asks"), atol=1e-6)
    assert pipe.tokenizer.tokenize("he asks sks, (sks)") == [
        "he</w>",
        "asks</w>",
        "sks",
        ",</w>",
        "(</w>",
        "sks",
        ")</w>",
    ]

    # the same file twice in a stack (a second adapter of it) bundles the same vectors: one word
    pool.activate([(pool.load(with_word), 0.5, None), (pool.load(with_word, slot=1), 0.5, None)])
    assert len(pipe.tokenizer) == vocab + 1

    pool.activate([])
    assert len(pipe.tokenizer) == vocab
    np.testing.assert_allclose(image(pipe, prompt), base, atol=1e-6)


def image_with(pool, path, pipe, prompt):
    """The image with only `path` in the stack; the stack is put back to `path`'s bundled twin after."""
    previous = [(a, 1.0, None) for a in pool.adapters if a.name in pool.stack_names]
    pool.activate([(pool.load(path), 1.0, None)])
    try:
        return image(pipe, prompt)
    finally:
        pool.activate(previous)


def test_a_word_the_model_has_or_another_width_is_refused(fresh_sd15, tiny_sdxl, tmp_path):
    pool = AdapterPool(fresh_sd15, "sd15")
    taken = bundled(fresh_sd15, "sd15", tmp_path / "taken.safetensors", words=("a",))
    with pytest.raises(StudioError, match="already a token"):
        pool.activate([(pool.load(taken), 1.0, None)])
    state = load_file(bundled(fresh_sd15, "sd15", tmp_path / "a.safetensors"))
    state["bundle_emb.sks.string_to_param.*"] = torch.zeros(1, width(fresh_sd15) + 8)
    save_file(state, tmp_path / "wide.safetensors")
    with pytest.raises(StudioError, match="another base model"):
        pool.activate([(pool.load(tmp_path / "wide.safetensors"), 1.0, None)])


def test_merges_carry_the_words_or_refuse(tiny_sd15, tmp_path):
    a = bundled(tiny_sd15, "sd15", tmp_path / "a.safetensors", words=("sks",), seed=1)
    b = bundled(tiny_sd15, "sd15", tmp_path / "b.safetensors", words=("zwx",), seed=2)
    out = tmp_path / "ab.safetensors"
    run_merge(build_config(MergeConfig, sources=[f"{a}:1.0", f"{b}:0.5"], method="concat", out=str(out)))
    merged, sources = read_lora(out).embeddings, [read_lora(a).embeddings, read_lora(b).embeddings]
    assert torch.equal(merged["sks"]["clip_l"], sources[0]["sks"]["clip_l"])
    assert torch.equal(merged["zwx"]["clip_l"], sources[1]["zwx"]["clip_l"])

    twin = bundled(tiny_sd15, "sd15", tmp_path / "twin.safetensors", words=("sks",), seed=3)
    with pytest.raises(StudioError, match="both bundle"):
        run_merge(build_config(MergeConfig, sources=[str(a), str(twin)], method="concat",
                               out=str(tmp_path / "x.safetensors")))  # fmt: skip
    with pytest.raises(ConfigError, match="checkpoint cannot hold"):
        run_merge(build_config(MergeConfig, sources=[str(a), str(b)], method="concat", model=str(tmp_path),
                               out=str(tmp_path / "z.safetensors"), into_base=str(tmp_path / "m.safetensors")))  # fmt: skip
    assert not any(tmp_path.glob("[xzm].safetensors"))


MODEL_RUNS = {
    "ziplora": {"steps": 4, "lr": 0.05, "eval_samples": 2, "similarity_weight": 0.0},  # the prompts alone steer
    "fusion": {"fusion_samples": 2, "fast_tokens": 10_000, "fusion_text_rows": "trigger",
               "fusion_order": "text-first"},
}  # fmt: skip


@pytest.mark.parametrize("method", sorted(MODEL_RUNS))
def test_merges_that_run_the_model_read_the_prompts_with_the_words(method, fresh_sd15, tmp_path):
    """ZipLoRA and fusion run the model on each source's prompt: its bundled word must stand for the learnt
    vectors there, as at generation (the same merge of the LoRAs without their words comes out otherwise),
    and the pipeline is left as it was."""
    pipe = fresh_sd15
    n, rows = 2, len(pipe.tokenizer)  # words of 2 vectors: 2 tokens each in a prompt
    paths = [bundled(pipe, "sd15", tmp_path / f"{w}.safetensors", words=(w,), seed=i, n=n)
             for i, w in enumerate(("sks", "zwx"), start=1)]  # fmt: skip
    bare = []
    for path in paths:
        lora = read_lora(path)
        lora.embeddings = {}
        bare.append(write_lora(lora, path.with_name(f"bare_{path.name}")))
    values = {"method": method, "prompts": ["a sks shape", "a zwx shape"], "reference_count": 1,
              "reference_steps": 2, "probes": 4, "model": "unused", **MODEL_RUNS[method]}  # fmt: skip
    before = unet_output_of(pipe)
    out = {"out": str(tmp_path / "merged.safetensors")}
    merged = run_merge(build_config(MergeConfig, sources=[str(p) for p in paths], **values, **out), pipe=pipe)
    merged = read_lora(merged.out)
    assert len(pipe.tokenizer) == rows and torch.equal(unet_output_of(pipe), before)
    assert sorted(merged.embeddings) == ["sks", "zwx"]
    out = {"out": str(tmp_path / "without.safetensors")}
    without = run_merge(
        build_config(MergeConfig, sources=[str(p) for p in bare], **values, **out), pipe=pipe
    ).lora
    assert not without.embeddings
    changed = [
        p for p, m in merged.modules.items() if not torch.allclose(m.delta(), without.modules[p].delta())
    ]
    assert len(changed) > len(merged.modules) // 2


def test_sdxl_words_reach_both_text_encoders(fresh_sdxl, tmp_path):
    pipe = fresh_sdxl
    path = bundled(pipe, "sdxl", tmp_path / "xl.safetensors", n=2)
    vectors = read_lora(path).embeddings["sks"]
    sizes = len(pipe.tokenizer), len(pipe.tokenizer_2)
    pool = AdapterPool(pipe, "sdxl")
    pool.activate([(pool.load(path), 1.0, None)])
    for tokenizer, encoder, part in ((pipe.tokenizer, pipe.text_encoder, "clip_l"),
                                     (pipe.tokenizer_2, pipe.text_encoder_2, "clip_g")):  # fmt: skip
        ids = tokenizer.convert_tokens_to_ids(["sks", "sks_1"])
        torch.testing.assert_close(encoder.get_input_embeddings().weight[ids], vectors[part])
        # each prompt is expanded for each tokenizer: both read the word's two tokens
        said = tokenizer.tokenize(pipe.maybe_convert_prompt("a Sks dog", tokenizer))
        assert said[1:4] == ["sks", "sks_1", tokenizer.tokenize("dog")[0]]
    pool.activate([])
    assert (len(pipe.tokenizer), len(pipe.tokenizer_2)) == sizes
    assert "_maybe_convert_prompt" not in vars(pipe)


def test_a_word_of_several_vectors_is_expanded_only_where_it_stands_alone(fresh_sd15, tmp_path):
    """A word of two vectors is written as its two tokens where the tokenizer reads the word, in any case,
    and nowhere else: diffusers' own expansion also expands it inside "asks" ("asks sks_1")."""
    pipe = fresh_sd15
    with_word = bundled(pipe, "sd15", tmp_path / "a.safetensors", n=2)
    lora = read_lora(with_word)
    lora.embeddings = {}
    plain = write_lora(lora, tmp_path / "plain.safetensors")
    pool = AdapterPool(pipe, "sd15")
    pool.activate([(pool.load(with_word), 1.0, None)])
    said = pipe.tokenizer.tokenize(pipe.maybe_convert_prompt("he asks; A SKS dog", pipe.tokenizer))
    assert said == ["he</w>", "asks</w>", ";</w>", "a</w>", "sks", "sks_1", "dog</w>"]
    np.testing.assert_allclose(image(pipe, "a SKS dog"), image(pipe, "a sks dog"), atol=1e-6)
    np.testing.assert_allclose(image(pipe, "he asks"), image_with(pool, plain, pipe, "he asks"), atol=1e-6)


def test_generation_notes_a_learnt_word_the_prompt_does_not_say(fresh_sd15, tmp_path):
    from studio.generation.config import GenerateConfig, LoraSpec
    from studio.generation.engine import GenerationEngine

    engine = GenerationEngine(fresh_sd15, "sd15")
    path = bundled(fresh_sd15, "sd15", tmp_path / "dog.safetensors")

    def notes(prompt):
        cfg = GenerateConfig(prompt=prompt, loras=[LoraSpec(path)], steps=1, width=64, height=64, seed=1)
        return engine.generate(cfg)[0].notes

    assert notes("a photo of sks, on grass") == ()
    for prompt in ("a photo of a dog", "he asks"):  # "asks" does not say the word "sks"
        (note,) = notes(prompt)
        assert note.startswith("dog.safetensors learnt the trigger word 'sks', which the prompt does not say")
