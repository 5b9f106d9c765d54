"""Mix-of-Show gradient fusion: each layer's fused delta is the least-squares answer on the recorded inputs,
it keeps each concept's layer outputs better than the plain sum, and the CLI writes a LoRA or a checkpoint."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from merging import MergeConfig, run_merge
from merging.fusion import fusion_merge
from merging.sources import Factors, load_sources
from studio.core.lora_files import read_lora, write_lora
from studio.core.lora_ref import parse_lora_ref
from studio.core.modules import resolve_module
from studio.core.options import build_config
from tests.fixtures.lora_random import random_lora


@pytest.fixture
def pair(tiny_sd15, tmp_path):
    a = write_lora(random_lora(tiny_sd15, "sd15", rank=4, seed=1, scale=0.3), tmp_path / "a.safetensors")
    b = write_lora(
        random_lora(tiny_sd15, "sd15", rank=2, seed=2, scale=0.3, text_encoder=False),
        tmp_path / "b.safetensors",
    )
    return a, b


def config(pair, **extra):
    a, b = pair
    values = dict(sources=[f"{a}:0.8", f"{b}:1.1"], method="fusion", prompts=["a sks shape", "a zwx shape"],
                  reference_count=1, reference_steps=2, fusion_samples=2, fast_tokens=10_000, out="", into_base="x",
                  model="demo:sd15")  # fmt: skip
    return build_config(MergeConfig, {**values, **extra})


def objective(delta: torch.Tensor, targets: list[torch.Tensor], inputs: list[torch.Tensor]) -> float:
    """sum_i ||D X_i - dW_i X_i||^2 / rows_i: what fusion minimises (plus the ridge)."""
    return sum(float(((x @ (delta - t).T) ** 2).sum()) / x.shape[0] for t, x in zip(targets, inputs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_layer_is_the_least_squares_fusion(pair, fresh_sd15, dtype):
    """With a bf16 model (--dtype bf16) the inputs are rounded, but the sources' factors and the solve
    stay float32: the normal equations hold on the recorded inputs as tightly as in fp32."""
    fresh_sd15.to(dtype=dtype)
    cfg = config(pair, fusion_ridge=1e-6)
    sources, _ = load_sources(cfg.source_refs())
    outcome = fusion_merge(sources, fresh_sd15, cfg)
    assert outcome.info["layers_fused"] > 0 and outcome.info["layers_summed"] == 0  # text encoder too
    assert any(not p.startswith("unet.") for p in outcome.recorded)
    checked = 0
    for path, per_source in outcome.recorded.items():
        inputs = [per_source[i] for i in range(2)]
        targets = [s.factors()[path].delta() if path in s.factors() else torch.zeros_like(outcome.factors[path].delta())
                   for s in sources]  # fmt: skip
        # the normal equations of Mix-of-Show's objective over every token, with the ridge
        gram = sum(x.double().T @ x.double() for x in inputs)
        cross = sum(t.double() @ x.double().T @ x.double() for t, x in zip(targets, inputs))
        ridge = cfg.fusion_ridge * float(gram.diagonal().mean()) * torch.eye(gram.shape[0], dtype=gram.dtype)
        fused = outcome.factors[path].delta()
        residual = fused.double() @ (gram + ridge) - cross
        assert float(residual.norm() / cross.norm()) < 1e-4, path
        plain = sum(targets)
        assert objective(fused, targets, inputs) <= objective(plain, targets, inputs) * (1 + 1e-4) + 1e-9
        checked += 1
    assert checked == outcome.info["layers_fused"]


def test_output_balance_weighs_each_concept_by_its_own_deltas_effect(pair, fresh_sd15):
    """fusion_balance output: each layer solves sum_i c_i ||(D - dW_i) X_i||^2 + ridge with
    c_i proportional to 1 / ||dW_i X_i||^2 (mean 1), so a weak LoRA's error counts as much as a strong one's."""
    cfg = config(pair, fusion_ridge=1e-6, fusion_balance="output")
    sources, _ = load_sources(cfg.source_refs())
    outcome = fusion_merge(sources, fresh_sd15, cfg)
    assert outcome.info["balance"] == "output" and outcome.info["model_dtype"] == "float32"
    unbalanced = fusion_merge(sources, fresh_sd15, config(pair, fusion_ridge=1e-6))
    moved = 0
    for path, per_source in outcome.recorded.items():
        inputs = [per_source[i].double() for i in range(2)]
        targets = [s.factors()[path].delta().double() if path in s.factors() else None for s in sources]
        if any(t is None for t in targets):
            continue
        energy = [float(((x @ t.T) ** 2).sum()) for t, x in zip(targets, inputs)]
        weights = [(1 / e) / (sum(1 / f for f in energy) / 2) for e in energy]
        gram = sum(c * x.T @ x for c, x in zip(weights, inputs))
        cross = sum(c * t @ x.T @ x for c, t, x in zip(weights, targets, inputs))
        ridge = cfg.fusion_ridge * float(gram.diagonal().mean()) * torch.eye(gram.shape[0], dtype=gram.dtype)
        residual = outcome.factors[path].delta().double() @ (gram + ridge) - cross
        assert float(residual.norm() / cross.norm()) < 1e-4, path
        plain = unbalanced.factors[path].delta().double()
        moved += float((outcome.factors[path].delta().double() - plain).norm() / plain.norm()) > 1e-3
    assert moved > 0


def test_the_ridge_pulls_toward_the_base_or_the_exact_sum(pair, fresh_sd15):
    """Anchored to the sum, each layer solves sum_i ||(D - dW_i) X_i||^2 + r ||D - sum_i dW_i||^2: with a
    ridge far above the inputs' scale the answer is the exact sum; anchored to the base it shrinks to none."""
    sources, _ = load_sources(config(pair).source_refs())
    for ridge, anchor in ((0.5, "sum"), (1e6, "sum"), (1e6, "base")):
        outcome = fusion_merge(sources, fresh_sd15, config(pair, fusion_ridge=ridge, fusion_anchor=anchor))
        assert outcome.info["anchor"] == anchor
        for path, per_source in outcome.recorded.items():
            fused = outcome.factors[path].delta().double()
            deltas = [s.factors()[path].delta().double() if path in s.factors() else torch.zeros_like(fused)
                      for s in sources]  # fmt: skip
            plain = sum(deltas)
            if ridge == 1e6:
                limit = plain if anchor == "sum" else torch.zeros_like(plain)
                assert float((fused - limit).norm() / plain.norm()) < 1e-3, path
                continue
            inputs = [per_source[i].double() for i in range(2)]  # every row (fast_tokens covers them)
            gram = sum(x.T @ x for x in inputs)
            r = ridge * float(gram.diagonal().mean())
            rhs = sum(t @ x.T @ x for t, x in zip(deltas, inputs)) + r * plain
            residual = fused @ (gram + r * torch.eye(gram.shape[0], dtype=gram.dtype)) - rhs
            assert float(residual.norm() / rhs.norm()) < 1e-4, path


def test_fusion_writes_a_lora_and_a_checkpoint(pair, tiny_sd15_dir, tmp_path):
    cfg = config(pair, model=str(tiny_sd15_dir), out=str(tmp_path / "fused.safetensors"), rank=3,
                 into_base=str(tmp_path / "fused_model.safetensors"))  # fmt: skip
    result = run_merge(cfg)
    fused = read_lora(result.out)
    assert fused.ranks == [3] and fused.family == "sd15"
    assert result.into_base.is_file() and result.into_base.stat().st_size > 1_000_000
    details = result.report.details["fusion"]
    assert details["svd_error"]["max"] < 1 and details["layers_fused"] > 0
    assert all(row.recorded is not None for row in result.report.sources)  # kept on each concept's own inputs


def test_merge_dtype_loads_the_model_in_bf16(tiny_sd15_dir):
    from merging.run import _load_model

    cfg = build_config(MergeConfig, {"sources": ["a.safetensors"], "out": "x", "dtype": "bf16"})
    pipe = _load_model(str(tiny_sd15_dir), "sd15", cfg)
    assert pipe.unet.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16


def test_captioned_references_are_seen_with_their_own_captions(pair, fresh_sd15, tmp_path):
    from merging.ziplora import prepare
    from merging.ziplora_data import encode_prompt
    from merging.ziplora_layer import ZipLoraModel

    folder = tmp_path / "refs"
    folder.mkdir()
    for name, colour in (("0", "red"), ("1", "green"), ("2", "blue")):
        Image.new("RGB", (64, 64), colour).save(folder / f"{name}.png")
    (folder / "0.txt").write_text("a sks shape on a red background\n")
    (folder / "1.txt").write_text("  a sks shape\non a green   background ")  # 2.png has none: the prompt
    sources, _ = load_sources(config(pair).source_refs())
    model = ZipLoraModel(fresh_sd15, {f"s{i}": s.factors() for i, s in enumerate(sources)})
    expected = ["a sks shape on a red background", "a sks shape on a green background", "a sks shape"]
    with model.installed():
        setup = prepare(fresh_sd15, model, sources,
                        config(pair, references=[str(folder), ""], reference_captions=True))  # fmt: skip
        assert setup.prompts == [expected, ["a zwx shape"]]
        assert setup.refs[0].shape[0] == 3
        model.set_mode("sources", [0])
        green = encode_prompt(fresh_sd15, expected[1], setup.size).embeds
        assert torch.allclose(setup.conditions("sources")[0].row(1).embeds, green)
        plain = prepare(fresh_sd15, model, sources, config(pair, references=[str(folder), ""]))
        assert plain.prompts[0] == ["a sks shape"]


def test_fusion_needs_a_model_and_prompts(pair):
    with pytest.raises(Exception, match="runs the base model"):
        config(pair, model="")
    with pytest.raises(Exception, match="one prompt per source"):
        config(pair, prompts=["only one"])
    assert parse_lora_ref(str(pair[0])).weight == 1.0


RIDGE = 1e-3


def test_text_first_fuses_the_prompt_side_then_records_the_rest_with_it(pair, fresh_sd15):
    """Mix-of-Show's order: the text encoders fused on each concept's prompts, the cross-attention's K/V on
    the fused encoders' embeddings, the layers after them recorded with all of that acting, so their answers
    change; every layer solves the normal equations on what it saw (the joint order sums the encoders). The
    pipeline is left exactly as it was."""
    from merging.fusion import reads_prompt

    before = {k: v.clone() for k, v in fresh_sd15.unet.state_dict().items()}
    sources, _ = load_sources(config(pair).source_refs())
    joint = fusion_merge(sources, fresh_sd15, config(pair, fusion_ridge=RIDGE, fusion_order="joint"))
    first = fusion_merge(sources, fresh_sd15, config(pair, fusion_ridge=RIDGE, fusion_order="text-first"))
    text = [p for p in first.recorded if not p.startswith("unet.")]
    assert text and first.info["order"] == "text-first" and first.info["layers_summed"] == 0
    assert joint.info["layers_summed"] == len(text) and not any(p in joint.recorded for p in text)
    assert any(reads_prompt(p) for p in first.recorded)
    changed = 0
    for path, per_source in first.recorded.items():
        inputs = [per_source[i].double() for i in range(2)]
        deltas = [s.factors()[path].delta().double() if path in s.factors() else None for s in sources]
        fused = first.factors[path].delta().double()
        deltas = [torch.zeros_like(fused) if d is None else d for d in deltas]
        gram = sum(x.T @ x for x in inputs)
        cross = sum(t @ x.T @ x for t, x in zip(deltas, inputs))
        ridge = RIDGE * float(gram.diagonal().mean()) * torch.eye(gram.shape[0], dtype=gram.dtype)
        assert float((fused @ (gram + ridge) - cross).norm() / cross.norm()) < 1e-4, path
        difference = (fused - joint.factors[path].delta().double()).norm() / fused.norm()
        changed += float(difference) > 1e-3
    assert changed > 0  # some layer downstream of a cross-attention saw other inputs
    after = fresh_sd15.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and set(before) == set(after)


def test_text_first_with_summed_encoders_fits_keys_and_values_as_the_joint_order(pair, fresh_sd15):
    """fusion_text_encoders sum: the encoders' deltas summed as in the joint order, so the cross-attention's
    K/V (whose only input is the prompt) come out as the joint solve's."""
    from merging.fusion import reads_prompt

    sources, _ = load_sources(config(pair).source_refs())
    joint = fusion_merge(sources, fresh_sd15, config(pair, fusion_ridge=RIDGE, fusion_order="joint"))
    summed = fusion_merge(sources, fresh_sd15, config(pair, fusion_ridge=RIDGE, fusion_text_encoders="sum"))
    assert summed.info["text_encoders"] == "sum" and summed.info["layers_fused"] == joint.info["layers_fused"]
    kv = [p for p in joint.recorded if reads_prompt(p)]
    assert kv
    for path in kv:
        kv_first, kv_joint = summed.factors[path].delta(), joint.factors[path].delta()
        assert float((kv_first - kv_joint).norm() / kv_joint.norm()) < 1e-3, path


def encoded(pipe, prompt: str, factors: dict | None = None) -> torch.Tensor:
    """The prompt's embeddings with the text-encoder part of `factors` added to the weights."""
    saved = {}
    for path, f in (factors or {}).items():
        if not path.startswith("unet."):
            module = resolve_module(pipe, path)
            saved[module] = module.weight.detach().clone()
            module.weight.data += f.delta().reshape(module.weight.shape).to(module.weight)
    try:
        with torch.no_grad():
            return pipe.encode_prompt(prompt, "cpu", 1, False)[0].double()
    finally:
        for module, weight in saved.items():
            module.weight.data.copy_(weight)


def test_fused_text_encoders_keep_each_prompt_as_its_own_lora_encodes_it(pair, fresh_sd15):
    """Only the first LoRA adapts the text encoder: summed, it changes the second concept's prompt too;
    fused, the first prompt stays near its own LoRA's encoding and the second moves less than with the sum."""
    sources, _ = load_sources(config(pair).source_refs())
    fused = fusion_merge(sources, fresh_sd15, config(pair, fusion_ridge=RIDGE)).factors
    own = {p: f for p, f in sources[0].factors().items()}
    summed = {p: Factors(torch.cat([f.up, g.up], 1), torch.cat([f.down, g.down])) if g else f
              for p, f, g in ((p, f, sources[1].factors().get(p)) for p, f in own.items())}  # fmt: skip
    first, second = "a sks shape", "a zwx shape"
    gap = lambda a, b: float((a - b).norm())  # noqa: E731
    base_second, own_first = encoded(fresh_sd15, second), encoded(fresh_sd15, first, own)
    assert gap(encoded(fresh_sd15, first, fused), own_first) < 0.5 * gap(
        encoded(fresh_sd15, first), own_first
    )
    # the tokens both prompts share ("a", the start token) read alike in every layer: there the fit splits
    # the difference, so the second prompt moves less than with the sum, not none
    assert gap(encoded(fresh_sd15, second, fused), base_second) < gap(
        encoded(fresh_sd15, second, summed), base_second
    )


def test_trigger_rows_keep_keys_and_values_on_each_concepts_own_words(pair, fresh_sd15):
    """fusion_text_rows trigger: each concept's K/V are fitted on the tokens its prompt has and the others'
    lack, plus the end token (the reference implementation's concept-token features), nothing else."""
    from merging.fusion import reads_prompt

    sources, _ = load_sources(config(pair).source_refs())
    cfg = config(pair, fusion_ridge=RIDGE, fusion_order="text-first", fusion_text_rows="trigger")
    outcome = fusion_merge(sources, fresh_sd15, cfg)
    tokenizer = fresh_sd15.tokenizer
    own = [len(tokenizer(w, add_special_tokens=False).input_ids) for w in ("sks", "zwx")]
    embeds = [encoded(fresh_sd15, p, outcome.factors)[0].float() for p in cfg.prompts]  # the fused encoder
    kv = [p for p in outcome.recorded if reads_prompt(p)]
    assert kv and outcome.info["text_rows"] == "trigger"
    for path in kv:
        rows = outcome.recorded[path]
        assert [rows[i].shape[0] for i in range(2)] == [n + 1 for n in own]
        # source b's rows: its prompt through the fused text encoder, the word and the end token
        ids = tokenizer(cfg.prompts[1], padding="max_length", max_length=77).input_ids
        picked = [ids.index(t) for t in tokenizer("zwx", add_special_tokens=False).input_ids]
        picked.append(ids.index(tokenizer.eos_token_id))
        assert torch.allclose(rows[1], embeds[1][picked], atol=1e-4)
    with pytest.raises(Exception, match="no word the other sources' prompts lack"):
        same = config(pair, fusion_order="text-first", fusion_text_rows="trigger", prompts=["a sks", "a sks"])
        fusion_merge(sources, fresh_sd15, same)
    with pytest.raises(Exception, match="add fusion_order text-first"):
        config(pair, fusion_text_rows="trigger", fusion_order="joint")


def test_sequential_records_each_block_with_the_blocks_before_it_fused(pair, fresh_sd15):
    """fusion_order sequential: keys and values as in text-first, the first block's layers as well (nothing
    before them is fused but the keys and values), a later block's layers solved on inputs that differ from
    text-first's; every layer still solves the normal equations on what it saw, and the pipeline is restored."""
    from merging.fusion import forward_part, reads_prompt

    before = {k: v.clone() for k, v in fresh_sd15.unet.state_dict().items()}
    sources, _ = load_sources(config(pair).source_refs())
    first = fusion_merge(sources, fresh_sd15, config(pair, fusion_ridge=RIDGE, fusion_order="text-first"))
    seq = fusion_merge(sources, fresh_sd15, config(pair, fusion_ridge=RIDGE, fusion_order="sequential"))
    parts = sorted({forward_part(p) for p in seq.recorded if not reads_prompt(p)})
    assert len(parts) >= 3 and seq.info["layers_fused"] == first.info["layers_fused"]
    changed = dict.fromkeys(parts, 0)
    for path, per_source in seq.recorded.items():
        fused = seq.factors[path].delta().double()
        difference = float((fused - first.factors[path].delta().double()).norm() / fused.norm())
        if reads_prompt(path) or forward_part(path) == parts[0]:
            assert difference < 1e-3, path
            continue
        changed[forward_part(path)] += difference > 1e-3
        inputs = [per_source[i].double() for i in range(2)]
        deltas = [s.factors()[path].delta().double() if path in s.factors() else torch.zeros_like(fused)
                  for s in sources]  # fmt: skip
        gram = sum(x.T @ x for x in inputs)
        cross = sum(t @ x.T @ x for t, x in zip(deltas, inputs))
        ridge = RIDGE * float(gram.diagonal().mean()) * torch.eye(gram.shape[0], dtype=gram.dtype)
        assert float((fused @ (gram + ridge) - cross).norm() / cross.norm()) < 1e-4, path
    assert changed[parts[-1]] > 0  # the last block saw every block before it fused
    after = fresh_sd15.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_text_first_fuses_an_sdxl_pair_on_both_encoders_embeddings(fresh_sdxl, tmp_path):
    """SDXL: the keys and values read both text encoders' embeddings side by side; text-first solves them on
    those rows (every token, or the trigger words) and records the rest with them fused."""
    from merging.fusion import reads_prompt

    a = write_lora(random_lora(fresh_sdxl, "sdxl", rank=4, seed=1, scale=0.3), tmp_path / "a.safetensors")
    b = write_lora(random_lora(fresh_sdxl, "sdxl", rank=2, seed=2, scale=0.3), tmp_path / "b.safetensors")
    values = dict(sources=[str(a), str(b)], method="fusion", prompts=["a sks shape", "a zwx shape"], out="x",
                  reference_count=1, reference_steps=2, fusion_samples=2, model="demo:sdxl")  # fmt: skip
    sources, _ = load_sources(build_config(MergeConfig, values).source_refs())
    width = fresh_sdxl.unet.config.cross_attention_dim
    for rows in ("all", "trigger"):
        outcome = fusion_merge(
            sources, fresh_sdxl, build_config(MergeConfig, values | {"fusion_text_rows": rows})
        )
        kv = {p: r for p, r in outcome.recorded.items() if reads_prompt(p)}
        assert kv and outcome.info["order"] == "text-first"
        assert all(x.shape[1] == width for per in kv.values() for x in per.values())
        assert outcome.info["layers_fused"] > len(kv)  # the other layers were recorded after them
        assert all(torch.isfinite(f.delta()).all() for f in outcome.factors.values())
