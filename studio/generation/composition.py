"""Multi-LoRA composition during denoising (Zhong et al. 2024): LoRA Switch and LoRA Composite.

Both stand in for `unet.forward` while a diffusers pipeline runs, so the pipeline still does everything
else (scheduler, classifier-free guidance, SDXL size conditioning, VAE decoding) exactly as for a plain
generation. Each LoRA brings its own prompt embeddings (its text-encoder part included), passed in as
the UNet sees them: [negative, positive] stacked when CFG is on.

- Switch: one LoRA acts at a time; the next one takes over every `tau` steps, round robin in stack order.
  The change is made in the pipeline's step-end callback, so a switch after step i applies from step i+1.
- Composite: at every step each LoRA makes its own prediction and the predictions are averaged. The
  pipeline then applies CFG to the average, which equals averaging each LoRA's CFG-guided prediction
  because guidance is linear. Batched (default): one UNet call with batch K x (uncond, cond), every sample
  running through its own adapter on shared base weights. Sequential: K calls, the reference way.

Both keep a `trace`: the adapters that acted at each UNet call (for Switch and sequential Composite read
back from the peft layers' active sets; for batched Composite the adapters given to the samples).

    switch = LoraSwitch(pool, ["lora0", "lora1"], conditionings, tau=5)
    with switch.installed(pipe.unet):
        pipe(prompt_embeds=..., callback_on_step_end=switch.on_step_end)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from studio.generation.adapters import AdapterPool

UNET = ("unet",)


@dataclass
class Conditioning:
    """One LoRA's text conditioning as the UNet receives it (CFG halves already stacked)."""

    encoder_hidden_states: torch.Tensor
    text_embeds: torch.Tensor | None = None  # SDXL's pooled text embedding; None for SD1.5


def _with_conditioning(cond: Conditioning, kwargs: dict) -> dict:
    """UNet keyword arguments with `cond` in place of the pipeline's own prompt embeddings."""
    kwargs = dict(kwargs, encoder_hidden_states=cond.encoder_hidden_states)
    if cond.text_embeds is not None:
        kwargs["added_cond_kwargs"] = dict(kwargs["added_cond_kwargs"], text_embeds=cond.text_embeds)
    return kwargs


@contextmanager
def forward_replaced(module: torch.nn.Module, forward: Callable) -> Iterator[None]:
    """Run `forward(original_forward, *args, **kwargs)` whenever `module` is called, while inside.

    The same technique accelerate's hooks use; the module's own forward is put back on exit.
    """
    had_own = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    original = module.forward

    def replacement(*args, **kwargs):
        return forward(original, *args, **kwargs)

    module.forward = replacement
    try:
        yield
    finally:
        if had_own:
            module.forward = previous
        else:
            del module.forward


def _unet_kwargs(args: tuple, kwargs: dict) -> dict:
    """The UNet's inputs as keywords (pipelines pass sample and timestep positionally)."""
    names = ("sample", "timestep", "encoder_hidden_states")
    if len(args) > len(names):
        raise TypeError(f"UNet called with {len(args)} positional arguments; expected at most {len(names)}")
    out = dict(zip(names, args))
    out.update(kwargs)
    return out


def _output(pred: torch.Tensor, return_dict: bool):
    return UNet2DConditionOutput(sample=pred) if return_dict else (pred,)


class LoraSwitch:
    """One LoRA active at a time, rotating every `tau` denoising steps (round robin in stack order)."""

    def __init__(self, pool: AdapterPool, names: Sequence[str], conds: Sequence[Conditioning], tau: int):
        self.pool, self.names, self.conds, self.tau = pool, list(names), list(conds), tau
        self.current = 0
        self.trace: list[tuple[str, ...]] = []

    def adapter_at(self, step: int) -> int:
        """Index (in the stack) of the LoRA that acts at denoising step `step`."""
        return (step // self.tau) % len(self.names)

    @contextmanager
    def installed(self, unet: torch.nn.Module) -> Iterator[None]:
        self._activate(0)
        with forward_replaced(unet, self.forward):
            yield

    def _activate(self, index: int) -> None:
        self.current = index
        self.pool.set_active([self.names[index]], UNET)

    def on_step_end(self, pipe, step: int, timestep, tensors: dict) -> dict:
        """Pipeline callback: after step `step`, let the LoRA of step `step + 1` take over."""
        following = self.adapter_at(step + 1)
        if following != self.current:
            self._activate(following)
        return {}

    def forward(self, original: Callable, *args, **kwargs):
        self.trace.append(tuple(sorted(self.pool.active_names("unet"))))
        inputs = _with_conditioning(self.conds[self.current], _unet_kwargs(args, kwargs))
        return original(**inputs)


class LoraComposite:
    """Every LoRA predicts the noise at every step; the predictions are averaged."""

    def __init__(
        self, pool: AdapterPool, names: Sequence[str], conds: Sequence[Conditioning], batched: bool = True
    ):
        self.pool, self.names, self.conds, self.batched = pool, list(names), list(conds), batched
        self.trace: list[tuple[str, ...]] = []
        # every LoRA's conditioning, stacked once for all steps: batch K x (uncond, cond)
        self._stacked = Conditioning(
            torch.cat([c.encoder_hidden_states for c in self.conds]),
            None if self.conds[0].text_embeds is None else torch.cat([c.text_embeds for c in self.conds]),
        )

    @contextmanager
    def installed(self, unet: torch.nn.Module) -> Iterator[None]:
        with forward_replaced(unet, self.forward):
            yield

    def forward(self, original: Callable, *args, **kwargs):
        inputs = _unet_kwargs(args, kwargs)
        return_dict = inputs.pop("return_dict", True)
        preds = self._batched(original, inputs) if self.batched else self._sequential(original, inputs)
        return _output(preds.mean(dim=0), return_dict)

    def _sequential(self, original: Callable, inputs: dict) -> torch.Tensor:
        """K UNet calls, one LoRA active in each (the reference implementation's way)."""
        preds, used = [], set()
        for name, cond in zip(self.names, self.conds):
            self.pool.set_active([name], UNET)
            used |= self.pool.active_names("unet")
            preds.append(original(**_with_conditioning(cond, inputs), return_dict=False)[0])
        self.trace.append(tuple(sorted(used)))
        return torch.stack(preds)

    def _batched(self, original: Callable, inputs: dict) -> torch.Tensor:
        """One UNet call on K copies of the batch; copy k runs through adapter k only."""
        k, sample = len(self.names), inputs["sample"]
        n = sample.shape[0]
        batch = dict(inputs)
        batch["sample"] = sample.repeat(k, *([1] * (sample.dim() - 1)))
        timestep = inputs["timestep"]
        if torch.is_tensor(timestep) and timestep.dim() == 1 and timestep.shape[0] == n:
            batch["timestep"] = timestep.repeat(k)
        batch["encoder_hidden_states"] = self._stacked.encoder_hidden_states
        added = inputs.get("added_cond_kwargs")
        if added:  # SDXL: size conditioning repeated per LoRA, each LoRA's own pooled text embedding
            added = {key: value.repeat(k, *([1] * (value.dim() - 1))) for key, value in added.items()}
            if self._stacked.text_embeds is not None:
                added["text_embeds"] = self._stacked.text_embeds
            batch["added_cond_kwargs"] = added
        per_sample = [name for name in self.names for _ in range(n)]
        with self.pool.per_sample(per_sample, "unet"):
            out = original(**batch, return_dict=False)[0]
        self.trace.append(tuple(sorted(set(per_sample))))
        return out.unflatten(0, (k, n))


class RegionalSampler:
    """A global prompt and regions: every step the UNet predicts the noise once per branch (the global
    prompt with the stack, then each region's prompt with the stack plus the region's LoRA), and the
    predictions are blended by the regions' boxes in latent space. Inside a region its prediction stands,
    mixed with `base` of the global one (Regional Prompter's base ratio); overlapping regions average;
    outside every region the global prediction stands.

    The blend is of whole predictions (Regional Prompter's latent mode, ComfyUI's masked area conditioning)
    rather than of cross-attention outputs, because a region's LoRA changes every layer it adapts: only
    the region's own prediction keeps that change inside the box. One UNet call per branch and step.
    With `area`, a region's branch sees only its box of the latents, as a picture of its own (ComfyUI's
    Conditioning (Set Area)): what its prompt asks for is drawn whole inside the box, at the box's size.
    """

    def __init__(
        self,
        activate: Callable[[int], None],
        conds: Sequence[Conditioning],
        boxes: Sequence[tuple[float, float, float, float]],
        base: float,
        area: bool = False,
    ):
        self.activate, self.conds, self.boxes, self.base = activate, list(conds), list(boxes), base
        self.area = area
        self.trace: list[tuple[str, ...]] = []
        self._masks: torch.Tensor | None = None

    @contextmanager
    def installed(self, unet: torch.nn.Module) -> Iterator[None]:
        with forward_replaced(unet, self.forward):
            yield

    def cells(self, height: int, width: int) -> list[tuple[slice, slice]]:
        """Each box as (rows, columns) of the latent grid (at least one latent pixel each)."""
        out = []
        for x0, y0, x1, y1 in self.boxes:
            top, left = min(int(y0 * height), height - 1), min(int(x0 * width), width - 1)
            bottom, right = max(round(y1 * height), top + 1), max(round(x1 * width), left + 1)
            out.append((slice(top, bottom), slice(left, right)))
        return out

    def masks(self, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
        """(regions, 1, 1, height, width) boxes on the latent grid."""
        if self._masks is None or self._masks.shape[-2:] != (height, width):
            masks = torch.zeros(len(self.boxes), 1, 1, height, width)
            for mask, (rows, cols) in zip(masks, self.cells(height, width)):
                mask[..., rows, cols] = 1.0
            self._masks = masks
        return self._masks.to(like.device, like.dtype)

    def region_pred(self, original: Callable, cond: Conditioning, inputs: dict, cell) -> torch.Tensor:
        """A region's prediction over the whole grid: of the whole picture, or (area) of its box alone,
        placed in the box (zeros elsewhere, where its mask is 0)."""
        if not self.area:
            return original(**_with_conditioning(cond, inputs), return_dict=False)[0]
        rows, cols = cell
        sample = inputs["sample"]
        crop = original(
            **_with_conditioning(cond, dict(inputs, sample=sample[..., rows, cols])), return_dict=False
        )[0]
        pred = torch.zeros_like(sample)
        pred[..., rows, cols] = crop
        return pred

    def forward(self, original: Callable, *args, **kwargs):
        inputs = _unet_kwargs(args, kwargs)
        return_dict = inputs.pop("return_dict", True)
        self.activate(0)
        preds = [original(**_with_conditioning(self.conds[0], inputs), return_dict=False)[0]]
        cells = self.cells(*inputs["sample"].shape[-2:])
        for branch, (cond, cell) in enumerate(zip(self.conds[1:], cells), start=1):
            self.activate(branch)
            preds.append(self.region_pred(original, cond, inputs, cell))
        self.activate(0)
        self.trace.append(tuple(str(i) for i in range(len(preds))))
        glob, regional = preds[0], torch.stack(preds[1:])
        masks = self.masks(*glob.shape[-2:], like=glob)
        cover = masks.sum(0)
        inside = (masks * regional).sum(0) / cover.clamp(min=1.0)
        inside = (1 - self.base) * inside + self.base * glob
        covered = cover.clamp(max=1.0)
        return _output(covered * inside + (1 - covered) * glob, return_dict)
