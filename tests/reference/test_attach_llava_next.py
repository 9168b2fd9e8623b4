"""``reference.attach`` on a transformers ``LlavaNextForConditionalGeneration`` (AnyRes).

Tiny random models are built from the library's config classes offline; nothing is
downloaded. 32 px crops of 4x4 patches; three images of different sizes in one
left-padded batch: 30x60 (base + 1x2 tiles), 60x40 and 50x50 (base + 2x2 tiles, the
first cut by unpad).
"""

from __future__ import annotations

import pytest
import torch

import reference
from reference import registry
from reference.core import Reduction, Signals, TokenReducer
from tests.reference.conftest import build

transformers = pytest.importorskip("transformers")
from reference.adapters import hf_llava_next  # noqa: E402

ENTRIES = [e for e in registry.entries() if issubclass(e.cls, TokenReducer)]
IMAGE = 110
SIZES = [[30, 60], [60, 40], [50, 50]]
TEXTS = [[7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18]]
SIDE = 4  # patches per crop side


def tiny_next(attn: str = "sdpa", strategy: str = "default", seed: int = 0):
    vision = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    )
    text = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=120,
        max_position_embeddings=512,
    )
    config = transformers.LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE,
        vision_feature_layer=-2,
        vision_feature_select_strategy=strategy,
        image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]],
        image_seq_length=SIDE * SIDE,
    )
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return transformers.LlavaNextForConditionalGeneration(config).eval()


MODEL = tiny_next()
CROPS = hf_llava_next.crops_per_image(MODEL, SIZES)  # [3, 5, 5]
PIXELS = torch.randn(3, max(CROPS), 3, 32, 32, generator=torch.Generator().manual_seed(1))
for _i, _c in enumerate(CROPS):
    PIXELS[_i, _c:] = 0  # the processor pads an image's missing crops with zeros
with torch.no_grad():
    FEATURES = MODEL.model.get_image_features(PIXELS, torch.tensor(SIZES), return_dict=True)
RUNS = [f.shape[0] for f in FEATURES.pooler_output]  # each image's unreduced placeholder run


def inputs(indices: list[int], texts=TEXTS) -> dict:
    """A left-padded batch of the samples at ``indices``, as ``generate`` wants it."""
    rows = [[5, 6] + [IMAGE] * RUNS[i] + texts[i] for i in indices]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return dict(
        input_ids=ids,
        attention_mask=mask,
        pixel_values=PIXELS[indices],
        image_sizes=torch.tensor([SIZES[i] for i in indices]),
    )


def positions(batch: dict) -> torch.Tensor:
    return (batch["attention_mask"].cumsum(1) - 1).clamp(min=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@torch.no_grad()
def test_zero_budget_gives_the_plain_logits_bit_for_bit_and_detach_restores_the_model(attn):
    """Untouched tiles keep transformers' own layout (unpad, newline tokens). The plain
    forward gets the positions the patch gives a padded batch (counted over the valid
    tokens, as ``generate`` counts them); ``generate`` itself is compared as is."""
    model = tiny_next(attn)
    batch = inputs([0, 1, 2])
    plain = model(**batch, position_ids=positions(batch)).logits
    plain_tokens = model.generate(**batch, max_new_tokens=3, do_sample=False)
    attributes, inner = set(model.__dict__), set(model.model.__dict__)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with reference.attach(model, "random_pruning", keep=10_000) as handle:
        assert torch.equal(model(**batch).logits, plain)
        assert torch.equal(handle.patch.last_attention_mask, batch["attention_mask"])
        assert torch.equal(model.generate(**batch, max_new_tokens=3, do_sample=False), plain_tokens)
    with reference.attach(model, "visionzip", dominant=16, contextual=0):  # attention signals
        torch.testing.assert_close(model(**batch).logits, plain, rtol=1e-4, atol=1e-5)
    assert set(model.__dict__) == attributes and set(model.model.__dict__) == inner
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(**batch, position_ids=positions(batch)).logits, plain)


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.catalog_id for e in ENTRIES])
@torch.no_grad()
def test_every_token_reducer_gives_each_padded_sample_of_any_size_what_it_gets_alone(entry):
    batch = inputs([0, 1])  # 3 and 5 crops, 1x2 and 2x2 tiles
    with reference.attach(MODEL, build(entry.cls, "some")) as handle:
        together = MODEL(**batch).logits[:, -1]
        text = torch.tensor([len(t) + 2 for t in TEXTS[:2]])
        kept = handle.patch.last_attention_mask.sum(1) - text
        for i in range(2):
            alone = MODEL(**inputs([i])).logits[0, -1]
            torch.testing.assert_close(together[i], alone, rtol=1e-4, atol=1e-5)
    assert (kept >= 1).all() and (kept < torch.tensor(RUNS[:2])).all()


@torch.no_grad()
def test_a_projector_method_replaces_the_projector_of_every_crop():
    batch = inputs([0, 1, 2])
    with reference.attach(MODEL, "deco", query_num=4) as handle:
        together = MODEL(**batch).logits[:, -1]
        image = (handle.patch.last_input_ids == IMAGE) & (handle.patch.last_attention_mask > 0)
        assert image.sum(1).tolist() == [4 * c for c in CROPS]
        for i in range(3):
            alone = MODEL(**inputs([i])).logits[0, -1]
            torch.testing.assert_close(together[i], alone, rtol=1e-4, atol=1e-5)
        assert list(handle.reducers) == ["projector"]


class KeepAt(TokenReducer):
    """Keeps CLS and the tokens at ``indices`` of every crop, in that order, then adds
    one token it makes (the crop's mean); records the batch it saw."""

    catalog_id = "keep_at"

    def __init__(self, indices: list[int]):
        super().__init__()
        self.indices, self.seen = indices, []

    def forward(self, x: torch.Tensor, signals: Signals) -> Reduction:
        self.seen.append((x.shape, signals.prefix))
        b, n, _ = x.shape
        index = torch.tensor([[0, *self.indices, -1]] * b)
        out = torch.cat([x[:, index[0, :-1]], x.mean(1, keepdim=True)], 1)
        assign = torch.full((b, n), -1, dtype=torch.long)
        assign[:, index[0, :-1]] = torch.arange(index.shape[1] - 1)
        return Reduction(out, x.new_ones(b, out.shape[1], 1), index, assign)

    def budget(self, n: int, prefix: int) -> tuple[int, int]:
        return len(self.indices) + 2, len(self.indices) + 2


@torch.no_grad()
def test_reduced_tiles_are_laid_out_as_visionzips_llava_next_code():
    """Base image in the method's order; then the tiles' kept patches in the row-major
    order of the tiles' joint grid (no unpad, no newline); then the made tokens."""
    one = inputs([0])  # 30x60: base + tiles (0, 0) and (0, 1), a 4x8 joint grid
    seen = {}
    hook = MODEL.model.language_model.register_forward_pre_hook(
        lambda module, args, kw: seen.update(x=kw["inputs_embeds"]), with_kwargs=True
    )
    method = KeepAt([6, 1, 9])  # patches 5 (row 1, col 1), 0 (0, 0) and 8 (2, 0)
    try:
        with reference.attach(MODEL, method):
            MODEL(**one)
    finally:
        hook.remove()
    assert method.seen == [(torch.Size([3, 17, 32]), 1)]  # the 3 crops in one batch, CLS first
    hidden = MODEL.model.vision_tower(one["pixel_values"][0, :3], output_hidden_states=True)
    h = hidden.hidden_states[-2]
    patches = MODEL.model.multi_modal_projector(h[:, 1:])  # [crops, 16, hidden]
    made = MODEL.model.multi_modal_projector(h.mean(1))  # [crops, hidden]
    base = [patches[0, 5], patches[0, 0], patches[0, 8], made[0]]
    tiles = [patches[t, p] for p in (0, 5, 8) for t in (1, 2)]  # row-major in the 4x8 grid
    expected = torch.stack(base + tiles + [made[1], made[2]])
    torch.testing.assert_close(seen["x"][0, 2:-5], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@torch.no_grad()
def test_cached_generation_equals_recomputing_the_pruned_sequence(attn):
    """Each step's logits of cached ``generate`` equal one uncached forward over the
    prompt and the tokens before it (the cut recomputed); text is kept in order."""
    model = tiny_next(attn)
    batch = inputs([0, 1, 2])
    with reference.attach(model, "visionzip", dominant=3, contextual=1) as handle:
        out = model.generate(
            **batch, max_new_tokens=4, do_sample=False, output_logits=True,
            return_dict_in_generate=True,
        )  # fmt: skip
        shrunk = handle.patch.last_attention_mask
        width = shrunk.shape[1]
        new = out.sequences[:, width:]
        full = dict(batch, input_ids=torch.cat([batch["input_ids"], new], 1))
        full["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(new)], 1)
        recomputed = model(**full).logits[:, -new.shape[1] - 1 : -1]
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, recomputed[:, step], rtol=1e-4, atol=1e-5)
    for i, text in enumerate(TEXTS):  # 3 dominant + 1 contextual tokens per crop
        row = out.sequences[i, :width][shrunk[i] > 0].tolist()
        assert row == [5, 6] + [IMAGE] * (4 * CROPS[i]) + text


@torch.no_grad()
def test_a_language_model_method_prunes_in_the_decoder_and_detaches():
    """FastV in LLaVA-NeXT's Llama decoder (``hf_llava_llm``): same-sized images."""
    batch = inputs([1, 2])  # 60x40 and 50x50: 72 and 88 image tokens
    with (
        reference.attach(MODEL, "fastv", ratio=0.5),
        pytest.raises(ValueError, match="in every sample"),
    ):
        MODEL(**batch)
    same = inputs([2])
    two = {k: torch.cat([v, v]) for k, v in same.items()}
    two["input_ids"][1, -1] = 9  # a different last text token
    inner = set(MODEL.model.__dict__)
    plain = MODEL(**two).logits[:, -1]
    with reference.attach(MODEL, "fastv", ratio=0.5) as handle:
        together = MODEL(**two).logits[:, -1]
        (index,) = handle.patch.last_trace
        for i in range(2):
            alone = MODEL(**{k: v[i : i + 1] for k, v in two.items()}).logits[0, -1]
            torch.testing.assert_close(together[i], alone, rtol=1e-4, atol=1e-5)
    assert index.shape[1] == two["input_ids"].shape[1] - RUNS[2] // 2
    assert not torch.allclose(together, plain)
    assert set(MODEL.model.__dict__) == inner
    assert torch.equal(MODEL(**two).logits[:, -1], plain)


def test_what_cannot_run_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="'default'"):
        reference.attach(tiny_next(strategy="full"), "visionzip")
    with pytest.raises(ValueError, match="vision hook only"):
        reference.attach(MODEL, "visionzip", layers=[1])
    batch = inputs([0])
    del batch["image_sizes"]
    with reference.attach(MODEL, "visionzip"), pytest.raises(ValueError, match="image_sizes"):
        MODEL(**batch)
    for first, second in [("visionzip", "visionzip"), ("visionzip", "fastv"), ("fastv", "deco")]:
        with reference.attach(MODEL, first), pytest.raises(ValueError, match="already"):
            reference.attach(MODEL, second)  # the second stage would see no image tokens
