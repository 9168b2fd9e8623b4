"""CrossGET's own invariants: complete-graph matching, cross guidance, weighted ensemble."""

from __future__ import annotations

import pytest
import torch

from reference.core import Signals
from reference.crossget import CrossGET, crossget_merge
from reference.hosts.llava import TINY, LlavaHost
from tests.reference.conftest import (
    B,
    N,
    assert_cached_decoding_matches,
    llava_inputs,
    make_signals,
    tokens,
)
from tests.reference.fixtures import load, tensor

GOLDEN = load("crossget")

C = 32


def naive_crossget(x, size, keys, importance, r, prefix):
    """One sample at a time, one token at a time, as the official ``match``/``merge`` read."""
    outs, sizes, indices = [], [], []
    for i in range(x.shape[0]):
        k = torch.nn.functional.normalize(keys[i].float(), dim=-1)
        sim = k @ k.T
        n = sim.shape[0]
        for a in range(n):
            for b in range(n):
                if a == b or a < prefix or b < prefix:
                    sim[a, b] = -torch.inf
        best_any = sim.max(1).values.tolist()
        order = sorted(range(n), key=lambda t: -best_any[t])  # stable: ties by position
        rank = {t: p for p, t in enumerate(order)}
        rows = sim.tolist()
        best = [
            max([rows[a][b] for b in range(n) if rank[b] > rank[a]], default=-torch.inf)
            for a in range(n)
        ]
        score = [importance[i, a].item() - best[a] for a in range(n)]
        edge = sorted(range(n), key=lambda t: score[t])
        src, dst_all = edge[:r], edge[r:]
        value = {d: x[i, d] * size[i, d] for d in dst_all}
        total = {d: size[i, d].clone() for d in dst_all}
        for s in src:
            d = max(dst_all, key=lambda t: rows[s][t])
            w = torch.stack([importance[i, s], importance[i, d]]).softmax(0) * 2
            value[d] = value[d] + w[0] * x[i, s] * size[i, s] + (w[1] - 1) * x[i, d] * size[i, d]
            total[d] = total[d] + size[i, s]
        kept = sorted(dst_all)
        outs.append(torch.stack([value[d] / total[d] for d in kept]))
        sizes.append(torch.stack([total[d] for d in kept]))
        indices.append(torch.tensor(kept))
    return torch.stack(outs), torch.stack(sizes), torch.stack(indices)


def orthonormal(n: int, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(C, C, generator=torch.Generator().manual_seed(seed)))
    return q.T[:n]  # [n, C] orthonormal rows


def pairs_scene():
    """Token 1 ~ token 2 (cos 0.99), token 3 ~ token 4 (cos 0.93), the rest orthogonal."""
    e = orthonormal(N + 2)
    x = e[:N].clone()
    x[2] = e[1] + 0.15 * e[N]
    x[4] = e[3] + 0.4 * e[N + 1]
    return x[None], e


def run(x, text, r=1):
    signals = Signals(prefix=1, size=torch.ones(*x.shape[:2], 1), keys=x, state={"text": text})
    return CrossGET(r=r)(x, signals)


def test_matches_a_token_by_token_reading_of_the_official_code():
    x = tokens()
    signals = make_signals(x)
    signals.size = torch.randint(1, 4, (B, N, 1)).float()
    out = CrossGET(r=5, stable=True)(x, signals)  # the reading breaks ties by position
    guide = signals.state["text"].mean(1)
    importance = torch.nn.functional.cosine_similarity(x, guide[:, None], dim=-1)
    want_x, want_size, want_index = naive_crossget(x, signals.size, signals.keys, importance, 5, 1)
    assert torch.equal(out.index, want_index)
    torch.testing.assert_close(out.size, want_size)
    torch.testing.assert_close(out.x, want_x)
    # every input token goes to the slot of a kept token; kept tokens to their own
    assert torch.equal(out.index.gather(1, out.assign).ne(-1), torch.ones(B, N, dtype=torch.bool))
    assert (out.index.gather(1, out.assign.gather(1, out.index)) == out.index).all()


def test_text_guidance_protects_the_pair_the_text_is_about():
    x, e = pairs_scene()
    # Guided by token 1's content, the closest pair (1, 2) survives; (3, 4) is merged.
    out = run(x, e[1][None, None])
    assert out.num_tokens == N - 1 and (out.assign[0, 3] == out.assign[0, 4])
    assert out.assign[0].unique().numel() == N - 1
    # Guided by token 3's content, the closest pair (1, 2) is merged instead.
    out = run(x, e[3][None, None])
    assert out.assign[0, 1] == out.assign[0, 2] and out.assign[0, 3] != out.assign[0, 4]


def test_merged_pair_is_the_importance_softmax_weighted_average():
    x, e = pairs_scene()
    text = (e[1] + 0.5 * e[3])[None, None]
    out = run(x, text)
    imp = torch.nn.functional.cosine_similarity(x[0], text[0], dim=-1)
    w = torch.stack([imp[3], imp[4]]).softmax(0)
    slot = out.assign[0, 3]
    assert out.assign[0, 4] == slot and out.index[0, slot] == 4
    torch.testing.assert_close(out.x[0, slot], w[0] * x[0, 3] + w[1] * x[0, 4])
    assert out.size[0, slot, 0] == 2


def test_without_text_the_cls_token_guides():
    x = tokens()
    signals = make_signals(x)
    with_cls = CrossGET(r=4)(
        x, Signals(prefix=1, size=signals.size, keys=signals.keys, state={"text": x[:, :1]})
    )
    signals.state = {}
    torch.testing.assert_close(CrossGET(r=4)(x, signals).x, with_cls.x)


def test_at_most_half_of_the_non_prefix_tokens_are_merged():
    x = tokens()
    out = CrossGET(r=100)(x, make_signals(x))
    assert out.num_tokens == N - (N - 1) // 2 == CrossGET(r=100).budget(N, 1)[0]


def test_llava_host_cached_decoding_equals_recomputation():
    torch.manual_seed(0)
    host = LlavaHost(TINY).eval().apply(vision=CrossGET(r=4))
    g = torch.Generator().manual_seed(1)
    state = {"text": torch.randn(B, 3, TINY.vision["embed_dim"], generator=g)}
    keys = assert_cached_decoding_matches(host, *llava_inputs(), state=state)
    assert keys == 2 + 16 - 4 + 5


@pytest.mark.parametrize(
    "case", GOLDEN["cases"], ids=lambda c: f"n{c['n']}-cls{int(c['class_token'])}-r{c['r']}"
)
def test_reproduces_the_official_crossget_golden_fixture(case):
    """The official CLIP ``TokenReduction.forward``, guided by the last token's query; with
    ``class_token`` it protects token 0 and the cross token (the last one)."""
    x, metric, size = tensor(case["x"]), tensor(case["metric"]), tensor(case["size"])
    query = tensor(case["query"])[:, -1]  # [B, D] the official guide
    unit = torch.nn.functional.normalize
    importance = (unit(metric, dim=-1) @ unit(query, dim=-1)[..., None])[..., 0]  # [B, N]
    protect = int(case["class_token"])
    out = crossget_merge(x, size, protect, metric, importance, case["r"], suffix=protect)
    assert torch.equal(out.index, torch.tensor(case["kept_index"]))
    torch.testing.assert_close(out.x, tensor(case["out_x"]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.size, tensor(case["out_size"]), atol=1e-5, rtol=1e-5)
    src = torch.tensor(case["src_index"])  # [B, r]
    destination = out.index.gather(1, out.assign.gather(1, src))
    assert torch.equal(destination, torch.tensor(case["src_destination"]))


def test_mutually_nearest_pairs_tie_and_stable_breaks_them_by_position():
    """Fixture case 0: the official unstable sort orders a tie against position, so the
    position rule (``stable=True``) merges a different token there."""
    case = GOLDEN["cases"][0]
    x, metric, size = tensor(case["x"]), tensor(case["metric"]), tensor(case["size"])
    query = tensor(case["query"])[:, -1]
    unit = torch.nn.functional.normalize
    importance = (unit(metric, dim=-1) @ unit(query, dim=-1)[..., None])[..., 0]
    out = crossget_merge(x, size, 1, metric, importance, case["r"], suffix=1, stable=True)
    assert out.index.shape == torch.tensor(case["kept_index"]).shape
    assert not torch.equal(out.index, torch.tensor(case["kept_index"]))
