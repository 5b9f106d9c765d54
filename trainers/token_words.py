"""Trigger words learnt as token embeddings beside the LoRA ("pivotal tuning", as diffusers' advanced
DreamBooth script and OneTrainer's embeddings do; orthogonal adaptation trains them too).

Each word becomes a new token of every tokenizer, starting from the embedding of what the word read as
before (the mean of its old tokens), so training starts from the model's own reading. The text encoders'
tables stay frozen: a forward hook on each input-embedding layer puts the learnt vectors in place of the new
tokens' rows, so only those vectors train (their own optimizer group, no weight decay). They are saved in
the LoRA file as A1111's bundled embeddings (studio.core.lora_embeddings), which generation loads with the
LoRA.
"""

from __future__ import annotations

import torch

from studio.core.errors import ConfigError, StudioError
from studio.core.lora_embeddings import Embeddings
from studio.core.lora_keys import BUNDLE_ENCODERS
from studio.core.pipeline_words import add_word_tokens


class TokenWords:
    """The learnt vectors of `words` for each (tokenizer, text encoder) pair, hooked into the encoders."""

    def __init__(self, words: list[str], tokenizers: list, text_encoders: list):
        self.words = list(words)
        self.params: dict[str, torch.nn.Parameter] = {}
        self._hooks = []
        self._tokenizer = tokenizers[0]
        for name, tokenizer, encoder in zip(BUNDLE_ENCODERS, tokenizers, text_encoders):  # clip_l, clip_g
            table = encoder.get_input_embeddings()
            with torch.no_grad():  # before the words are added: what each read as until now
                init = torch.stack([table.weight[old_ids(tokenizer, w)].mean(0) for w in self.words])
            start = self._add_tokens(tokenizer, encoder)
            table = encoder.get_input_embeddings()  # resized
            self.params[f"token_words.{name}"] = torch.nn.Parameter(init.float().clone())
            self._hooks.append(
                table.register_forward_hook(self._hook(self.params[f"token_words.{name}"], start))
            )

    def _add_tokens(self, tokenizer, encoder) -> int:
        for word in self.words:  # their form is checked with the config (TrainConfig.check)
            if word in tokenizer.get_vocab():
                raise ConfigError(
                    f"token_words: {word!r} is already a token of this model; choose a rarer word"
                )
        return add_word_tokens(tokenizer, encoder, self.words)[0]

    @staticmethod
    def _hook(param: torch.nn.Parameter, start: int):
        def replace(module, inputs, output):
            ids = inputs[0]
            new = (ids >= start) & (ids < start + param.shape[0])
            if not bool(new.any()):
                return output
            learnt = param.to(output.dtype)[(ids - start).clamp(0, param.shape[0] - 1)]
            return torch.where(new[..., None], learnt, output)

        return replace

    def group(self, lr: float) -> dict:
        """The optimizer group of the learnt vectors."""
        return {"params": list(self.params.values()), "lr": lr, "weight_decay": 0.0}

    def check_in_captions(self, captions: list[str]) -> None:
        """Refuse a word no caption says (as a word of its own): its vectors would never train."""
        ids = self._tokenizer.convert_tokens_to_ids(self.words)
        read = {i for c in set(captions) for i in self._tokenizer(c, truncation=True).input_ids}
        missing = [w for w, i in zip(self.words, ids) if i not in read]
        if missing:
            raise ConfigError(
                f"token_words: {', '.join(map(repr, missing))} is in none of the captions (nor the instance "
                "prompt, which stands for a missing caption); put the word in them, or leave it out of token_words"
            )

    def sync_gradients(self, accelerator) -> None:
        """Average the vectors' gradients over the processes, as DDP does for the prepared models' (the
        vectors live outside them); a process whose batch lacked the words adds zeros."""
        if accelerator.num_processes == 1:
            return
        for param in self.params.values():
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
            param.grad = accelerator.reduce(grad, reduction="mean")

    def check_same_everywhere(self, accelerator) -> None:
        """Every process must hold the same vectors before the main one saves them."""
        if accelerator.num_processes == 1:
            return
        for name, param in self.params.items():
            every = accelerator.gather(param.detach()[None])
            if not bool((every == every[:1]).all()):
                raise StudioError(
                    f"{name}: the processes' learnt word vectors differ; train the words in one process"
                )

    def embeddings(self) -> Embeddings:
        """{word: {"clip_l": (1, width), ...}} for the LoRA file."""
        return {
            word: {
                key.removeprefix("token_words."): p.detach().float()[i : i + 1].clone()
                for key, p in self.params.items()
            }
            for i, word in enumerate(self.words)
        }


def old_ids(tokenizer, word: str) -> list[int]:
    """The token ids `word` read as before it was added (without start and end tokens)."""
    return tokenizer(word, add_special_tokens=False).input_ids
