"""LoRA adapters living inside a pipeline for inference: loaded once, weighted per block, switched, fused.

Every LoRA file becomes one named peft adapter in the UNet and text encoders of a pipeline. The pool
remembers which file (path, mtime, size) each adapter came from, so asking for the same file again costs
nothing: no read, no injection. Weights are applied exactly, per module, by setting each peft layer's
scale to `weight * block_weight[block_of(module)]`; modules whose scale is 0 are dropped from the layer's
active set so that they cost no compute either.

    pool = AdapterPool(pipe, "sd15")
    style = pool.load("style.safetensors")
    pool.activate([(style, 0.8, parse_block_weights("OUTALL", "sd15"))])
    image = pipe("a cat").images[0]

Why peft layers are driven directly instead of diffusers' `set_adapters`: it walks every module on each
call (16-100 ms) and its per-block dict form reaches only `*.attentions.N` modules, silently ignoring
blocks without attention; `set_scale` on a pre-collected list of layers is exact and takes ~0.35 ms.
Why `inject_adapter_in_model` instead of `pipe.load_lora_weights`: it is the same peft call diffusers makes,
works alike for the UNet and both text encoders, and is ~1.5x faster without diffusers' format sniffing.
LoRA, LoCon and Tucker modules become peft LoRA layers; LoHa, LoKr and DoRA modules become DeltaLayers
(delta_layers.py), which the pool drives the same way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from studio.core.blocks import block_of
from studio.core.errors import BadFileError
from studio.core.families import COMPONENTS, Family
from studio.core.keys import canonical_path
from studio.core.lora_embeddings import Embeddings, union
from studio.core.lora_files import LoraSet, check_against_model, fit_to_model, read_lora
from studio.core.modules import model_module_shapes, model_path, resolve_module
from studio.core.peft_glue import (
    LoraLayer,
    delete_lora,
    inject_lora,
    lora_layers,
    per_sample_adapters,
    set_active,
)
from studio.core.pipeline_words import PipelineWords
from studio.generation.delta_layers import DeltaLayer

# (resolved path, mtime in ns, size): a file that changes on disk gets a new key and is read again.
FileKey = tuple[str, int, int]


def file_key(path: str | Path) -> FileKey:
    """Identity of a file's current contents without reading it.

    >>> file_key("style.safetensors")  # doctest: +SKIP
    ('/home/me/loras/style.safetensors', 1718000000000000000, 151_123_456)
    """
    resolved = Path(path).expanduser().resolve()
    try:
        st = resolved.stat()
    except OSError:
        raise BadFileError(f"{path}: no such LoRA file.") from None
    if not resolved.is_file():
        raise BadFileError(f"{path}: not a file.")
    return (str(resolved), st.st_mtime_ns, st.st_size)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a whole file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Adapter:
    """One LoRA file injected into a pipeline under a peft adapter name."""

    name: str
    key: FileKey
    sha256: str
    family: Family | None
    blocks: tuple[str, ...]  # block ids the file has modules in
    is_b_lora: bool
    # every layer (peft LoraLayer or DeltaLayer) holding this adapter, with the block id of its module
    layers: list[tuple[LoraLayer | DeltaLayer, str | None]] = field(default_factory=list, repr=False)
    kinds: tuple[str, ...] = ()  # LoRA, LoCon, LoHa, LoKr, DoRA ...
    embeddings: Embeddings = field(default_factory=dict, repr=False)  # token embeddings the file bundles

    @property
    def path(self) -> Path:
        return Path(self.key[0])


# What the pool is told to run: an adapter, its weight, and {block id: weight} (None = 1 everywhere).
StackEntry = tuple[Adapter, float, Mapping[str, float] | None]


class AdapterPool:
    """The LoRA adapters loaded into one pipeline, with their weights and fused state.

    `max_adapters` bounds memory: once a stack is activated, least recently used adapters outside it are
    removed from the pipeline until at most max_adapters remain (a removed file is read again if needed).
    """

    def __init__(self, pipe, family: Family, *, max_adapters: int = 8, allow_pickle: bool = False):
        self.pipe = pipe
        self.family = family
        self.max_adapters = max_adapters
        self.allow_pickle = allow_pickle
        self.reads = 0  # LoRA files read from disk so far
        self._adapters: dict[tuple[FileKey, int], Adapter] = {}  # insertion order = least recent first
        self._counter = 0
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self._layers: dict[str, list[tuple[str, LoraLayer | DeltaLayer]]] = {}  # component -> (path, layer)
        self._delta_layers: dict[str, DeltaLayer] = {}  # canonical module path -> its DeltaLayer
        self._in_use: list[str] = []  # adapters of the current stack, in stack order
        self.fused_signature: tuple | None = None
        self.words = PipelineWords(pipe, family)  # the stack's bundled token embeddings, loaded

    # ---------------------------------------------------------------------------------------------
    # loading

    def load(self, path: str | Path, slot: int = 0) -> Adapter:
        """The adapter for a LoRA file, injecting it on first use. `slot` > 0 gives the same file a second
        adapter (the same file twice in one stack, e.g. a B-LoRA used for both content and style)."""
        key = (file_key(path), slot)
        if key in self._adapters:
            self._adapters[key] = self._adapters.pop(key)  # mark as most recently used
            return self._adapters[key]
        stale = [k for k in self._adapters if k[0][0] == key[0][0] and k[1] == slot]
        for old in stale:  # the file changed on disk since it was loaded
            self._remove(self._adapters.pop(old))
        lora = read_lora(path, allow_pickle=self.allow_pickle)
        self.reads += 1
        adapter = self._inject(lora, key[0])
        self._adapters[key] = adapter
        return adapter

    def _inject(self, lora: LoraSet, key: FileKey) -> Adapter:
        if self._shapes is None:
            self._shapes = model_module_shapes(self.pipe)
        check_against_model(lora, self.family, self._shapes)  # FamilyMismatchError / KeyMismatchError
        fitted = fit_to_model(lora, self._shapes)
        name = f"lora{self._counter}"
        self._counter += 1
        self.unfuse()
        try:
            for component in COMPONENTS:
                modules = {  # module names inside the component (CLIP's "text_model." level varies)
                    model_path(self.pipe, p): m.lowrank()
                    for p, m in fitted.modules.items()
                    if p.startswith(component + ".") and m.is_lowrank
                }
                if modules:
                    _inject(getattr(self.pipe, component), name, modules)
            for path, m in fitted.modules.items():
                if not m.is_lowrank:
                    self._delta_layer(path).add(name, m)
        except Exception:
            self._delete(name)  # no half-injected adapter stays behind
            raise
        self._collect_layers()
        layers = [
            (layer, block_of(path))
            for found in self._layers.values()
            for path, layer in found
            if _holds(layer, name)
        ]
        return Adapter(
            name=name,
            key=key,
            sha256=file_sha256(key[0]),
            family=lora.family,
            blocks=tuple(lora.blocks),
            is_b_lora=lora.is_b_lora,
            layers=layers,
            kinds=tuple(lora.kinds),
            embeddings=lora.embeddings,
        )

    def _delta_layer(self, path: str) -> DeltaLayer:
        if path not in self._delta_layers:
            module = resolve_module(self.pipe, path)
            self._delta_layers[path] = DeltaLayer(getattr(module, "base_layer", module))
        return self._delta_layers[path]

    def _collect_layers(self) -> None:
        """Every layer by component, DeltaLayers first: they merge against the unmerged weight (DoRA needs
        it), so they fuse before and unfuse after peft's layers."""
        self._layers = {}
        for component in COMPONENTS:
            model = getattr(self.pipe, component, None)
            if model is None:
                continue
            deltas = [(p, d) for p, d in self._delta_layers.items() if p.startswith(component + ".")]
            peft = [(canonical_path(component, n), layer) for n, layer in lora_layers(model)]
            self._layers[component] = deltas + peft

    def _evict(self) -> None:
        """Remove least recently used adapters beyond max_adapters, never one of the current stack."""
        while len(self._adapters) > self.max_adapters:
            victim = next((k for k, a in self._adapters.items() if a.name not in self._in_use), None)
            if victim is None:
                return
            self._remove(self._adapters.pop(victim))

    def _remove(self, adapter: Adapter) -> None:
        self.unfuse()
        self._in_use = [n for n in self._in_use if n != adapter.name]
        self.set_active(self._in_use)
        self._delete(adapter.name)
        adapter.layers.clear()

    def _delete(self, name: str) -> None:
        for component in COMPONENTS:
            model = getattr(self.pipe, component, None)
            if model is not None:
                delete_lora(model, name)
        for path, layer in list(self._delta_layers.items()):
            layer.remove(name)
            if not layer.adapters:
                layer.close()
                del self._delta_layers[path]
        self._collect_layers()

    @property
    def stack_names(self) -> list[str]:
        """Adapters of the current stack (the last `activate`), in stack order."""
        return list(self._in_use)

    @property
    def adapters(self) -> list[Adapter]:
        """Adapters currently in the pipeline, least recently used first."""
        return list(self._adapters.values())

    # ---------------------------------------------------------------------------------------------
    # weights and active sets

    def activate(self, stack: Sequence[StackEntry], evict: bool = True, words: bool = True) -> None:
        """Make exactly `stack` act, each module at weight * block weight; other adapters stop acting
        (and, with `evict`, the least recently used beyond max_adapters leave the pipeline). With `words`,
        the token embeddings the stack's files bundle are loaded (and others unloaded); without, they stay
        as they are (a switch of the UNet's adapters between denoising steps, after the prompts are encoded)."""
        self.unfuse()
        for adapter, weight, block_weights in stack:
            for layer, block in adapter.layers:
                factor = block_weights.get(block, 1.0) if block_weights and block else 1.0
                layer.set_scale(adapter.name, float(weight) * factor)
        self._in_use = [a.name for a, _, _ in stack]
        self.set_active(self._in_use)
        if words:
            bundled = [(str(a.path), a.embeddings) for a, _, _ in stack if a.embeddings]
            self.words.use(union(bundled), {w: label for label, e in bundled for w in e})
        if evict:
            self._evict()

    def set_active(self, names: Sequence[str], components: Sequence[str] = COMPONENTS) -> None:
        """Let only `names` act (at their current scales) in the given components' layers.

        A layer runs an adapter only where its scale is non-zero, so block weight 0 costs nothing.
        """
        for component in components:
            for _, layer in self._layers.get(component, ()):
                acting = [n for n in names if layer.scaling.get(n, 0.0) != 0.0]
                layer.set_active(acting) if isinstance(layer, DeltaLayer) else set_active(layer, acting)

    def active_names(self, component: str = "unet") -> set[str]:
        """Adapters that act in at least one layer of a component right now (read from the layers)."""
        return {n for _, layer in self._layers.get(component, ()) for n in layer.active_adapters}

    # ---------------------------------------------------------------------------------------------
    # fusing (merging the active deltas into the base weights for base-model speed)

    def fuse(self, signature: tuple) -> None:
        """Merge every active adapter into the base weights; `signature` names what was fused."""
        if self.fused_signature == signature:
            return
        self.unfuse()
        for layers in self._layers.values():
            for _, layer in layers:
                if layer.active_adapters:
                    layer.merge(adapter_names=list(layer.active_adapters))
        self.fused_signature = signature

    def unfuse(self) -> None:
        if self.fused_signature is None:
            return
        for layers in self._layers.values():
            for _, layer in layers:
                if layer.merged:
                    layer.unmerge()
        self.fused_signature = None

    # ---------------------------------------------------------------------------------------------
    # per-sample adapters (batched composite)

    @contextmanager
    def per_sample(self, names: Sequence[str], component: str = "unet") -> Iterator[None]:
        """Run each sample of the next forward passes through its own adapter: sample i uses names[i]
        (studio.core.peft_glue.per_sample_adapters)."""
        self.unfuse()
        layers = self._layers.get(component, ())
        deltas = [layer for _, layer in layers if isinstance(layer, DeltaLayer)]
        for layer in deltas:
            layer.sample_names = list(names)
        try:
            with per_sample_adapters(
                [layer for _, layer in layers if not isinstance(layer, DeltaLayer)], names
            ):
                yield
        finally:
            for layer in deltas:
                layer.sample_names = None


def _holds(layer: LoraLayer | DeltaLayer, name: str) -> bool:
    return layer.holds(name) if isinstance(layer, DeltaLayer) else name in layer.lora_A


def _inject(model, name: str, modules: dict) -> None:
    """Add one adapter to one model (UNet or text encoder) with the exact, frozen factors of `modules`.

    Each module's alpha/rank is folded into its up factor, so peft's own scale is 1 (alpha = rank) and
    `set_scale` sets the weight directly.
    """
    param = next(model.parameters())
    state = {}
    for path, m in modules.items():
        state[f"{path}.lora_A.weight"] = m.down.to(param.device, param.dtype)
        state[f"{path}.lora_B.weight"] = (m.up * m.scale).to(param.device, param.dtype)
    targets = {path: (m.rank, float(m.rank)) for path, m in modules.items()}
    inject_lora(model, name, targets, state=state, trainable=False)
