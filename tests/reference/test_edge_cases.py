"""Edge cases every registered token reducer survives, and budgets every method rejects.

Each method (its ``"some"`` test configuration) runs on raw tensors with an empty
batch, no or one image token, two image tokens, an odd count, two prefix tokens and
float64; the result keeps the contract's shapes, the budget and the prefix.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from reference import registry
from reference.core import TokenReducer
from reference.projector import Projector
from tests.reference.conftest import C, build, make_signals

# A degenerate input gets a result or a clear error, never a warning from inside torch.
pytestmark = pytest.mark.filterwarnings("error")

ENTRIES = [e for e in registry.entries() if issubclass(e.cls, TokenReducer)]
IDS = [e.catalog_id for e in ENTRIES]

# name: (batch, prefix, image tokens, dtype)
CASES = {
    "empty_batch": (0, 1, 16, torch.float32),
    "no_image_token": (2, 1, 0, torch.float32),
    "one_image_token": (2, 1, 1, torch.float32),
    "two_image_tokens": (2, 1, 2, torch.float32),
    "odd_count": (2, 1, 9, torch.float32),
    "two_prefix_tokens": (2, 2, 9, torch.float32),
    "no_prefix_one_token": (2, 0, 1, torch.float32),
    "float64": (2, 1, 16, torch.float64),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_edge_case_keeps_the_contract(entry, case):
    b, prefix, m, dtype = CASES[case]
    n = prefix + m
    x = torch.randn(b, n, C, generator=torch.Generator().manual_seed(0)).to(dtype)
    signals = make_signals(x, prefix)
    signals.size = signals.size.to(dtype)
    method = build(entry.cls, "some").to(dtype)
    out = method(x, signals)

    k = out.x.shape[1]
    low, high = method.budget(n, prefix)
    assert low <= k <= high <= n
    assert out.x.shape == (b, k, C) and out.x.dtype == dtype
    assert out.size.shape == (b, k, 1) and out.index.shape == (b, k)
    assert out.assign.shape == (b, n)
    assert torch.equal(out.x[:, :prefix], x[:, :prefix])
    assert (out.index[:, :prefix] == torch.arange(prefix)).all()
    assert ((out.index >= -1) & (out.index < n)).all()
    assert ((out.assign >= -1) & (out.assign < k)).all()
    # A token that continues an input token is the slot that input token went into
    # (filler tokens, mask 0, pad a sample to the batch's width and are exempt).
    continues = out.index >= 0
    if out.mask is not None:
        continues &= out.mask > 0
    slots = torch.arange(k).expand(b, k)
    assert torch.equal(out.assign.gather(1, out.index.clamp(min=0))[continues], slots[continues])
    if b:
        assert torch.isfinite(out.x).all()


# (catalog id, constructor kwargs that are invalid, the argument the error must name)
REQUIRED = {
    "dynamicvit": {"dim": C},
    "inti": {"dim": C, "hidden": 8},
    "learnable_vtm": {"dim": C},
    "lookupvit": {"dim": C, "heads": 4},
    "pyra": {"dim": C},
    "tocom": {"dim": C, "num_heads": 4},
    "token_cropr": {"dim": C},
    "tps": {"dim": C},
    "vit_slim": {"num_tokens": 17},
}
INVALID = [
    ("a_vit", {"max_keep": -0.5}, "max_keep"),
    ("a_vit", {"max_keep": 1.5}, "max_keep"),
    ("adaptive_sparse_vit", {"max_keep": -0.5}, "max_keep"),
    ("adaptive_sparse_vit", {"max_keep": 1.5}, "max_keep"),
    ("atp_llava", {"min_keep": 1.5}, "min_keep"),
    ("atp_llava", {"max_keep": 1.5}, "max_keep"),
    ("ats", {"k": -1}, "k"),
    ("ats", {"k": 0}, "k"),
    ("catp", {"downsample": 0}, "downsample"),
    ("crossget", {"r": -1}, "r"),
    ("dart", {"tokens": -1}, "tokens"),
    ("dart", {"ratio": 1.5}, "ratio"),
    ("diffrate", {"patch_number": 16, "prune_kept": 20}, "prune_kept"),
    ("diffrate", {"patch_number": 16, "prune_kept": 0}, "prune_kept"),
    ("diffrate", {"patch_number": 16, "merge_kept": 17}, "merge_kept"),
    ("diffrate", {"patch_number": 16, "merge_kept": -1}, "merge_kept"),
    ("diffrate", {"patch_number": 0}, "patch_number"),
    ("diffrate", {"granularity": 0}, "granularity"),
    ("divprune", {"ratio": -0.1}, "ratio"),
    ("divprune", {"ratio": 1.5}, "ratio"),
    ("dycoke", {"ratio": 1.5}, "ratio"),
    ("dycoke", {"frame_tokens": -1}, "frame_tokens"),
    ("dynamicvit", {"keep_ratio": -0.1}, "keep_ratio"),
    ("dynamicvit", {"keep_ratio": 1.5}, "keep_ratio"),
    ("evit", {"keep_rate": 1.5}, "keep_rate"),
    ("evo_vit", {"keep_rate": 1.5}, "keep_rate"),
    ("evo_vit", {"keep_rate": 0.0}, "keep_rate"),
    ("evo_vit", {"keep_rate": -0.5}, "keep_rate"),
    ("evo_vit", {"alpha": 1.5}, "alpha"),
    ("fastervlm", {"tokens": -1}, "tokens"),
    ("fastv", {"ratio": -0.1}, "ratio"),
    ("fastv", {"ratio": 1.5}, "ratio"),
    ("fastvid", {"ratio": 1.5}, "ratio"),
    ("fastvid", {"frame_tokens": -1}, "frame_tokens"),
    ("ficoco", {"r": -1}, "r"),
    ("ficoco", {"quantile": 1.5}, "quantile"),
    ("focusllava", {"ratio": -0.1}, "ratio"),
    ("focusllava", {"ratio": 1.5}, "ratio"),
    ("hired", {"budget": 1.5}, "budget"),
    ("holitom", {"retain_ratio": 1.5}, "retain_ratio"),
    ("holitom", {"frame_tokens": -1}, "frame_tokens"),
    ("inti", {"frame_tokens": -1}, "frame_tokens"),
    ("learnable_vtm", {"ratio": -0.1}, "ratio"),
    ("learnable_vtm", {"ratio": 1.5}, "ratio"),
    ("llava_prumerge", {"keep_ratio": 1.5}, "keep_ratio"),
    ("lookupvit", {"side": -1}, "side"),
    ("mustdrop", {"ratio": -0.5}, "ratio"),
    ("p_mod", {"max_ratio": 1.5}, "max_ratio"),
    ("p_mod", {"min_ratio": 0.9}, "min_ratio"),
    ("ppt", {"r": -1}, "r"),
    ("prunevid", {"frame_tokens": -1}, "frame_tokens"),
    ("prunevid", {"cluster_ratio": 1.5}, "cluster_ratio"),
    ("pyra", {"r": -1}, "r"),
    ("pyramiddrop", {"retain": 1.5}, "retain"),
    ("recoverable_compression", {"vision_ratio": -0.1}, "vision_ratio"),
    ("random_pruning", {"keep": 0}, "keep"),
    ("rlt", {"max_keep": -0.5}, "max_keep"),
    ("rlt", {"frame_tokens": -1}, "frame_tokens"),
    ("sparsevlm", {"keep": -1}, "keep"),
    ("spatial_pooling", {"keep": 0}, "keep"),
    ("tempme", {"ratio": 1.5}, "ratio"),
    ("tempme", {"r": -1}, "r"),
    ("tempme", {"merge_frames": 0}, "merge_frames"),
    ("token_corr_compression", {"max_keep": 1.5}, "max_keep"),
    ("tocom", {"r_src": -1}, "r_src"),
    ("tocom", {"r_tgt": -1}, "r_tgt"),
    ("tocom", {"r_tgt": 17}, "r_tgt"),
    ("tocom", {"max_r": 0}, "max_r"),
    ("tocom", {"rank": 0}, "rank"),
    ("token_cropr", {"r": -1}, "r"),
    ("tome", {"r": -1}, "r"),
    ("tps", {"keep_rate": 1.5}, "keep_rate"),
    ("trim", {"ratio": 1.5}, "ratio"),
    ("trsm", {"ratio": -0.1}, "ratio"),
    ("victor", {"num_registers": 0}, "num_registers"),
    ("visionzip", {"dominant": -1}, "dominant"),
    ("visionzip", {"contextual": -1}, "contextual"),
    ("vispruner", {"tokens": -1}, "tokens"),
    ("vispruner", {"important_ratio": 1.5}, "important_ratio"),
    ("vit_slim", {"keep": 1.5}, "keep"),
    ("vit_slim", {"keep": -0.5}, "keep"),
    ("voco_llama", {"voco_num": 0}, "voco_num"),
    ("vote_and_mix", {"ratio": 1.5}, "ratio"),
    ("vote_and_mix", {"ratio": -0.1}, "ratio"),
]
# Methods without a budget argument to check, and those whose checks are still open.
NO_BUDGET_ARGUMENT = {"patch_slimming"}  # explicit positions: out-of-range ones are ignored
NOT_YET_CHECKED: set[str] = set()


@pytest.mark.parametrize(
    ("catalog_id", "kwargs", "name"), INVALID, ids=[f"{c}-{n}" for c, _, n in INVALID]
)
def test_invalid_budget_is_rejected_naming_the_argument(catalog_id, kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        registry.create(catalog_id, **REQUIRED.get(catalog_id, {}), **kwargs)


def test_every_method_with_a_budget_has_an_invalid_budget_case():
    """Projectors list theirs in ``invalid_configs`` (see test_projector_contract.py)."""
    covered = {c for c, _, _ in INVALID} | NO_BUDGET_ARGUMENT | NOT_YET_CHECKED
    reducers = {e.catalog_id for e in registry.entries() if not issubclass(e.cls, Projector)}
    assert reducers <= covered


@pytest.mark.parametrize("module", ["trim", "llava_prumerge", "token_corr_compression"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_iqr_outliers_work_in_the_scores_dtype(module, dtype):
    iqr_outliers = importlib.import_module(f"reference.{module}").iqr_outliers
    score = torch.rand(3, 9, generator=torch.Generator().manual_seed(0))
    score[:, 4] = 10.0  # one clear outlier per row
    expected = torch.zeros(3, 9, dtype=torch.bool)
    expected[:, 4] = True
    assert torch.equal(iqr_outliers(score.to(dtype)), expected)
