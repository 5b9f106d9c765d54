"""One Adam step on ZipLoRA's mergers, logged, with the paper's early stop once the mergers no longer overlap."""

from __future__ import annotations

from collections.abc import Callable

import torch

from merging.config import MergeConfig
from studio.core.errors import StudioError

Progress = Callable[[dict], None]


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    loss: torch.Tensor,
    recon: torch.Tensor,
    similarity: torch.Tensor,
    pairs: int,
    total: int,
    cfg: MergeConfig,
    history: list[dict],
    progress: Progress | None,
    lr_option: str = "--lr",
) -> str | None:
    """One step on the mergers, logged into `history`; returns why to stop early, or None to go on.

    Shared by the whole-model fit (merging/ziplora.py) and the fast layer-wise fit (merging/ziplora_fast.py).
    A loss that is no longer finite stops the merge before the mergers take it in: nothing is written
    (`lr_option`: the option that sets this fit's rate, named in the error).
    """
    if not bool(torch.isfinite(loss.detach())):
        lr = optimizer.param_groups[0]["lr"]
        raise StudioError(
            f"ZipLoRA's loss became {float(loss.detach())} at step {len(history) + 1}: the fit diverged and "
            f"nothing was written. Lower {lr_option} (now {lr:g}), or run the base model in fp32 (--dtype fp32)"
        )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    mean_sim = float(similarity.detach()) / max(pairs, 1)  # before this step's update
    history.append(
        {
            "step": len(history) + 1,
            "loss": float(loss.detach()),
            "reconstruction": float(recon.detach()),
            "similarity": mean_sim,
        }
    )
    if progress:
        progress({"steps": total, **history[-1]})
    if mean_sim < cfg.stop_similarity:
        return f"mergers no longer overlap (mean overlap {mean_sim:.2g} < {cfg.stop_similarity:g})"
    return None
