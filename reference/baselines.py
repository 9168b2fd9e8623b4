"""Two baselines that recent benchmarks find hard to beat: random pruning and spatial pooling.

Registered like any method (``reference.attach(model, "random_pruning", keep=64)``) and
marked ``baseline = True``; they have no catalog entry. Both keep the prefix tokens
and act on the non-prefix tokens only; both give a sample the same result in any batch.

- ``random_pruning``: keeps ``keep`` tokens drawn uniformly without replacement, in
  their spatial order. The draw comes from a generator seeded by ``seed``, one noise
  row for every sample, so a run is reproducible.
- ``spatial_pooling``: averages the patch grid over ``h x w`` non-overlapping cells
  (``keep = h * w``, the squarest split of ``keep`` whose sides fit the grid), in
  row-major order; a pooled token's size is the number of patches it holds. The
  grid is ``signals.state["grid"]`` (``(1, h, w)``) where a host gives it, else the
  squarest grid of the token count.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from reference.core import Reduction, Signals, TokenReducer, empty_batch, identity, keep_tokens
from reference.registry import register


class Baseline(TokenReducer):
    """A reference point with no paper: keep ``keep`` of the non-prefix tokens."""

    baseline = True
    basis = "a baseline (no paper)"
    where = "mid"

    def __init__(self, keep: int = 64):
        super().__init__()
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.keep = keep

    def budget(self, n: int, prefix: int) -> tuple[int, int]:
        out = n if self.keep >= n - prefix else prefix + self.keep
        return out, out

    def keeps_all(self, n: int, prefix: int) -> bool:
        return self.keep >= n - prefix

    @classmethod
    def bench_setting(cls, keep: int, n_image: int, cfg) -> dict:
        return {"vision": cls(keep=keep)}


@register
class RandomPruning(Baseline):
    """Keep ``keep`` tokens drawn uniformly at random (seeded), in spatial order."""

    catalog_id = "random_pruning"
    kind = "pruning"
    test_configs: ClassVar[dict[str, dict]] = {"zero": {"keep": 10_000}, "some": {"keep": 5}}

    def __init__(self, keep: int = 64, seed: int = 0):
        super().__init__(keep)
        self.seed = seed

    def forward(self, x: Tensor, signals: Signals) -> Reduction:
        b, p, m = x.shape[0], signals.prefix, x.shape[1] - signals.prefix
        if self.keep >= m:
            return identity(x, signals.size)
        if b == 0:
            return empty_batch(x, signals.size, p + self.keep)
        noise = torch.rand(m, generator=torch.Generator().manual_seed(self.seed))
        chosen = noise.topk(self.keep).indices.to(x.device) + p  # [K], the same for every sample
        return keep_tokens(x, signals.size, p, chosen.expand(b, -1))


def cells(keep: int, h: int, w: int) -> tuple[int, int]:
    """The squarest ``(rows, cols)`` with ``rows * cols == keep`` that fits an ``h x w`` grid."""
    for rows in sorted(range(1, keep + 1), key=lambda r: (abs(r - math.sqrt(keep)), r)):
        if keep % rows == 0 and rows <= h and keep // rows <= w:
            return rows, keep // rows
    raise ValueError(f"keep must split into cells of a {h}x{w} grid, got {keep}")


@register
class SpatialPooling(Baseline):
    """Average the patch grid over ``keep`` non-overlapping cells."""

    catalog_id = "spatial_pooling"
    kind = "pooling"
    test_configs: ClassVar[dict[str, dict]] = {"zero": {"keep": 10_000}, "some": {"keep": 4}}

    def forward(self, x: Tensor, signals: Signals) -> Reduction:
        b, n, c = x.shape
        p, m = signals.prefix, n - signals.prefix
        if self.keep >= m:
            return identity(x, signals.size)
        grid = signals.state.get("grid")  # (t, h, w) where a host knows it (Qwen-VL)
        if grid is not None and grid[0] == 1 and grid[1] * grid[2] == m:
            h, w = int(grid[1]), int(grid[2])
        else:
            side = math.isqrt(m)
            h, w = (side, m // side) if side * (m // side) == m else (1, m)
        rows, cols = cells(self.keep, h, w)
        r = torch.arange(h, device=x.device) * rows // h
        q = torch.arange(w, device=x.device) * cols // w
        cell = (r[:, None] * cols + q[None, :]).flatten()  # [M] cell of each patch
        if b == 0:
            return empty_batch(x, signals.size, p + self.keep)
        size = signals.size[:, p:]
        idx = cell.expand(b, -1)[..., None]
        total = size.new_zeros(b, self.keep, 1).scatter_add(1, idx, size)
        summed = x.new_zeros(b, self.keep, c).scatter_add(
            1, idx.expand(-1, -1, c), x[:, p:] * size.to(x.dtype)
        )
        pre = torch.arange(p, device=x.device).expand(b, p)
        return Reduction(
            x=torch.cat([x[:, :p], summed / total.to(x.dtype)], 1),
            size=torch.cat([signals.size[:, :p], total], 1),
            index=torch.cat([pre, torch.full((b, self.keep), -1, device=x.device)], 1),
            assign=torch.cat([pre, (cell + p).expand(b, -1)], 1),
        )


__all__ = ["RandomPruning", "SpatialPooling", "cells"]
