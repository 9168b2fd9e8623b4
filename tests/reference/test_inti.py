"""InTI's own invariants: each same-position frame pair becomes a convex interpolation."""

from __future__ import annotations

import torch

from reference.hosts import vit
from reference.inti import InTI
from tests.reference.conftest import B, C, make_signals, tiny_host, tokens


def method(frame_tokens: int = 4, scales: tuple[int, ...] = (1, 3, 5)) -> InTI:
    torch.manual_seed(0)
    return InTI(frame_tokens=frame_tokens, dim=C, hidden=8, scales=scales).eval()


def pairs(x: torch.Tensor, p: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    frames = x[:, 1:].reshape(B, -1, p, C)
    return frames[:, 0::2], frames[:, 1::2]  # [B, T/2, P, C] each


def test_fused_tokens_are_convex_interpolations_of_their_pair(x):
    out = method()(x, make_signals(x))
    first, second = pairs(x)
    fused = out.x[:, 1:].reshape(B, 2, 4, C)
    diff = first - second
    w = ((fused - second) * diff).sum(-1) / diff.square().sum(-1)  # weight of the first frame
    torch.testing.assert_close(fused, second + w[..., None] * diff, rtol=1e-4, atol=1e-5)
    assert ((w > 0) & (w < 1)).all()
    assert w.std() > 1e-3, "weights are predicted per token, not constant"


def test_zero_head_interpolates_halfway(x):
    m = method()
    torch.nn.init.zeros_(m.predictor.head.weight)
    torch.nn.init.zeros_(m.predictor.head.bias)
    first, second = pairs(x)
    out = m(x, make_signals(x))
    torch.testing.assert_close(out.x[:, 1:].reshape(B, 2, 4, C), (first + second) / 2)


def test_weights_depend_on_spatial_context(x):
    moved = x.clone()
    moved[:, 1 + 3] += 3.0 * torch.randn(C)  # frame 0, position 3

    def fused_at_position_0(m: InTI, t: torch.Tensor) -> torch.Tensor:
        return m(t, make_signals(t)).x[:, 1]

    wide, point = method(scales=(3,)), method(scales=(1,))
    # A 3x3 spatial kernel lets position 3 (diagonal neighbour of 0 in the 2x2 frame) in;
    # a 1x1 kernel does not.
    assert not torch.allclose(fused_at_position_0(wide, x), fused_at_position_0(wide, moved))
    torch.testing.assert_close(fused_at_position_0(point, x), fused_at_position_0(point, moved))


def test_pairs_share_a_slot_and_sizes_add_up(x):
    out = method()(x, make_signals(x))
    expected = torch.tensor([0, 1, 2, 3, 4, 1, 2, 3, 4, 5, 6, 7, 8, 5, 6, 7, 8])
    assert (out.assign == expected).all()
    torch.testing.assert_close(out.size[:, 1:, 0], torch.full((B, 8), 2.0))
    assert (out.index[:, 1:] == -1).all() and (out.index[:, 0] == 0).all()


def test_odd_last_frame_is_carried_through():
    x = tokens()[:, : 1 + 12]  # three frames of four tokens
    out = method()(x, make_signals(x))
    assert out.x.shape[1] == 1 + 4 + 4
    torch.testing.assert_close(out.x[:, 5:], x[:, 9:])
    assert (out.index[:, 5:] == torch.arange(9, 13)).all()
    assert (out.assign[:, 9:] == torch.arange(5, 9)).all()


def test_stacked_steps_keep_halving_the_frames():
    host = tiny_host()
    vit.apply(host, {1: method(frame_tokens=2), 2: method(frame_tokens=2)})
    host(torch.randn(2, 3, 32, 32))
    assert vit.tokens_after(host) == [1 + 8, 1 + 4]
