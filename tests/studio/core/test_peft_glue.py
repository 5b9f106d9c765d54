"""What the studio relies on in peft, pinned: studio.core.peft_glue is the only module that touches peft
internals, and these tests fail first when a peft release changes them."""

from __future__ import annotations

import torch
from torch import nn

from studio.core.peft_glue import delete_lora, inject_lora, lora_layers, per_sample_adapters, set_active


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(6, 5)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.other = nn.Linear(6, 5)

    def forward(self, x, img):
        return self.proj(x) + self.other(x), self.conv(img)


def factors(out, rank, inp, seed, kernel=None):
    g = torch.Generator().manual_seed(seed)
    down = torch.randn((rank, inp, *kernel) if kernel else (rank, inp), generator=g)
    up = torch.randn((out, rank, 1, 1) if kernel else (out, rank), generator=g)
    return down, up


def test_injected_factors_act_exactly_and_can_be_switched_off():
    model, x, img = Small(), torch.randn(2, 6), torch.randn(2, 3, 5, 5)
    base_lin, base_conv = (t.detach() for t in model(x, img))
    (d1, u1), (d2, u2) = factors(5, 2, 6, 1), factors(4, 3, 3, 2, (3, 3))
    state = {
        "proj.lora_A.weight": d1,
        "proj.lora_B.weight": u1,
        "conv.lora_A.weight": d2,
        "conv.lora_B.weight": u2,
    }
    layers = inject_lora(model, "a", {"proj": (2, 2.0), "conv": (3, 6.0)}, state=state, trainable=False)
    assert {name for name, _ in lora_layers(model)} == {"proj", "conv"} and len(layers) == 2
    lin, conv = model(x, img)
    torch.testing.assert_close(lin, base_lin + x @ (u1 @ d1).T)  # alpha = rank: scale 1
    expected = base_conv + 2.0 * nn.functional.conv2d(
        img, (u2.flatten(1) @ d2.flatten(1)).reshape(4, 3, 3, 3), padding=1
    )
    torch.testing.assert_close(conv, expected, atol=1e-5, rtol=1e-5)  # alpha 6 / rank 3 from the pattern
    assert not any(p.requires_grad for layer in layers for p in layer.lora_A["a"].parameters())
    for layer in layers:
        set_active(layer, [])  # writes peft's _active_adapter: the list a layer runs
        assert layer.active_adapters == []
    lin, conv = model(x, img)
    torch.testing.assert_close(lin, base_lin)
    torch.testing.assert_close(conv, base_conv)


def test_scale_merge_and_delete():
    model, x, img = Small(), torch.randn(2, 6), torch.randn(2, 3, 5, 5)
    base = model(x, img)[0].detach()
    d, u = factors(5, 2, 6, 3)
    (layer,) = inject_lora(
        model, "a", {"proj": (2, 2.0)}, state={"proj.lora_A.weight": d, "proj.lora_B.weight": u}
    )
    layer.set_scale("a", 0.25)  # the weight of a LoRA in a stack
    scaled = model(x, img)[0].detach()
    torch.testing.assert_close(scaled, base + 0.25 * x @ (u @ d).T)
    layer.merge(adapter_names=["a"])
    assert layer.merged
    torch.testing.assert_close(model(x, img)[0], scaled, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    assert not layer.merged
    delete_lora(model, "a")
    assert "a" not in layer.lora_A
    torch.testing.assert_close(model(x, img)[0], base)


def test_per_sample_adapters_run_each_sample_through_its_own_adapter():
    model, x, img = Small(), torch.randn(2, 6), torch.randn(2, 3, 5, 5)
    for name, seed in (("a", 4), ("b", 5)):
        d, u = factors(5, 2, 6, seed)
        inject_lora(model, name, {"proj": (2, 2.0)}, state={"proj.lora_A.weight": d, "proj.lora_B.weight": u})
    layer = dict(lora_layers(model))["proj"]
    assert layer.active_adapters == ["a", "b"]  # a new adapter acts beside the ones already acting
    (d, u) = factors(5, 2, 6, 6)
    inject_lora(model, "c", {"other": (2, 2.0)}, state={"other.lora_A.weight": d, "other.lora_B.weight": u})
    assert layer.active_adapters == ["a", "b"]  # ... also in layers the new adapter does not reach
    alone = {}
    for name in ("a", "b"):
        set_active(layer, [name])
        alone[name] = model(x, img)[0].detach()
    with per_sample_adapters([layer], ["a", "b"]):
        mixed = model(x, img)[0]
    torch.testing.assert_close(mixed[0], alone["a"][0])
    torch.testing.assert_close(mixed[1], alone["b"][1])


def test_training_injection_starts_from_the_base_model_with_trainable_factors():
    model, x, img = Small(), torch.randn(2, 6), torch.randn(2, 3, 5, 5)
    base = model(x, img)[0].detach()
    layers = inject_lora(model, "default", {"proj": (4, 4.0), "other": (2, 8.0)}, dropout=0.0)
    torch.testing.assert_close(model(x, img)[0], base)  # B starts at zero
    by_name = dict(lora_layers(model))
    assert by_name["proj"].r["default"] == 4 and by_name["other"].r["default"] == 2  # rank pattern
    assert by_name["other"].scaling["default"] == 4.0  # alpha pattern: 8 / 2
    assert all(layer.lora_A["default"].weight.requires_grad for layer in layers)
    assert not model.proj.base_layer.weight.requires_grad  # peft freezes the base weights
