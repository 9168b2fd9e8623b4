"""``reference.attach`` on a transformers Qwen2.5-VL / Qwen2-VL (vision stage).

Tiny random models are built from the library's config classes offline; nothing is
downloaded. Three images of different shapes (merged grids 4x4, 2x4 and 4x2) go in
one left-padded batch.
"""

from __future__ import annotations

import pytest
import torch

import reference
from reference import registry
from reference.core import Reduction, Signals, TokenReducer
from tests.reference.conftest import build

transformers = pytest.importorskip("transformers")
from reference.adapters.hf_qwen2_5_vl import REFUSED  # noqa: E402

IMAGE, VIDEO, START, END = 110, 111, 112, 113
GRIDS = [(1, 8, 8), (1, 4, 8), (1, 8, 4)]  # patches (t, h, w); merged: 16, 8 and 8 tokens
TEXTS = [[7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18]]
KINDS = ["qwen2_5_vl", "qwen2_vl"]
REDUCERS = [e for e in registry.entries() if issubclass(e.cls, TokenReducer)]


def _needs(entry) -> frozenset[str]:
    # What the test configuration needs (a method may set its needs per instance: TempMe).
    return build(entry.cls, "some").needs


TOKENS_ONLY = [e for e in REDUCERS if not _needs(e)]
NEEDY = [e for e in REDUCERS if _needs(e)]


def tiny_qwen(
    kind: str = "qwen2_5_vl", attn: str = "sdpa", seed: int = 0, layers: int = 2, hidden: int = 32
):
    # mRoPE sections (t, h, w) of the head_dim / 2 = hidden / 8 frequencies
    sections = [hidden // 32, hidden // 32, hidden // 16]
    text = dict(
        vocab_size=120,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": sections},
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    vision = dict(depth=2, num_heads=2, patch_size=2, temporal_patch_size=2, spatial_merge_size=2)
    ids = dict(
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=START,
        vision_end_token_id=END,
    )
    if kind == "qwen2_5_vl":
        # window 8 px = 2x2 merged tokens: the first block attends in windows
        vision |= dict(hidden_size=16, intermediate_size=32, out_hidden_size=hidden)
        vision |= dict(window_size=8, fullatt_block_indexes=[1])
        config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
        cls = transformers.Qwen2_5_VLForConditionalGeneration
    else:
        vision |= dict(embed_dim=16, hidden_size=hidden, mlp_ratio=2)
        config = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
        cls = transformers.Qwen2VLForConditionalGeneration
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return cls(config).eval()


def merged(grid: tuple[int, int, int]) -> int:
    t, h, w = grid
    return t * h * w // 4


def prompt(grid: tuple[int, int, int], text: list[int]) -> list[int]:
    return [5, START] + [IMAGE] * merged(grid) + [END] + text


def pixels(grids: list[tuple[int, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``pixel_values [sum t*h*w, 3*2*2*2]`` (the processor's flattened patches) and grids."""
    n = sum(t * h * w for t, h, w in grids)
    values = torch.randn(n, 24, generator=torch.Generator().manual_seed(1))
    return values, torch.tensor(grids)


def inputs(indices: list[int]) -> dict:
    """A left-padded batch of the samples at ``indices``, as ``generate`` wants it."""
    rows = [prompt(GRIDS[i], TEXTS[i]) for i in indices]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    all_values, _ = pixels(GRIDS)
    starts = [0]
    for t, h, w in GRIDS:
        starts.append(starts[-1] + t * h * w)
    values = torch.cat([all_values[starts[i] : starts[i + 1]] for i in indices])
    grid = torch.tensor([GRIDS[i] for i in indices])
    return dict(
        input_ids=ids,
        attention_mask=mask,
        pixel_values=values,
        image_grid_thw=grid,
        mm_token_type_ids=(ids == IMAGE).int(),
    )


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_zero_budget_gives_the_plain_logits_and_detach_restores_the_model(kind, attn):
    model = tiny_qwen(kind, attn)
    assert model.config.vision_config._attn_implementation == attn
    assert model.config.text_config._attn_implementation == attn
    batch = inputs([0, 1, 2])
    plain = model(**batch).logits
    attributes, state = set(model.__dict__), dict(model.state_dict())
    deltas = model.model.rope_deltas.clone()
    with reference.attach(model, "random_pruning", keep=10_000) as handle:
        got = model(**batch).logits
        assert torch.equal(handle.patch.last_attention_mask, batch["attention_mask"])
    real = batch["attention_mask"] > 0
    torch.testing.assert_close(got[real], plain[real], rtol=1e-5, atol=1e-6)
    assert set(model.__dict__) == attributes
    assert model.state_dict().keys() == state.keys()
    assert torch.equal(model.model.rope_deltas, deltas)
    assert torch.equal(model(**batch).logits, plain)


@pytest.mark.parametrize("entry", TOKENS_ONLY, ids=[e.catalog_id for e in TOKENS_ONLY])
@torch.no_grad()
def test_every_tokens_only_method_gives_each_padded_sample_what_it_gets_alone(entry):
    model = tiny_qwen()
    batch = inputs([0, 1, 2])
    with reference.attach(model, build(entry.cls, "some")) as handle:
        together = model(**batch).logits[:, -1]
        kept = handle.patch.last_attention_mask.sum(1) - torch.tensor([len(t) + 3 for t in TEXTS])
        for i in range(3):
            alone = model(**inputs([i])).logits[0, -1]
            torch.testing.assert_close(together[i], alone, rtol=1e-4, atol=1e-5)
    assert (kept >= 1).all() and (kept <= torch.tensor([merged(g) for g in GRIDS])).all()
    assert kept[0] < merged(GRIDS[0])  # the "some" setting removes tokens of the 4x4 image


@pytest.mark.parametrize("entry", NEEDY, ids=[e.catalog_id for e in NEEDY])
def test_a_method_needing_a_signal_qwen_cannot_give_is_refused_with_the_reason(entry):
    model = tiny_qwen()
    attributes = set(model.__dict__)
    missing = sorted(_needs(entry))
    with pytest.raises(ValueError, match="cannot give") as info:
        reference.attach(model, build(entry.cls, "some"))
    for need in missing:
        assert REFUSED[need] in str(info.value)
    assert set(model.__dict__) == attributes


def test_cls_attention_is_refused_because_there_is_no_cls_token():
    with pytest.raises(ValueError, match="has no CLS token"):
        reference.attach(tiny_qwen(), "fastervlm", tokens=4)
    with pytest.raises(ValueError, match="vision hook only"):
        reference.attach(tiny_qwen(), "random_pruning", layers=[1])


class KeepAt(TokenReducer):
    """Keeps the tokens at ``indices``, in that order, and records each image's grid."""

    catalog_id = "keep_at"

    def __init__(self, indices: list[int]):
        super().__init__()
        self.indices, self.grids = indices, []

    def forward(self, x: torch.Tensor, signals: Signals) -> Reduction:
        self.grids.append(signals.state["grid"])
        assert signals.prefix == 0 and x.shape[0] == 1
        index = torch.tensor([self.indices], device=x.device)
        assign = torch.full(x.shape[:2], -1, dtype=torch.long, device=x.device)
        assign[0, index[0]] = torch.arange(len(self.indices), device=x.device)
        return Reduction(x[:, index[0]], signals.size[:, index[0]], index, assign)

    def budget(self, n: int, prefix: int) -> tuple[int, int]:
        return len(self.indices), len(self.indices)


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_kept_tokens_keep_their_own_mrope_positions(kind):
    """Out of order too; text keeps its positions; ``rope_deltas`` continue at max + 1."""
    model = tiny_qwen(kind)
    batch = inputs([0, 1, 2])
    full, _ = model.model.get_rope_index(
        batch["input_ids"],
        batch["mm_token_type_ids"],
        image_grid_thw=batch["image_grid_thw"],
        attention_mask=batch["attention_mask"],
    )
    method = KeepAt([6, 1, 7, 3])
    with reference.attach(model, method) as handle:
        model(**batch)
        pos, mask = handle.patch.last_position_ids, handle.patch.last_attention_mask
        deltas = model.model.rope_deltas
    assert method.grids == [(1, 4, 4), (1, 2, 4), (1, 4, 2)]  # merged (t, h, w), one at a time
    for i in range(3):
        m, n = merged(GRIDS[i]), len(TEXTS[i])
        real = full[:, i, batch["attention_mask"][i] > 0]  # [3, L]
        kept = real[:, 2 + torch.tensor(method.indices)]
        expected = torch.cat([real[:, :2], kept, real[:, 2 + m :]], 1)
        got = pos[:, i, mask[i] > 0]
        assert torch.equal(got, expected)
        assert got.shape[1] == 2 + 4 + 1 + n
        assert deltas[i, 0] == got.max() + 1 - got.shape[1]


def language_model_inputs(model, batch: dict, **kwargs) -> torch.Tensor:
    """The ``inputs_embeds`` the language model gets with ``spatial_pooling(**kwargs)``."""
    seen = {}

    def grab(module, args, kw):
        seen["x"] = kw["inputs_embeds"]

    hook = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with reference.attach(model, "spatial_pooling", **kwargs):
            model(**batch)
    finally:
        hook.remove()
    return seen["x"]


@torch.no_grad()
def test_spatial_pooling_of_a_4x2_merged_grid_pools_cells_of_the_true_grid():
    model = tiny_qwen()
    one = inputs([2])  # patches 8x4: merged 4 rows x 2 columns
    feats = model.model.get_image_features(
        one["pixel_values"], one["image_grid_thw"], return_dict=True
    ).pooler_output[0]
    columns = feats.view(4, 2, -1).mean(0)  # keep=2 on 4x2: one cell per column
    torch.testing.assert_close(language_model_inputs(model, one, keep=2)[0, 2:4], columns)


@torch.no_grad()
def test_spatial_pooling_pools_cells_of_the_row_major_merged_grid_at_their_mean_position():
    """A 4x4 merged grid pooled to 2x2 cells; each cell is placed at the rounded-down
    mean (here its top-left) position of the tokens it holds."""
    model = tiny_qwen()
    one = inputs([0])
    feats = model.model.get_image_features(
        one["pixel_values"], one["image_grid_thw"], return_dict=True
    ).pooler_output[0]
    cells = feats.view(2, 2, 2, 2, -1).mean((1, 3)).reshape(4, -1)  # '(R a C b) d -> (R C) d'
    with reference.attach(model, "spatial_pooling", keep=4) as handle:
        model(**one)
        pos = handle.patch.last_position_ids[:, 0, 2:6]
    start = 2  # the image's positions start after two text tokens
    assert pos.tolist() == [
        [start] * 4,
        [start, start, start + 2, start + 2],
        [start, start + 2, start, start + 2],
    ]
    torch.testing.assert_close(language_model_inputs(model, one, keep=4)[0, 2:6], cells)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_cached_generation_equals_recomputing_the_pruned_sequence(kind, attn):
    """Each step's logits of cached ``generate`` equal one uncached forward of the
    prompt and the generated tokens (the cut recomputed); text is kept in order."""
    model = tiny_qwen(kind, attn)
    batch = inputs([0, 1, 2])
    with reference.attach(model, "spatial_pooling", keep=2) as handle:
        out = model.generate(
            **batch,
            max_new_tokens=4,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        shrunk = handle.patch.last_attention_mask
        width = shrunk.shape[1]
        new = out.sequences[:, width:]
        full = dict(batch)
        full["input_ids"] = torch.cat([batch["input_ids"], new], 1)
        full["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(new)], 1)
        full["mm_token_type_ids"] = (full["input_ids"] == IMAGE).int()
        recomputed = model(**full).logits[:, -new.shape[1] - 1 : -1]
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, recomputed[:, step], rtol=1e-4, atol=1e-5)
    for i, text in enumerate(TEXTS):  # text tokens kept, in order, around 2 image tokens
        row = out.sequences[i, :width][shrunk[i] > 0].tolist()
        assert row == [5, START, IMAGE, IMAGE, END, *text]


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_zero_budget_generation_equals_the_plain_model(kind):
    model = tiny_qwen(kind)
    batch = inputs([0, 1, 2])
    plain = model.generate(**batch, max_new_tokens=4, do_sample=False)
    with reference.attach(model, "random_pruning", keep=10_000):
        got = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, plain)


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_a_cached_forward_continues_at_the_largest_position_plus_one(kind):
    """``rope_deltas``: a decoding forward without ``position_ids`` (the model derives
    them from the cache length and the deltas) equals recomputing without a cache."""
    model = tiny_qwen(kind)
    one = inputs([1])
    del one["attention_mask"]
    with reference.attach(model, "random_pruning", keep=3):
        first = model(**one, use_cache=True)
        token = first.logits[:, -1].argmax(-1, keepdim=True)
        step = model(input_ids=token, cache=first.cache).logits[:, -1]
        longer = dict(one, input_ids=torch.cat([one["input_ids"], token], 1))
        longer["mm_token_type_ids"] = (longer["input_ids"] == IMAGE).int()
        recomputed = model(**longer).logits[:, -1]
    torch.testing.assert_close(step, recomputed, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_two_images_in_one_sample_are_cut_in_order_and_text_keeps_its_positions():
    model = tiny_qwen()
    ids = torch.tensor([prompt(GRIDS[0], [7, 8]) + prompt(GRIDS[1], [9, 10, 11])])
    values, grid = pixels(GRIDS[:2])
    batch = dict(input_ids=ids, pixel_values=values, image_grid_thw=grid)
    types = (ids == IMAGE).int()
    plain = model(**batch, mm_token_type_ids=types).logits
    with reference.attach(model, "random_pruning", keep=10_000):
        torch.testing.assert_close(model(**batch).logits, plain, rtol=1e-5, atol=1e-6)
    full, _ = model.model.get_rope_index(ids, types, image_grid_thw=grid)
    with reference.attach(model, "random_pruning", keep=3) as handle:
        model(**batch)
        got, shrunk = handle.patch.last_position_ids[:, 0], handle.patch.last_input_ids[0]
    assert (shrunk == IMAGE).sum() == 6
    text = ids[0] != IMAGE
    assert torch.equal(shrunk[shrunk != IMAGE], ids[0][text])
    assert torch.equal(got[:, shrunk != IMAGE], full[:, 0, text])


def test_videos_are_refused_rather_than_passed_uncut():
    model = tiny_qwen()
    with (
        reference.attach(model, "random_pruning", keep=3),
        pytest.raises(ValueError, match="pixel_values_videos"),
    ):
        model(input_ids=torch.tensor([[5, VIDEO]]), pixel_values_videos=torch.zeros(8, 24))
