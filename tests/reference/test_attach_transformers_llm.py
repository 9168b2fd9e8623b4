"""``reference.attach`` of language-model-stage methods on a transformers LLaVA.

Every registered ``LLMReducer`` runs inside the Llama decoder of a tiny random
``LlavaForConditionalGeneration`` (built offline, nothing downloaded) and is checked
against the reference LLaVA host loaded with the same weights (``to_reference_host``):
prefill logits, greedy tokens and every decoding step's logits, under sdpa and eager.
"""

from __future__ import annotations

import pytest
import torch

import reference
from reference import registry
from reference.hosts.llava import LLMReducer
from tests.reference.test_attach_transformers import IMAGE, N_IMAGE, PIXELS, TEXTS, tiny_llava

transformers = pytest.importorskip("transformers")
from reference.adapters import hf_llava_llm  # noqa: E402
from reference.adapters.hf_llava import to_reference_host  # noqa: E402
from reference.fastv import FastV  # noqa: E402
from reference.ficoco import FiCoCoL  # noqa: E402

ENTRIES = [e for e in registry.entries() if issubclass(e.cls, LLMReducer)]
IDS = [e.catalog_id for e in ENTRIES]
PREFIX = [5, 6]
STEPS = 4


def setting(entry, config: str = "some") -> tuple[dict, list[int] | None]:
    """Keyword arguments and layers: the paper placement where the method has one and
    takes the test config's arguments, else the config's arguments after layer 1."""
    kwargs = entry.cls.test_configs[config]
    try:
        placed = entry.cls.paper_placement(4, **kwargs)
    except (TypeError, ValueError):
        placed = {}
    return kwargs, None if placed else [1]


def hf_batch(texts=TEXTS, prefixes=None):
    """Left-padded ``input_ids``, ``attention_mask`` and ``position_ids`` (as ``generate``)."""
    prefixes = prefixes or [PREFIX] * len(texts)
    rows = [p + [IMAGE] * N_IMAGE + t for p, t in zip(prefixes, texts, strict=True)]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask, (mask.cumsum(1) - 1).clamp(min=0)


def host_batch(texts=TEXTS):
    """The same prompts in the host's layout: prefix, image, right-padded instruction."""
    width = max(map(len, texts))
    suffix = torch.tensor([t + [0] * (width - len(t)) for t in texts])
    valid = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in texts]) > 0
    return torch.tensor([PREFIX] * len(texts)), suffix, valid


@torch.no_grad()
def host_greedy(host, steps: int = STEPS, texts=TEXTS, pixels=PIXELS):
    """Greedy tokens ``[B, steps]`` and the logits of every step on the reference host."""
    prefix, suffix, valid = host_batch(texts)
    logits, cache = host.prefill(pixels, prefix, suffix, valid)
    scores, tokens = [logits], []
    for _ in range(steps - 1):
        tokens.append(scores[-1].argmax(-1))
        scores.append(host.decode(tokens[-1], cache))
    tokens.append(scores[-1].argmax(-1))
    return torch.stack(tokens, 1), scores


def last_logits(model, ids, mask, positions, pixels=PIXELS, **kwargs):
    return model(
        input_ids=ids, attention_mask=mask, position_ids=positions, pixel_values=pixels, **kwargs
    ).logits[:, -1]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
@torch.no_grad()
def test_same_method_same_weights_same_prefill_decoding_and_tokens_as_the_host(entry, attn):
    """A left-padded batch on the transformers model and the right-padded batch on the
    reference host with its weights: the same prefill logits, the same greedy tokens,
    the same logits at every cached decoding step."""
    model = tiny_llava(attn)
    host = to_reference_host(model)
    kwargs, layers = setting(entry)
    ids, mask, positions = hf_batch()
    with (
        reference.attach(model, entry.catalog_id, layers=layers, **kwargs),
        reference.attach(host, entry.catalog_id, layers=layers, **kwargs),
    ):
        got = last_logits(model, ids, mask, positions, use_cache=False)  # keys projected again
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=PIXELS,
            max_new_tokens=STEPS,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
        tokens, scores = host_greedy(host)
    torch.testing.assert_close(got, scores[0], rtol=1e-4, atol=1e-5)
    assert torch.equal(out.sequences[:, ids.shape[1] :], tokens)
    for step, (hf, ref) in enumerate(zip(out.scores, scores, strict=True)):
        torch.testing.assert_close(hf, ref, rtol=1e-4, atol=1e-5, msg=f"step {step}")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@torch.no_grad()
def test_one_unpadded_prompt_decodes_as_on_the_host(attn):
    """Batch 1 without padding: sdpa takes no mask (its causal path) after a drop."""
    model = tiny_llava(attn)
    host = to_reference_host(model)
    ids = hf_batch(TEXTS[:1])[0]
    for method in ("fastv", "pyramiddrop"):
        with reference.attach(model, method), reference.attach(host, method):
            out = model.generate(
                input_ids=ids,
                pixel_values=PIXELS[:1],
                max_new_tokens=STEPS,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
            )
            tokens, scores = host_greedy(host, texts=TEXTS[:1], pixels=PIXELS[:1])
        assert torch.equal(out.sequences[:, ids.shape[1] :], tokens)
        for hf, ref in zip(out.scores, scores, strict=True):
            torch.testing.assert_close(hf, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
@torch.no_grad()
def test_cached_decoding_equals_recomputing_the_pruned_sequence(entry):
    """Each cached step equals the host recomputing the pruned prompt plus the tokens
    decoded so far without a cache (its recorded reductions replayed)."""
    model = tiny_llava()
    host = to_reference_host(model)
    kwargs, layers = setting(entry)
    ids, mask, _ = hf_batch()
    prefix, suffix, valid = host_batch()
    with (
        reference.attach(model, entry.catalog_id, layers=layers, **kwargs),
        reference.attach(host, entry.catalog_id, layers=layers, **kwargs),
    ):
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=PIXELS,
            max_new_tokens=STEPS,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
        host.prefill(PIXELS, prefix, suffix, valid)
        trace, new = host.last_trace, out.sequences[:, ids.shape[1] :]
        for t in range(1, STEPS):
            recomputed, _ = host.prefill(
                PIXELS, prefix, suffix, valid, extra_ids=new[:, :t], replay=trace
            )
            torch.testing.assert_close(out.scores[t], recomputed, rtol=1e-4, atol=1e-5)


# DART visits its pivots in the iteration order of the set of their sequence indices
# (as the official code does), so where the image sits in the sequence matters to it.
READS_SEQUENCE_INDEX = {"dart"}


@pytest.mark.parametrize("prefixes", ["same", "different"])
@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
@torch.no_grad()
def test_a_padded_batch_gives_each_sample_what_it_gets_alone(entry, prefixes):
    """Left padding; with prefixes of different lengths the method still sees one image
    index for the batch, with padding slots before the shorter prefixes."""
    if prefixes == "different" and entry.catalog_id in READS_SEQUENCE_INDEX:
        pytest.skip("the method's choice depends on the image's index in the sequence")
    model = tiny_llava()
    kwargs, layers = setting(entry)
    prefixes = [PREFIX] * 3 if prefixes == "same" else [PREFIX, [5], [5, 6, 7, 8]]
    with reference.attach(model, entry.catalog_id, layers=layers, **kwargs):
        together = last_logits(model, *hf_batch(TEXTS, prefixes))
        for i, (p, text) in enumerate(zip(prefixes, TEXTS, strict=True)):
            ids, _, _ = hf_batch([text], [p])
            alone = model(input_ids=ids, pixel_values=PIXELS[i : i + 1]).logits[0, -1]
            torch.testing.assert_close(together[i], alone, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_a_right_padded_forward_keeps_the_padding_at_the_end():
    model = tiny_llava()
    rows = [PREFIX + [IMAGE] * N_IMAGE + t for t in TEXTS]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    with reference.attach(model, "fastv", ratio=0.5):
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=PIXELS).logits
        for i, r in enumerate(rows):
            alone = model(input_ids=torch.tensor([r]), pixel_values=PIXELS[i : i + 1]).logits
            last = len(r) - 1 - N_IMAGE // 2  # the last valid token after the drop
            torch.testing.assert_close(logits[i, last], alone[0, -1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
@torch.no_grad()
def test_text_tokens_are_kept_in_order_and_each_layer_caches_its_own_length(entry):
    model = tiny_llava()
    kwargs, layers = setting(entry)
    ids, mask, positions = hf_batch()
    n = ids.shape[1]
    with reference.attach(model, entry.catalog_id, layers=layers, **kwargs) as handle:
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            pixel_values=PIXELS,
            use_cache=True,
        )
        trace, reducers = handle.patch.last_trace, handle.reducers
    lengths = [out.cache.get_seq_length(i) for i in range(4)]
    composed = torch.arange(n).expand(3, -1)
    for layer in range(4):
        assert lengths[layer] == composed.shape[1]
        if layer in reducers:
            composed = composed.gather(1, trace.pop(0))
    assert not trace
    assert out.logits.shape[1] == composed.shape[1]
    image = ids.gather(1, composed) == IMAGE
    for i in range(3):  # every text and padding token, in order; only image tokens gone
        assert composed[i][~image[i]].tolist() == (ids[i] != IMAGE).nonzero()[:, 0].tolist()
    if entry.catalog_id == "fastv":
        assert lengths == [n, n, n - N_IMAGE // 2, n - N_IMAGE // 2]
        assert (composed.diff(1) > 0).all()  # kept tokens keep their order (and positions)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
@torch.no_grad()
def test_zero_budget_gives_the_plain_models_logits_and_tokens(entry, attn):
    model = tiny_llava(attn)
    kwargs, _ = setting(entry, "zero")
    ids, mask, positions = hf_batch()
    plain = last_logits(model, ids, mask, positions)
    plain_tokens = model.generate(
        input_ids=ids, attention_mask=mask, pixel_values=PIXELS, max_new_tokens=3, do_sample=False
    )
    with reference.attach(model, entry.catalog_id, layers=[0, 2], **kwargs):
        assert torch.equal(last_logits(model, ids, mask, positions), plain)
        tokens = model.generate(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=PIXELS,
            max_new_tokens=3,
            do_sample=False,
        )
    assert torch.equal(tokens, plain_tokens)


@torch.no_grad()
def test_detach_restores_the_model_exactly_and_nothing_enters_the_state_dict():
    model = tiny_llava()
    ids, mask, positions = hf_batch()
    plain = last_logits(model, ids, mask, positions)
    parts = [model, model.model, model.model.language_model, *model.model.language_model.layers]
    before = [dict(p.__dict__) for p in parts]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with reference.attach(model, "pyramiddrop"):
        assert model.state_dict().keys() == state.keys()
        assert not torch.equal(last_logits(model, ids, mask, positions), plain)
    for part, saved in zip(parts, before, strict=True):
        assert part.__dict__.keys() == saved.keys()
        assert all(part.__dict__[k] is v for k, v in saved.items())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(last_logits(model, ids, mask, positions), plain)


@torch.no_grad()
def test_instances_dicts_and_an_unregistered_merging_method_match_the_host():
    """``layers=[...]`` with an instance, a dict by layer, and FiCoCo-L (merging, not
    registered) as an instance: the host's logits."""
    model = tiny_llava()
    host = to_reference_host(model)
    ids, mask, positions = hf_batch()
    prefix, suffix, valid = host_batch()
    cases = [
        (dict(method=FastV(0.5), layers=[1]), dict(method=FastV(0.5), layers=[1])),
        (dict(method={1: FastV(0.5)}), dict(method=FastV(0.5), layers=[1])),
        (dict(method=FiCoCoL(r=6), layers=[1]), dict(method=FiCoCoL(r=6), layers=[1])),
    ]
    for on_model, on_host in cases:
        with (
            reference.attach(model, on_model.pop("method"), **on_model),
            reference.attach(host, on_host.pop("method"), **on_host),
        ):
            got = last_logits(model, ids, mask, positions)
            expected, _ = host.prefill(PIXELS, prefix, suffix, valid)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_scoring_under_sdpa_never_builds_full_attention_maps(monkeypatch):
    def refuse(*args):
        raise AssertionError("full attention maps built")

    monkeypatch.setattr(hf_llava_llm, "full_maps", refuse)
    model = tiny_llava("sdpa")
    ids, mask, positions = hf_batch()
    for method in ("fastv", "pyramiddrop"):
        with reference.attach(model, method):
            last_logits(model, ids, mask, positions)
    with reference.attach(model, "mustdrop", layers=[1]), pytest.raises(AssertionError):
        last_logits(model, ids, mask, positions)  # MustDrop needs the maps


class Unknown(LLMReducer):
    """A method that asks for a signal the adapter does not compute."""

    needs = frozenset({"last_attn", "telepathy"})


def test_what_cannot_run_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="no paper placement"):
        reference.attach(tiny_llava(), "mustdrop")
    with pytest.raises(ValueError, match="say where"):
        reference.attach(tiny_llava(), FastV(0.5))
    with pytest.raises(ValueError, match="decoder layer"):
        reference.attach(tiny_llava(), "fastv", layers=[4])
    model = tiny_llava()
    model.config.text_config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="flash_attention_2"):
        reference.attach(model, "fastv")
    model = tiny_llava()
    with reference.attach(model, "fastv"), pytest.raises(ValueError, match="already"):
        reference.attach(model, "fastv")
    with pytest.raises(ValueError, match="does not compute"):
        reference.attach(model, Unknown(), layers=[1])
    one = PREFIX + [IMAGE] * N_IMAGE + TEXTS[0]
    two = PREFIX + [IMAGE] * N_IMAGE + [7] + [IMAGE] * N_IMAGE + TEXTS[1]  # two images
    ids = torch.tensor([[0] * (len(two) - len(one)) + one, two])
    mask = torch.tensor([[0] * (len(two) - len(one)) + [1] * len(one), [1] * len(two)])
    with reference.attach(model, "fastv"), pytest.raises(ValueError, match="same number"):
        model(input_ids=ids, attention_mask=mask, pixel_values=PIXELS)
