"""``reference.attach`` of language-model-stage methods on a transformers Qwen2.5-VL / Qwen2-VL.

Every registered ``LLMReducer`` runs inside the Qwen2 decoder of a tiny random model
(4 decoder layers, built offline from the library's config classes; nothing is
downloaded), through the decoder patch it shares with LLaVA
(``reference.adapters.hf_llava_llm``). Prompts: ``[text][<vision_start>][16 image
tokens][<vision_end>][text]``, a 4x4 merged grid per sample, left-padded.
"""

from __future__ import annotations

import pytest
import torch

import reference
from reference import registry
from reference.core import Reduction
from reference.hosts.llava import LLMReducer, LLMSignals
from tests.reference.test_attach_qwen2_5_vl import END, IMAGE, START, VIDEO, tiny_qwen
from tests.reference.test_attach_qwen2_5_vl import inputs as mixed_grids

transformers = pytest.importorskip("transformers")
from reference.adapters import hf_llava_llm  # noqa: E402

ENTRIES = [e for e in registry.entries() if issubclass(e.cls, LLMReducer)]
IDS = [e.catalog_id for e in ENTRIES]
KINDS = ["qwen2_5_vl", "qwen2_vl"]
LAYERS = 4
HIDDEN = 64  # the width the methods' test configurations assume (ATP-LLaVA's ``dim``)
GRID = (1, 8, 8)  # patches (t, h, w): a 4x4 merged grid, 16 image tokens
N_IMAGE = 16
PREFIXES = [[5], [5, 6, 7], [5, 6]]
TEXTS = [[7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18]]
STEPS = 3
# DART visits its pivots in the iteration order of the set of their sequence indices
# (as the official code does), so where the image sits in the sequence matters to it.
READS_SEQUENCE_INDEX = {"dart"}


def setting(entry, config: str = "some") -> tuple[dict, list[int] | None]:
    """Keyword arguments and layers: the paper placement where the method has one and
    takes the test config's arguments, else the config's arguments after layer 1."""
    kwargs = entry.cls.test_configs[config]
    try:
        placed = entry.cls.paper_placement(LAYERS, **kwargs)
    except (TypeError, ValueError):
        placed = {}
    return kwargs, None if placed else [1]


def placed(entry) -> dict[int, LLMReducer]:
    kwargs, layers = setting(entry)
    if layers is None:
        return entry.cls.paper_placement(LAYERS, **kwargs)
    return {i: entry.cls(**kwargs) for i in layers}


def batch(indices=(0, 1, 2), prefixes=PREFIXES, texts=TEXTS) -> dict:
    """A left-padded batch of the samples at ``indices``, as a processor gives it."""
    rows = [prefixes[i] + [START] + [IMAGE] * N_IMAGE + [END] + texts[i] for i in indices]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    t, h, w = GRID
    values = torch.randn(3, t * h * w, 24, generator=torch.Generator().manual_seed(1))
    return dict(
        input_ids=ids,
        attention_mask=mask,
        pixel_values=values[list(indices)].flatten(0, 1),
        image_grid_thw=torch.tensor([GRID] * len(indices)),
        mm_token_type_ids=(ids == IMAGE).int(),
    )


def greedy(model, inputs: dict, steps: int = STEPS):
    return model.generate(
        **inputs,
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
@torch.no_grad()
def test_zero_budget_gives_the_plain_models_logits_and_tokens(entry, kind, attn):
    model = tiny_qwen(kind, attn, layers=LAYERS, hidden=HIDDEN)
    kwargs, _ = setting(entry, "zero")
    inputs = batch()
    plain, plain_tokens = model(**inputs).logits, model.generate(**inputs, max_new_tokens=3)
    with reference.attach(model, entry.catalog_id, layers=[0, 2], **kwargs):
        assert torch.equal(model(**inputs).logits, plain)
        assert torch.equal(model.generate(**inputs, max_new_tokens=3), plain_tokens)


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_detach_restores_the_model_exactly_and_nothing_enters_the_state_dict(kind):
    model = tiny_qwen(kind, layers=LAYERS, hidden=HIDDEN)
    inputs = batch()
    plain = model(**inputs).logits
    lm = model.model.language_model
    parts = [model, model.model, lm, *lm.layers]
    before = [dict(p.__dict__) for p in parts]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with reference.attach(model, "pyramiddrop"):
        assert model.state_dict().keys() == state.keys()
        assert not torch.equal(model(**inputs).logits[:, -1], plain[:, -1])
    for part, saved in zip(parts, before, strict=True):
        assert part.__dict__.keys() == saved.keys()
        # rope_deltas: the model's own record of its last prompt, not the patch's
        assert all(part.__dict__[k] is v for k, v in saved.items() if k != "rope_deltas")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(**inputs).logits, plain)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
@torch.no_grad()
def test_a_padded_batch_gives_each_sample_what_it_gets_alone(entry, kind):
    """Left padding and prefixes of different lengths: the method sees one image index
    for the batch, with padding slots before the shorter prefixes."""
    model = tiny_qwen(kind, layers=LAYERS, hidden=HIDDEN)
    kwargs, layers = setting(entry)
    prefixes = PREFIXES if entry.catalog_id not in READS_SEQUENCE_INDEX else [[5, 6]] * 3
    with reference.attach(model, entry.catalog_id, layers=layers, **kwargs):
        together = model(**batch(prefixes=prefixes)).logits[:, -1]
        for i in range(3):
            alone = model(**batch([i], prefixes=prefixes)).logits[0, -1]
            torch.testing.assert_close(together[i], alone, rtol=1e-4, atol=1e-5)


class Replay(LLMReducer):
    """Runs ``inner`` and records its image tokens out (``record``), or puts back what
    it recorded, whatever the text after the image (replay). In a causal decoder the
    image tokens' states do not depend on the text after them, so the replayed cut is
    the recorded one on a longer sequence."""

    def __init__(self, inner: LLMReducer):
        super().__init__()
        self.inner, self.needs, self.renumber = inner, inner.needs, inner.renumber
        self.saved: tuple[torch.Tensor, torch.Tensor] | None = None
        self.replaying = False

    def forward(self, h: torch.Tensor, signals: LLMSignals) -> Reduction:
        start, length, n = signals.image_start, signals.image_len, h.shape[1]
        if not self.replaying:
            red = self.inner(h, signals)
            k = red.x.shape[1] - (n - length)  # the image tokens left, at [start, start + k)
            self.saved = red.x[:, start : start + k], red.index[:, start : start + k] - start
        x_img, idx_img = self.saved
        b, device = h.shape[0], h.device
        before = torch.arange(start, device=device).expand(b, -1)
        after = torch.arange(start + length, n, device=device).expand(b, -1)
        index = torch.cat([before, start + idx_img, after], 1)
        x = torch.cat([h[:, :start], x_img, h[:, start + length :]], 1)
        assign = torch.full((b, n), -1, dtype=torch.long, device=device)
        assign.scatter_(1, index, torch.arange(index.shape[1], device=device).expand(b, -1))
        return Reduction(x, h.new_ones(b, x.shape[1], 1), index, assign)


def replayed_decoding(model, replays: dict[int, Replay], inputs: dict) -> int:
    """Check each cached ``generate`` step against the uncached replay; the tokens cut."""
    with reference.attach(model, replays) as handle:
        out = greedy(model, inputs)
        dropped = inputs["input_ids"].shape[1] - handle.patch.last_trace[-1].shape[1]
        for replay in replays.values():
            replay.replaying = True
        new = out.sequences[:, inputs["input_ids"].shape[1] :]
        for t in range(STEPS):
            full = dict(inputs, input_ids=torch.cat([inputs["input_ids"], new[:, :t]], 1))
            full["attention_mask"] = torch.cat(
                [inputs["attention_mask"], torch.ones_like(new[:, :t])], 1
            )
            full["mm_token_type_ids"] = (full["input_ids"] == IMAGE).int()
            recomputed = model(**full, use_cache=False).logits[:, -1]
            torch.testing.assert_close(out.logits[t], recomputed, rtol=1e-4, atol=1e-5)
    return dropped


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
@torch.no_grad()
def test_cached_decoding_equals_recomputing_the_pruned_sequence(entry, kind, attn):
    """Each cached ``generate`` step's logits equal one uncached forward of the prompt
    and the tokens decoded so far, the same cut replayed in it: per-layer caches of
    their own lengths, masks and mRoPE positions (``rope_deltas``) continue correctly."""
    model = tiny_qwen(kind, attn, layers=LAYERS, hidden=HIDDEN)
    replays = {i: Replay(r) for i, r in placed(entry).items()}
    assert replayed_decoding(model, replays, batch()) > 0  # the test config cuts tokens


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_a_cached_forward_without_position_ids_continues_as_generate(kind):
    """The model derives a decoding step's mRoPE positions from ``rope_deltas`` and the
    cache length (layer 0's: the unpruned prompt); that step equals ``generate``'s."""
    model = tiny_qwen(kind, layers=LAYERS, hidden=HIDDEN)
    one = batch([1])
    del one["attention_mask"]
    for method in ("fastv", "pyramiddrop"):
        with reference.attach(model, method):
            out = greedy(model, one, steps=2)
            first = model(**one, use_cache=True)
            token = out.sequences[:, -2:-1]
            step = model(input_ids=token, cache=first.cache).logits[:, -1]
        torch.testing.assert_close(first.logits[:, -1], out.logits[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(step, out.logits[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
@torch.no_grad()
def test_text_tokens_are_kept_in_order_and_each_layer_caches_its_own_length(entry, kind):
    model = tiny_qwen(kind, layers=LAYERS, hidden=HIDDEN)
    kwargs, layers = setting(entry)
    inputs = batch()
    ids, n = inputs["input_ids"], inputs["input_ids"].shape[1]
    with reference.attach(model, entry.catalog_id, layers=layers, **kwargs) as handle:
        out = model(**inputs, use_cache=True)
        trace, reducers = list(handle.patch.last_trace), handle.reducers
    lengths = [out.cache.get_seq_length(i) for i in range(LAYERS)]
    composed = torch.arange(n).expand(3, -1)
    for layer in range(LAYERS):
        assert lengths[layer] == composed.shape[1]
        if layer in reducers:
            composed = composed.gather(1, trace.pop(0))
    assert not trace
    assert out.logits.shape[1] == composed.shape[1]
    image = ids.gather(1, composed) == IMAGE
    for i in range(3):  # every text and padding token, in order; only image tokens gone
        assert composed[i][~image[i]].tolist() == (ids[i] != IMAGE).nonzero()[:, 0].tolist()


# Several images per sample, text between them: 16 image tokens in every sample.
SEVERAL = [
    ([5], [((1, 4, 8), [20, 21]), ((1, 8, 4), [7, 8, 9])]),
    ([5, 6, 7], [((1, 8, 8), [12, 13, 14])]),
    ([5, 6], [((1, 8, 4), [22]), ((1, 4, 8), [15, 16, 17, 18])]),
]


def several(indices=(0, 1, 2), same_prefix: bool = False) -> dict:
    """A left-padded batch of the ``SEVERAL`` samples at ``indices``."""
    rows, values, grids = [], [], []
    for i in indices:
        prefix, images = SEVERAL[i]
        row = [5, 6] if same_prefix else list(prefix)
        for j, (grid, text) in enumerate(images):
            row += [START] + [IMAGE] * (grid[0] * grid[1] * grid[2] // 4) + [END] + text
            n = grid[0] * grid[1] * grid[2]
            values.append(torch.randn(n, 24, generator=torch.Generator().manual_seed(10 * i + j)))
            grids.append(grid)
        rows.append(row)
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return dict(
        input_ids=ids,
        attention_mask=mask,
        pixel_values=torch.cat(values),
        image_grid_thw=torch.tensor(grids),
        mm_token_type_ids=(ids == IMAGE).int(),
    )


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
@torch.no_grad()
def test_several_images_with_text_between_make_one_image_span_for_the_method(entry):
    """One or two images per sample (16 image tokens each): the method sees them as one
    span; text stays in place; each sample in the padded batch gets what it gets alone."""
    model = tiny_qwen(layers=LAYERS, hidden=HIDDEN)
    kwargs, layers = setting(entry)
    same = entry.catalog_id in READS_SEQUENCE_INDEX
    inputs = several(same_prefix=same)
    ids, n = inputs["input_ids"], inputs["input_ids"].shape[1]
    with reference.attach(model, entry.catalog_id, layers=layers, **kwargs) as handle:
        together = model(**inputs).logits[:, -1]
        composed = torch.arange(n).expand(3, -1)
        for index in handle.patch.last_trace:
            composed = composed.gather(1, index)
        for i in range(3):
            alone = model(**several([i], same_prefix=same)).logits[0, -1]
            torch.testing.assert_close(together[i], alone, rtol=1e-4, atol=1e-5)
    image = ids.gather(1, composed) == IMAGE
    for i in range(3):
        assert composed[i][~image[i]].tolist() == (ids[i] != IMAGE).nonzero()[:, 0].tolist()
        # an image token stays between the text tokens around its own image
        text_before = (~image[i]).cumsum(0)
        source_text_before = (ids[i] != IMAGE).cumsum(0)
        assert torch.equal(text_before[image[i]], source_text_before[composed[i][image[i]]])
    if entry.catalog_id == "fastv":
        assert composed.shape[1] == n - N_IMAGE // 2 and (composed.diff(1) > 0).all()


@pytest.mark.parametrize("method", ["fastv", "pyramiddrop"])
@torch.no_grad()
def test_several_images_decode_as_recomputing_the_pruned_sequence(method):
    model = tiny_qwen(layers=LAYERS, hidden=HIDDEN)
    placement = registry.get(method).paper_placement(LAYERS)
    replayed_decoding(model, {i: Replay(r) for i, r in placement.items()}, several())


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_kept_tokens_keep_their_3d_mrope_positions_or_all_are_renumbered(kind):
    """FastV (``renumber=False``): every kept token, image or text, keeps its own
    ``(t, h, w)`` from ``get_rope_index``. PyramidDrop (``renumber=True``): the valid
    tokens are numbered ``0..n-1`` on all three axes, the host's renumbering."""
    model = tiny_qwen(kind, layers=LAYERS, hidden=HIDDEN)
    inputs = batch()
    full, _ = model.model.get_rope_index(
        inputs["input_ids"],
        inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"],
    )
    with reference.attach(model, "fastv", ratio=0.5) as handle:
        model(**inputs)
        (index,), (positions,) = handle.patch.last_trace, handle.patch.last_positions
    assert index.shape[1] == inputs["input_ids"].shape[1] - N_IMAGE // 2
    kept = full.gather(2, index[None].expand(3, -1, -1))
    valid = inputs["attention_mask"].gather(1, index) > 0
    assert torch.equal(positions[:, valid], kept[:, valid])
    image = inputs["input_ids"].gather(1, index) == IMAGE
    assert kept[1:, image].unique().numel() > 1  # the image keeps its 2-D layout
    with reference.attach(model, "pyramiddrop", retain=0.5, layers=[1]) as handle:
        model(**inputs)
        (index,), (positions,) = handle.patch.last_trace, handle.patch.last_positions
    valid = inputs["attention_mask"].gather(1, index) > 0
    numbered = (valid.long().cumsum(1) - 1)[None].expand(3, -1, -1)
    assert torch.equal(positions[:, valid], numbered[:, valid])


@torch.no_grad()
def test_scoring_under_sdpa_never_builds_full_attention_maps(monkeypatch):
    def refuse(*args):
        raise AssertionError("full attention maps built")

    monkeypatch.setattr(hf_llava_llm, "full_maps", refuse)
    model = tiny_qwen("qwen2_5_vl", "sdpa", layers=LAYERS, hidden=HIDDEN)
    inputs = batch()
    for method in ("fastv", "pyramiddrop"):
        with reference.attach(model, method):
            model.generate(**inputs, max_new_tokens=2)
    with reference.attach(model, "mustdrop", layers=[1]), pytest.raises(AssertionError):
        model(**inputs)  # MustDrop needs the maps


def test_what_cannot_run_is_refused_with_the_reason():
    model = tiny_qwen(layers=LAYERS, hidden=HIDDEN)
    with pytest.raises(ValueError, match="no paper placement"):
        reference.attach(model, "mustdrop")
    with pytest.raises(ValueError, match="decoder layer"):
        reference.attach(model, "fastv", layers=[LAYERS])
    with pytest.raises(ValueError, match="proportional_attn"):
        reference.attach(model, "fastv", proportional_attn=True)
    with reference.attach(model, "fastv"), pytest.raises(ValueError, match="already"):
        reference.attach(model, "random_pruning", keep=3)  # the vision stage on top
    with (
        reference.attach(model, "random_pruning", keep=3),
        pytest.raises(ValueError, match="already"),
    ):
        reference.attach(model, "fastv")
    flash = tiny_qwen(layers=LAYERS, hidden=HIDDEN)
    flash.config.text_config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="flash_attention_2"):
        reference.attach(flash, "fastv")
    sliding = tiny_qwen(layers=LAYERS, hidden=HIDDEN)
    sliding.config.text_config.layer_types = ["sliding_attention"] * LAYERS
    with pytest.raises(ValueError, match="sliding-window"):
        reference.attach(sliding, "fastv")
    with reference.attach(model, "fastv"):
        with pytest.raises(ValueError, match="same number of image tokens"):
            model(**mixed_grids([0, 1]))  # 16 and 8 image tokens
        with pytest.raises(ValueError, match="video"):
            model(input_ids=torch.tensor([[5, VIDEO, 6]]))
