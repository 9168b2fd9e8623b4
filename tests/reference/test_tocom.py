"""ToCom's own invariants: chained degree deltas, and the value-path compensation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reference.core import Signals
from reference.tocom import ToCom, compensate, degree_mask
from reference.tome import merge_wavg
from tests.reference.conftest import C, H, make_signals, tokens
from tests.reference.fixtures import load, tensor

GOLDEN = load("tocom")


@pytest.mark.parametrize(("a", "b", "c"), [(0, 3, 7), (5, 2, 9), (16, 4, 0)])
def test_degree_deltas_chain_and_reverse(a, b, c):
    def m(src, tgt):
        return degree_mask(2, 16, src, tgt)

    torch.testing.assert_close(m(a, b) + m(b, c), m(a, c))
    torch.testing.assert_close(m(a, b), -m(b, a))
    assert m(a, a).abs().sum() == 0
    assert m(a, b).abs().sum() == 2 * abs(b - a)  # one rank-2 chunk per degree step


def _official_and_ours(value_bias: float):
    """The official value-path delta, and ours with the adapter mapped onto it."""
    gen = torch.Generator().manual_seed(0)
    b, n, r, d = 2, 9, 6, C // H
    z = torch.randn(b, n, C, generator=gen, dtype=torch.float64)  # LN(x), attention input
    w_v = torch.randn(C, C, generator=gen, dtype=torch.float64)  # value projection
    b_v = value_bias * torch.randn(C, generator=gen, dtype=torch.float64)
    w_proj = torch.randn(C, C, generator=gen, dtype=torch.float64)  # output projection
    attn = torch.randn(b, H, n, n, generator=gen, dtype=torch.float64).softmax(-1)
    down = torch.randn(r, C, generator=gen, dtype=torch.float64)  # official adapter_down
    up = torch.randn(C, r, generator=gen, dtype=torch.float64)  # official adapter_up
    mask = degree_mask(2, 3, 1, 3).double()
    # Official: v += s * up(mask * down(z)); out = proj(attn @ v).
    delta_v = ((z @ down.t()) * mask) @ up.t()  # [B, N, C]
    heads = delta_v.reshape(b, n, H, d).transpose(1, 2)  # [B, H, N, D]
    official = 0.1 * ((attn @ heads).transpose(1, 2).reshape(b, n, C) @ w_proj.t())
    # Ours reads V = z W_v^T + b_v and folds W_proj into a per-head up-projection.
    values = (z @ w_v.t() + b_v).reshape(b, n, H, d).transpose(1, 2)
    down_ours = down @ torch.linalg.inv(w_v)
    up_ours = torch.stack(
        [up.t()[:, h * d : (h + 1) * d] @ w_proj.t()[h * d : (h + 1) * d] for h in range(H)]
    )  # [H, R, C]
    x = torch.randn(b, n, C, generator=gen, dtype=torch.float64)
    ours = compensate(x, attn, values, down_ours, up_ours, mask, 0.1) - x
    offset = 0.1 * torch.einsum("r,hrc->c", mask * (down_ours @ b_v), up_ours)
    return official, ours, offset


def test_value_path_equals_the_official_compensated_attention():
    """With ``b_v = 0`` the reparametrised delta is the official one, exactly."""
    official, ours, _ = _official_and_ours(0.0)
    torch.testing.assert_close(ours, official)


def test_a_value_bias_adds_the_same_vector_to_every_token():
    """With ``b_v != 0`` (every timm/DeiT ViT) the mapped adapter is not the official one."""
    official, ours, offset = _official_and_ours(0.3)
    assert (ours - official).abs().max() > 1e-3
    torch.testing.assert_close(ours - official, offset.expand_as(ours))


def _trained(**kwargs) -> ToCom:
    torch.manual_seed(0)
    method = ToCom(dim=C, num_heads=H, **kwargs).eval()
    with torch.no_grad():
        method.up.normal_()
    return method


def test_equal_degrees_are_plain_tome():
    x = tokens()
    signals = make_signals(x)
    out = _trained(r_src=4, r_tgt=4)(x, signals)
    torch.testing.assert_close(out.x, merge_wavg(x, signals.size, 4, 1, signals.keys).x)


def test_other_degrees_compensate_then_merge_with_unchanged_matching():
    x = tokens()
    signals = make_signals(x)
    method = _trained(r_src=2, r_tgt=4)
    out = method(x, signals)
    ref = merge_wavg(x, signals.size, 4, 1, signals.keys)
    assert torch.equal(out.index, ref.index) and torch.equal(out.assign, ref.assign)
    mask = degree_mask(2, 16, 2, 4)
    compensated = compensate(x, signals.attn, signals.values, method.down, method.up, mask, 0.1)
    expected = merge_wavg(
        torch.cat([x[:, :1], compensated[:, 1:]], 1),  # the CLS token is protected
        signals.size,
        4,
        1,
        signals.keys,
    )
    torch.testing.assert_close(out.x, expected.x)
    assert not torch.allclose(out.x, ref.x)
    # Delta(4 -> 2) is Delta(2 -> 4) with the sign flipped.
    delta_up = compensate(x, signals.attn, signals.values, method.down, method.up, mask, 0.1)
    delta_down = compensate(
        x, signals.attn, signals.values, method.down, method.up, degree_mask(2, 16, 4, 2), 0.1
    )
    torch.testing.assert_close(delta_down - x, -(delta_up - x))


def test_dropout_only_in_training():
    x = tokens()
    signals = make_signals(x)
    method = _trained(r_src=0, r_tgt=4)
    torch.testing.assert_close(method(x, signals).x, method(x, signals).x)
    method.train()
    assert not torch.allclose(method(x, signals).x, method(x, signals).x)


def test_compensate_prefix_compensates_the_cls_token_as_the_official_code():
    x = tokens()
    signals = make_signals(x)
    method = _trained(r_src=2, r_tgt=4, compensate_prefix=True)
    mask = degree_mask(2, 16, 2, 4)
    compensated = compensate(x, signals.attn, signals.values, method.down, method.up, mask, 0.1)
    expected = merge_wavg(compensated, signals.size, 4, 1, signals.keys)
    torch.testing.assert_close(method(x, signals).x, expected.x)
    assert not torch.allclose(expected.x[:, 0], x[:, 0])


@pytest.mark.parametrize("prefix", [1, 2])
def test_nan_in_one_samples_signals_never_reaches_a_prefix_token(prefix):
    x = tokens()
    b = x.shape[0]
    signals = make_signals(x, prefix)
    clean = make_signals(x, prefix)
    for name in ("attn", "values", "keys"):
        getattr(signals, name)[1] = torch.nan  # sample 1's signals only
    method = _trained(r_src=2, r_tgt=4)
    out = method(x, signals)
    assert torch.equal(out.x[:, :prefix], x[:, :prefix])  # every sample's prefix
    assert not torch.isfinite(out.x[1]).all()  # the NaN does reach sample 1's other tokens
    others = [i for i in range(b) if i != 1]
    sub = make_signals(x[others], prefix)
    for name in ("attn", "values", "keys", "size"):
        setattr(sub, name, getattr(clean, name)[others])
    alone = method(x[others], sub)
    torch.testing.assert_close(out.x[others], alone.x, rtol=0, atol=0)
    assert torch.equal(out.index[others], alone.index)
    assert torch.equal(out.assign[others], alone.assign)


def _golden_block(case: dict, compensate_prefix: bool):
    """The fixture's block as the host runs it: the uncompensated tokens at ``"mid"``, the
    signals, and ToCom with the official adapter mapped onto it (``b_v = 0`` here)."""
    x, qkv_w = tensor(case["x"]), tensor(case["qkv_weight"])
    proj_w, proj_b = tensor(case["proj_weight"]), tensor(case["proj_bias"])
    b, n, c = x.shape
    h, d = 2, c // 2
    z = F.layer_norm(x, (c,), eps=1e-6)
    q, k, v = (z @ qkv_w.t()).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4)  # [B, H, N, D]
    attn = (q @ k.transpose(-1, -2) * d**-0.5).softmax(-1)
    mid = x + (attn @ v).transpose(1, 2).reshape(b, n, c) @ proj_w.t() + proj_b
    down, up = tensor(case["adapter_down"]), tensor(case["adapter_up"])  # [R, C], [C, R]
    rank = down.shape[0] // 16
    # Official degree 1 is the last chunk of the adapter width, ours the first.
    perm = torch.tensor([(15 - i // rank) * rank + i % rank for i in range(down.shape[0])])
    up_t = up[:, perm].t()  # [R, C]
    method = ToCom(
        dim=c,
        num_heads=h,
        r_src=case["r_src"],
        r_tgt=case["r_tgt"],
        rank=rank,
        scale=case["scale"],
        compensate_prefix=compensate_prefix,
    ).eval()
    with torch.no_grad():
        method.down.copy_(down[perm] @ torch.linalg.inv(qkv_w[2 * c :]))
        method.up.copy_(
            torch.stack(
                [up_t[:, i * d : (i + 1) * d] @ proj_w.t()[i * d : (i + 1) * d] for i in range(h)]
            )
        )
    signals = Signals(prefix=1, size=torch.ones(b, n, 1), keys=k.mean(1), attn=attn, values=v)
    return x, mid, method, signals


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: f"{c['r_src']}to{c['r_tgt']}")
def test_reproduces_the_official_compensation_golden_fixture(case):
    """The official ``forward_attn`` + ``forward_block_tome`` (query delta zero, as its
    initialisation leaves it), with ``compensate_prefix=True``: same merge, same tokens."""
    x, mid, method, signals = _golden_block(case, compensate_prefix=True)
    out = method(mid, signals)
    assert torch.equal(out.assign, tensor(case["assign"], torch.long))
    torch.testing.assert_close(out.x, tensor(case["merged"]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.size, tensor(case["size"]), atol=1e-5, rtol=1e-5)
    # Before the merge: the compensated attention output, token for token.
    mask = degree_mask(method.rank, method.max_r, method.r_src, method.r_tgt)
    comp = compensate(mid, signals.attn, signals.values, method.down, method.up, mask, method.scale)
    torch.testing.assert_close(comp, x + tensor(case["attn_out"]), atol=1e-5, rtol=1e-5)


def test_the_default_leaves_the_cls_row_uncompensated_unlike_the_golden_fixture():
    case = GOLDEN["cases"][0]
    x, mid, method, signals = _golden_block(case, compensate_prefix=False)
    official = x + tensor(case["attn_out"])
    out = method(mid, signals)
    assert not torch.allclose(out.x, tensor(case["merged"]), atol=1e-3)
    torch.testing.assert_close(out.x[:, 0], mid[:, 0])  # CLS: the host's, not the official
    assert (official[:, 0] - mid[:, 0]).abs().max() > 1e-2
