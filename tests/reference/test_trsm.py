"""TRSM's own invariants: text-prompt retrieval by cosine similarity, on the LLaVA host."""

from __future__ import annotations

from dataclasses import replace

import torch

from reference.hosts.llava import TINY, LlavaHost
from reference.trsm import TRSM
from tests.reference.conftest import (
    B,
    N,
    assert_cached_decoding_matches,
    llava_inputs,
    make_signals,
)


def test_keeps_the_tokens_most_similar_to_any_prompt_token(x):
    s = make_signals(x)
    text = s.state["text"]  # [B, T, C]
    out = TRSM(ratio=0.5)(x, s)
    for i in range(B):
        rel = torch.stack(
            [max(torch.cosine_similarity(x[i, j], t, dim=0) for t in text[i]) for j in range(1, N)]
        )
        expected = sorted((rel.topk(8).indices + 1).tolist())
        assert out.index[i].tolist() == [0, *expected]
        torch.testing.assert_close(out.x[i], x[i, [0, *expected]])


def test_padding_prompt_tokens_are_not_queries(x):
    s = make_signals(x)
    text = s.state["text"]
    noise = torch.randn(B, 3, x.shape[-1], generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([True] * text.shape[1] + [False] * 3).expand(B, -1)
    padded = replace(s, state={"text": torch.cat([text, noise], 1), "text_mask": mask})
    plain = TRSM(ratio=0.5)(x, s)
    assert torch.equal(TRSM(ratio=0.5)(x, padded).index, plain.index)
    unmasked = replace(s, state={"text": torch.cat([text, noise], 1)})
    assert not torch.equal(TRSM(ratio=0.5)(x, unmasked).index, plain.index)


def test_without_text_the_cls_token_is_the_query(x):
    s = make_signals(x)
    no_text = TRSM(ratio=0.5)(x, replace(s, state={}))
    cls_query = TRSM(ratio=0.5)(x, replace(s, state={"text": x[:, :1]}))
    assert torch.equal(no_text.index, cls_query.index)
    assert not torch.equal(no_text.index, TRSM(ratio=0.5)(x, s).index)


def test_llava_host_cached_decoding_equals_recomputing_the_pruned_sequence():
    torch.manual_seed(0)
    host = LlavaHost(TINY).eval().apply(vision=TRSM(ratio=0.25))
    images, prefix, suffix, valid = llava_inputs()
    text = torch.randn(3, 4, TINY.vision["embed_dim"], generator=torch.Generator().manual_seed(1))
    keys = assert_cached_decoding_matches(host, images, prefix, suffix, valid, {"text": text})
    assert keys == 2 + 12 + 5  # 16 image tokens -> 12
    # The prompt steers the retrieval: another prompt keeps other image tokens.
    _, first = host.encode_images(images, {"text": text})
    _, other = host.encode_images(images, {"text": -text})
    assert not torch.equal(first.index, other.index)
