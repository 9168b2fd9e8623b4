"""RLT's own invariants: static patches are dropped and a kept patch stands for its run."""

from __future__ import annotations

import itertools

import pytest
import torch

from reference.core import Signals
from reference.hosts import vit
from reference.rlt import RLT
from tests.reference.conftest import C, make_signals, tiny_host
from tests.reference.fixtures import load, tensor

T, P = 4, 4  # frames, patches per frame (the conftest's 16 patch tokens)


def method(**kwargs) -> RLT:
    torch.manual_seed(0)
    return RLT(**{"frame_tokens": P, "threshold": 0.5, "dim": C, **kwargs}).eval()


def video(b: int = 3, seed: int = 0) -> torch.Tensor:
    """``[b, 1 + T P, C]``: random clips where about half the patches repeat the previous frame."""
    gen = torch.Generator().manual_seed(seed)
    frames = torch.randn(b, T, P, C, generator=gen)
    static = torch.rand(b, T, P, generator=gen) < 0.5
    for t in range(1, T):
        frames[:, t][static[:, t]] = frames[:, t - 1][static[:, t]]
    cls = torch.randn(b, 1, C, generator=gen)
    return torch.cat([cls, frames.flatten(1, 2)], dim=1)


def naive_keep(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """The rule written out per patch: ``[B, T, P]`` keep mask."""
    frames = x[:, 1:].reshape(x.shape[0], T, P, C)
    keep = torch.zeros(x.shape[0], T, P, dtype=torch.bool)
    for b in range(x.shape[0]):
        for t in range(T):
            for p in range(P):
                diff = (frames[b, t, p] - frames[b, t - 1, p]).abs().mean()
                keep[b, t, p] = t == 0 or bool(diff > threshold)
    return keep


def naive_runs(keep: torch.Tensor) -> torch.Tensor:
    """Run length (frames until the next kept patch at the same position), 0 if dropped."""
    runs = torch.zeros(keep.shape, dtype=torch.long)
    for b in range(keep.shape[0]):
        for p in range(P):
            kept = [t for t in range(T) if keep[b, t, p]] + [T]
            for start, stop in itertools.pairwise(kept):
                runs[b, start, p] = stop - start
    return runs


def test_keeps_exactly_the_changed_patches_in_order():
    x = video()
    out = method()(x, make_signals(x))
    keep = naive_keep(x, 0.5)
    assert not keep.all() and keep[:, 1:].any(), "the clip must have both kinds"
    for b in range(x.shape[0]):
        expected = torch.cat([x[b, :1], x[b, 1:][keep[b].flatten()]])
        torch.testing.assert_close(out.x[b, : len(expected)], expected)
        assert (out.x[b, len(expected) :] == 0).all()  # padding slots only after


def test_sizes_are_run_lengths_and_dropped_patches_join_their_run():
    x = video()
    out = method()(x, make_signals(x))
    keep = naive_keep(x, 0.5)
    runs = naive_runs(keep)
    for b in range(x.shape[0]):
        k = int(keep[b].sum())
        torch.testing.assert_close(out.size[b, 1 : 1 + k, 0], runs[b][keep[b]].float())
        assert out.size[b].sum() == 1 + T * P  # every frame is accounted for once
        slot_size = torch.zeros(out.x.shape[1]).index_add(0, out.assign[b], torch.ones(1 + T * P))
        torch.testing.assert_close(slot_size, out.size[b, :, 0])
        # A dropped patch goes to the kept patch at its position in the latest kept frame.
        for t in range(1, T):
            for p in range(P):
                if not keep[b, t, p]:
                    prev = 1 + (t - 1) * P + p
                    assert out.assign[b, 1 + t * P + p] == out.assign[b, prev]


def test_compares_with_the_previous_frame_not_the_run_head():
    # A slow drift: every step is below the threshold, the total drift is not.
    base = torch.randn(1, 1, P, C)
    steps = torch.arange(T, dtype=torch.float32)[None, :, None, None] * 0.4
    x = torch.cat([torch.randn(1, 1, C), (base + steps).flatten(1, 2)], dim=1)
    out = method()(x, make_signals(x))
    assert out.num_tokens == 1 + P
    torch.testing.assert_close(out.size[0, 1:, 0], torch.full((P,), float(T)))


def test_threshold_is_strict_and_first_frame_is_always_kept():
    still = torch.randn(1, 1, P, C).expand(1, T, P, C).flatten(1, 2)  # the same frame T times
    x = torch.cat([torch.randn(1, 1, C), still], dim=1)
    out = method(threshold=0.0)(x, make_signals(x))  # identical frames: difference 0, dropped
    assert out.num_tokens == 1 + P
    torch.testing.assert_close(out.x, x[:, : 1 + P])
    assert method(threshold=-1.0)(x, make_signals(x)).num_tokens == x.shape[1]


def test_batch_is_padded_with_empty_slots():
    x = video()
    out = method()(x, make_signals(x))
    counts = 1 + naive_keep(x, 0.5).flatten(1).sum(1)
    assert len(set(counts.tolist())) > 1, "the clips must keep different counts"
    assert out.num_tokens == int(counts.max())
    empty = torch.arange(out.num_tokens) >= counts[:, None]
    assert out.mask is not None and (out.mask == (~empty).float()).all()
    assert (out.size[empty] == 0).all() and (out.index[empty] == -1).all()


def test_max_keep_keeps_the_largest_differences():
    x = torch.randn(3, 1 + T * P, C, generator=torch.Generator().manual_seed(1))  # no ties
    m = method(threshold=-1.0, max_keep=0.5)
    out = m(x, make_signals(x))
    assert out.num_tokens == 1 + P + (T - 1) * P // 2 == m.budget(x.shape[1], 1)[1]
    frames = x[:, 1:].reshape(-1, T, P, C)
    diff = (frames[:, 1:] - frames[:, :-1]).abs().mean(-1).flatten(1)  # [B, (T-1) P]
    for b in range(x.shape[0]):
        top = diff[b].topk((T - 1) * P // 2).indices + 1 + P
        kept = out.index[b, 1 + P :]
        assert set(kept.tolist()) == set(top.tolist())


def test_length_embedding_is_added_by_run_length():
    x = video()
    m = method(length_frames=T)
    out = m(x, make_signals(x))
    keep = naive_keep(x, 0.5)
    runs = naive_runs(keep)
    for b in range(x.shape[0]):
        k = int(keep[b].sum())
        expected = x[b, 1:][keep[b].flatten()] + m.length_embed[runs[b][keep[b]] - 1]
        torch.testing.assert_close(out.x[b, 1 : 1 + k], expected)
    torch.testing.assert_close(out.x[:, 0], x[:, 0])


def test_host_drops_repeated_frames():
    # With no position embedding, an image whose four patch rows are the same is a
    # static 4-frame clip of 4 patches: only the first frame survives.
    host = tiny_host()
    with torch.no_grad():
        host.pos_embed.zero_()
    row = torch.randn(2, 3, 8, 32)
    images = row.repeat(1, 1, 4, 1)  # [2, 3, 32, 32]
    vit.apply(host, {0: RLT(frame_tokens=P, threshold=1e-4)}, proportional_attn=True)
    logits = host(images)
    assert vit.tokens_after(host) == [1 + P]
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(host.last_state.size[:, 1:, 0], torch.full((2, P), float(T)))


GOLDEN = load("rlt")


def patch_tokens(video: torch.Tensor, ps: int) -> torch.Tensor:
    """``[B, C, T, H, W]`` pixels as ``[B, T h w, C ps ps]`` tokens, one per frame's patch."""
    b, c, t, h, w = video.shape
    x = video.reshape(b, c, t, h // ps, ps, w // ps, ps)
    return x.permute(0, 2, 3, 5, 1, 4, 6).reshape(b, t * (h // ps) * (w // ps), c * ps * ps)


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: f"ps{c['patch_size']}")
def test_reproduces_the_official_static_token_golden_fixture(case):
    """Same kept patches as the official ``batched_find_idxs_to_keep`` (one-frame tubelets),
    and each kept patch's size is the official ``batched_get_token_lengths`` run length."""
    video = tensor(case["video"])
    b, t = video.shape[0], video.shape[2]
    ps = case["patch_size"]
    x = patch_tokens(video, ps)
    p = x.shape[1] // t
    out = RLT(frame_tokens=p, threshold=case["threshold"])(
        x, Signals(prefix=0, size=torch.ones(b, x.shape[1], 1))
    )
    official = torch.tensor(case["keep"])
    lengths = torch.tensor(case["lengths"], dtype=torch.float32).split(official.sum(1).tolist())
    for v in range(b):
        index = out.index[v][out.index[v] >= 0]
        assert torch.equal(index, official[v].nonzero().flatten())
        torch.testing.assert_close(out.x[v, : len(index)], x[v, index], atol=1e-5, rtol=1e-5)
        # The official lengths run patch position first, then frame.
        by_position = (index % p * t + index // p).argsort()
        torch.testing.assert_close(out.size[v, by_position, 0], lengths[v])
