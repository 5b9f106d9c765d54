"""TIES, DARE and magnitude-pruned merges: on each module's dense delta, then re-factorised by SVD.

The arithmetic is peft's (peft.utils.merge_utils, the code behind `add_weighted_adapter(combination_type=
"ties" | "dare_linear" | "dare_ties" | "magnitude_prune")`), re-written here to stream: peft stacks every
source's whole delta and makes several full-size masks; here each module is formed a block of rows at a
time from the sources' factors, pruned, combined and written into the merged matrix while the block is
still in the processor's cache, and the magnitude threshold comes from a sample of entries computed from
the factors (tests check all of it against peft's functions):
- ties:      keep the top `density` entries by magnitude, elect each entry's sign, average the agreeing ones;
- dare:      drop entries at random (keep `density`, rescale by 1/density), weighted sum;
- dare-ties: DARE's random drop, then TIES' sign election and averaging;
- magnitude: keep the top `density` entries by magnitude, weighted sum.
They act on the exact per-source deltas (alpha/rank folded in). The result is full-rank and sparse, so it
is re-factorised to `rank` by SVD and the error of that step is reported per module; the SVD's range basis
is the sources' own up factors plus a small random sketch (_truncate_in_span), which costs one product with
the merged matrix instead of a randomized SVD's four and keeps the result closer to the exact sum. Modules are merged one
at a time (never the whole dense model), on `device` (a GPU makes it many times faster than a CPU). Random
draws (DARE's drop, the threshold's sample, the SVD's) come from generators seeded per module: the same seed
gives the same file, with any number of workers.

    >>> factors, info = dense_merge(sources, "ties", rank=16, density=0.5)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch

from merging.linear import OVERSAMPLE, truncate_dense, truncation_error
from merging.sources import Factors, MergeSource, balanced_factors, require_nonempty, union_paths

# Above this many entries the magnitude threshold is the quantile of a uniform random sample of this size: an
# exact k-th value over an SDXL feed-forward delta (13 M entries) costs seconds; the sample's threshold keeps
# the asked share of entries to within about 0.2 % of them (standard deviation; 0.1 % with four times the
# sample, at four times the cost). A sample of rows and columns instead of entries is cheaper but 5-20 times
# less precise on LoRA deltas.
THRESHOLD_SAMPLE = 1 << 16
# Entries of one block of rows: 1 MiB of float32 per source, small enough to stay in cache through every step.
BLOCK = 1 << 18


def _threshold(f: Factors, density: float, generator: torch.Generator) -> float | None:
    """The magnitude below which `density` of the delta up @ down is dropped (None: keep everything).

    peft's magnitude_based_pruning keeps the top int(density * n) entries; the same k-th value, exact up to
    THRESHOLD_SAMPLE entries, above it of a uniform sample of entries, each one row of up times one column
    of down (so the delta is not formed)."""
    rows, cols = f.up.shape[0], f.down.shape[1]
    n = rows * cols
    if int(density * n) >= n:
        return None
    if int(density * n) == 0:
        return float("inf")
    if n > THRESHOLD_SAMPLE:
        pick = torch.randint(n, (THRESHOLD_SAMPLE,), generator=generator).to(f.up.device)
        rows_picked = f.up.index_select(0, pick.div(cols, rounding_mode="floor"))
        cols_picked = f.down.T.contiguous().index_select(0, pick.remainder_(cols))
        magnitudes = rows_picked.mul_(cols_picked).sum(1).abs_()
    else:
        magnitudes = f.delta().abs_().flatten()
    return _kth(magnitudes, max(1, round((1 - density) * magnitudes.numel())))


def _kth(values: torch.Tensor, k: int) -> float:
    """The k-th smallest value (1-based). numpy's introselect is about ten times faster than
    torch.kthvalue on a CPU; the value is the same."""
    if values.device.type != "cpu":
        return float(values.kthvalue(k).values)
    return float(np.partition(values.numpy(), k - 1)[k - 1])


_buffers = threading.local()


def _buffer(name: str, shape: tuple[int, ...], device) -> torch.Tensor:
    """A work tensor of this shape, the same memory from one block and module to the next (per thread): a
    fresh tensor per operation costs more in page faults than the arithmetic on it."""
    numel = math.prod(shape)
    store = getattr(_buffers, "store", None)
    if store is None:
        store = _buffers.store = {}
    flat = store.get(name)
    if flat is None or flat.numel() < numel or flat.device != torch.device(device):
        flat = store[name] = torch.empty(numel, device=device)
    return flat[:numel].view(shape)


class _Work:
    """One module's block buffers: a block of each source's delta, the exact sum and three scratch tensors."""

    def __init__(self, sources: int, shape: tuple[int, int], device) -> None:
        self.tasks = [_buffer(f"task{i}", shape, device) for i in range(sources)]
        self.exact, self.a, self.b, self.c = (_buffer(n, shape, device) for n in ("exact", "a", "b", "c"))

    def view(self, rows: int):
        return (
            [t[:rows] for t in self.tasks],
            self.exact[:rows],
            (self.a[:rows], self.b[:rows], self.c[:rows]),
        )


def _trim(task: torch.Tensor, threshold: float | None, scratch: torch.Tensor) -> torch.Tensor:
    """Keep the entries above the magnitude threshold (peft's magnitude_based_pruning), in place."""
    if threshold is None:
        return task
    return task.mul_(torch.abs(task, out=scratch).gt_(threshold))


def _drop(
    task: torch.Tensor, density: float, generator: torch.Generator, scratch: torch.Tensor
) -> torch.Tensor:
    """DARE's random drop: keep each entry with probability `density`, rescaled by 1/density, in place.

    peft's random_pruning draws a Bernoulli mask; comparing a uniform draw gives the same distribution
    about 2.5x faster on a CPU."""
    if density >= 1:
        return task
    if scratch.device.type == "cpu":
        torch.rand(task.shape, generator=generator, out=scratch)
    else:  # the generator is a CPU one: the same draws on every device
        scratch.copy_(torch.rand(task.shape, generator=generator))
    return task.mul_(scratch.lt_(density)).div_(density)


def _combine(tasks: list[torch.Tensor], weights: list[float], sign: str | None, out: torch.Tensor, work=()):
    """Weighted sum into `out`; with `sign`, TIES' election (peft's methods: "total", the sign of the sum of
    the pruned deltas; "frequency", of the sum of their signs) and the mean of the weighted entries that
    agree with it (peft's disjoint_merge), as running sums over the sources (`work`: three scratch tensors)."""
    if sign is None:
        torch.mul(tasks[0], weights[0], out=out)
        for task, w in zip(tasks[1:], weights[1:]):
            out.add_(task, alpha=w)
        return out
    majority, agree, count = work
    for i, task in enumerate(tasks):
        vote = task if sign == "total" else torch.sign(task, out=agree)
        majority.copy_(vote) if i == 0 else majority.add_(vote)
    majority.ge_(0).mul_(2).sub_(1)  # +1 / -1; peft counts a zero sum as positive
    out.zero_(), count.zero_()
    for task, w in zip(tasks, weights):
        torch.sign(task, out=agree).eq_(majority)  # zeros never agree
        out.addcmul_(task, agree, value=w)
        count.add_(agree)
    return out.div_(count.clamp_(min=1.0))


def dense_merge(
    sources: list[MergeSource],
    method: str,
    *,
    rank: int,
    density: float = 0.5,
    sign_method: str = "total",
    seed: int = 0,
    solver: str = "auto",
    device: str | torch.device = "cpu",
    workers: int | None = None,
) -> tuple[dict[str, Factors], dict[str, dict[str, float]]]:
    """Merge with `method` and re-factorise; returns (factors, {path: {"pruning": e1, "svd": e2}}).

    "pruning" is how far the pruned merge is from the exact weighted sum (relative Frobenius error),
    "svd" how much of the pruned merge the rank-`rank` factors lose. `workers`: threads merging whole
    modules side by side, each on one core (default: on a CPU, one per torch thread; the work streams
    through memory, so two single-threaded modules beat one module on two threads by about 1.5x).
    """
    if method not in ("ties", "dare", "dare-ties", "magnitude"):
        raise ValueError(f"unknown dense merge method {method!r}")
    out, info = {}, {}
    paths = union_paths(sources)

    def merge_module(index: int, path: str) -> None:
        present = [s for s in sources if path in s.factors()]
        parts = [Factors(*(t.to(device) for t in s.own_factors(path))) for s in present]
        weights = [s.module_weight(path) for s in present]
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)  # per module, independent
        omega = _sketch_matrix(parts, rank, generator) if solver != "full" else None
        merged, pruning, sketch, total = _merge_module(
            parts, weights, method, density, sign_method, generator, omega
        )
        if sketch is None:
            factors, svd_error = truncate_dense(merged, rank, solver, seed=seed + index)
        else:
            factors, svd_error, pruning = _truncate_in_span(merged, parts, weights, sketch, total, rank)
        out[path] = Factors(factors.up.cpu(), factors.down.cpu())
        info[path] = {"pruning": pruning, "svd": svd_error}

    if workers is None:
        workers = torch.get_num_threads() if torch.device(device).type == "cpu" else 1
    if workers > 1:  # modules are independent: each worker merges whole modules
        from concurrent.futures import ThreadPoolExecutor

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(merge_module, range(len(paths)), paths))
        finally:
            torch.set_num_threads(threads)
    else:
        for index, path in enumerate(paths):
            merge_module(index, path)
    out = {p: out[p] for p in paths if p in out}
    info = {p: info[p] for p in paths if p in info}
    require_nonempty(out, sources)
    return out, info


def _merge_module(
    parts: list[Factors], weights: list[float], method: str, density: float, sign: str, generator, omega=None
):
    """One module's pruned merge, a block of rows at a time. Returns (merged, pruning, sketch, ||merged||^2):
    without `omega`, pruning is the relative distance from the exact weighted sum and sketch None; with it,
    sketch is merged @ omega (each block multiplied while in cache) and pruning is left to
    _truncate_in_span."""
    rows, cols = parts[0].up.shape[0], parts[0].down.shape[1]
    trims = method in ("ties", "magnitude")
    elects = sign if method in ("ties", "dare-ties") else None
    thresholds = [_threshold(f, density, generator) for f in parts] if trims else []
    merged = _buffer("merged", (rows, cols), parts[0].up.device)
    sketch = None if omega is None else torch.empty(rows, omega.shape[1], device=merged.device)
    step = min(rows, max(1, BLOCK // max(cols, 1)))
    work = _Work(len(parts), (step, cols), merged.device)
    diff, norm, total = 0.0, 0.0, 0.0
    for r0 in range(0, rows, step):
        n = min(step, rows - r0)
        tasks, exact, scratch = work.view(n)
        for f, task in zip(parts, tasks):
            torch.mm(f.up[r0 : r0 + n], f.down, out=task)
        if sketch is None:
            _combine(tasks, weights, None, exact)
        for i, task in enumerate(tasks):
            _trim(task, thresholds[i], scratch[0]) if trims else _drop(task, density, generator, scratch[0])
        block = _combine(tasks, weights, elects, merged[r0 : r0 + n], scratch)
        total += float(torch.linalg.vector_norm(block)) ** 2
        if sketch is not None:
            torch.mm(block, omega, out=sketch[r0 : r0 + n])
            continue
        norm += float(torch.linalg.vector_norm(exact)) ** 2
        diff += float(torch.linalg.vector_norm(exact.sub_(block))) ** 2
    pruning = (diff / norm) ** 0.5 if norm > 0 and sketch is None else 0.0
    return merged, pruning, sketch, total


def _sketch_matrix(parts: list[Factors], rank: int, generator) -> torch.Tensor | None:
    """The random test matrix of _truncate_in_span (in, extra columns), or None where the sources' factors
    are too wide for it (LoHa's r1 * r2, full LoKr matrices): then the merged matrix gets a randomized SVD."""
    rows, cols = parts[0].up.shape[0], parts[0].down.shape[1]
    ranks = sum(f.rank for f in parts)
    extra = max(OVERSAMPLE, rank + OVERSAMPLE - ranks)
    if 4 * (ranks + extra) > min(rows, cols):
        return None
    return torch.randn(cols, extra, generator=generator).to(parts[0].up.device)


def _truncate_in_span(
    merged, parts, weights, sketch, total: float, rank: int
) -> tuple[Factors, float, float]:
    """Rank-`rank` factors of the pruned merge M, their relative error, and M's relative distance from the
    exact weighted sum E = U V (U = [w_i up_i], V = [down_i]), from one product Q^T M.

    A randomized SVD needs a basis for M's dominant columns; pruning keeps M close to E, whose columns lie
    in span(U), so Q = orth([U, M @ omega]) is that basis with a few random directions for the rest,
    without the power iterations over M. And because E = Q Q^T E, <E, M> = <Q^T U V, Q^T M>: the pruning
    error comes from the same small matrices, without forming E. (A randomized SVD with one power
    iteration costs four products with M; this costs one, plus the sketch taken block by block.)"""
    up = torch.cat([f.up * w for f, w in zip(parts, weights)], 1)
    down = torch.cat([f.down for f in parts], 0)
    basis = torch.linalg.qr(torch.cat([up, sketch], 1)).Q
    core = basis.T @ merged
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    k = min(rank, int(s.numel()))
    factors = balanced_factors(basis @ u[:, :k], s[:k], vh[:k])
    svd_error = truncation_error(merged, factors, s[:k], total)
    exact = float(((up.T @ up).double() * (down @ down.T).double()).sum())
    inner = float(((basis.T @ up) @ down).double().mul_(core.double()).sum())
    distance = exact - 2 * inner + total
    if exact == 0:
        return factors, svd_error, 0.0
    if distance <= 1e-4 * exact:  # too small for the difference of sums: measure it
        distance = sum(float((up[r : r + 4096] @ down).sub_(merged[r : r + 4096]).norm()) ** 2
                       for r in range(0, up.shape[0], 4096))  # fmt: skip
    return factors, svd_error, (max(distance, 0.0) / exact) ** 0.5
