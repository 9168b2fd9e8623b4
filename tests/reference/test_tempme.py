"""TempMe: joining neighbouring frames into clips and merging tokens across them."""

from __future__ import annotations

import pytest
import torch

from reference.core import Signals
from reference.hosts import vit
from reference.tempme import TempMe
from tests.reference.fixtures import load, tensor

GOLDEN = load("tempme")
CASES = GOLDEN["cases"]
IDS = [
    f"m{c['merge_frames']}-T{c['frames']}-P{c['frame_tokens']}-cls{c['frame_cls']}" for c in CASES
]


def method_for(case: dict, **overrides) -> TempMe:
    kwargs = dict(
        frame_tokens=case["frame_tokens"],
        merge_frames=case["merge_frames"],
        r=case["r"],
        frame_cls=case["frame_cls"],
    )
    if case["frame_pos"]:
        kwargs.update(frame_num=case["frames"], dim=len(case["x"][0][0]))
    method = TempMe(**{**kwargs, **overrides})
    if case["frame_pos"]:
        method.load_state_dict(
            {"TVPt_Video_Positional_embedding": tensor(case["TVPt_Video_Positional_embedding"])}
        )
    return method


def run(method: TempMe, case: dict):
    x = tensor(case["x"])
    keys = tensor(case["keys"]) if "keys" in case else None
    with torch.no_grad():
        return method(x, Signals(prefix=0, size=tensor(case["size"]), keys=keys))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reproduces_the_official_golden_fixture(case):
    """The official ``ToMeBlock`` merge steps: same tokens in the same order, same sizes, and
    every input token in the output slot the official source matrix puts it in."""
    out = run(method_for(case), case)
    torch.testing.assert_close(out.x, tensor(case["out"]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.size, tensor(case["out_size"]), atol=1e-5, rtol=1e-5)
    assert torch.equal(out.assign, torch.tensor(case["assign"]))
    slots = torch.arange(out.x.shape[1]).expand(out.x.shape[0], -1)
    assert torch.equal(out.assign.gather(1, out.index), slots)  # a slot continues its token


@pytest.mark.parametrize("change", [{"frame_cls": 0}, {"r": 1}, "no embedding", "ratio"])
def test_the_fixture_test_fails_when_an_option_is_perturbed(change):
    case = CASES[0]  # a join with the temporal embedding
    if change == "no embedding":
        method = method_for({**case, "frame_pos": 0})
    elif change == "ratio":  # the ratio rule instead of the fixture's r: 0.1 of 12 is 1
        method = method_for(case, r=None, ratio=0.1)
    else:
        method = method_for(case, **change)
    out = run(method, case).x
    expected = tensor(case["out"])
    assert out.shape != expected.shape or not torch.allclose(out, expected, atol=1e-5)


def test_the_official_vit_b32_schedule_counts():
    """``get_video_feat``'s token counts for 12 frames of 50 tokens: 34 per frame after blocks
    0-7; joins to 48, 62, 118 tokens per clip (2, 4, 12 CLS), each followed by a 10% merge."""
    steps = TempMe.official_schedule()
    assert [b for b, _ in steps] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 8, 9, 9, 10, 10, 11]
    x = torch.randn(1, 12 * 50, 16)
    counts = []
    for _, kwargs in steps:
        kwargs = {**kwargs, "dim": 16} if "dim" in kwargs else kwargs
        method = TempMe(**kwargs)
        s = Signals(prefix=0, size=torch.ones(1, x.shape[1], 1), keys=torch.randn_like(x))
        with torch.no_grad():
            x = method(x, s).x
        counts.append(x.shape[1])
    per_frame = [c // 12 for c in counts[:8]]
    assert per_frame == [48, 46, 44, 42, 40, 38, 36, 34]
    assert counts[8:] == [6 * 48, 6 * 44, 3 * 62, 3 * 56, 1 * 118, 1 * 107, 97]
    assert TempMe(**steps[-1][1]).budget(97 + 10, 0) == (97, 97)


def test_clip_cls_tokens_are_protected_and_come_first():
    """After a join, each clip starts with its frames' CLS tokens, untouched."""
    b, t, p, c = 2, 4, 5, 8
    x = torch.randn(b, t * p, c)
    out = TempMe(frame_tokens=p, merge_frames=2, ratio=0.5, frame_cls=1)(
        x, Signals(prefix=0, size=torch.ones(b, t * p, 1))
    )
    per = 2 * p - TempMe(frame_tokens=p, merge_frames=2, ratio=0.5).merged()
    for k in range(2):
        cls = x[:, [2 * k * p, (2 * k + 1) * p]]
        torch.testing.assert_close(out.x[:, k * per : k * per + 2], cls)


def test_a_join_block_runs_before_attention_on_the_vit_host():
    method = TempMe(frame_tokens=4, merge_frames=2, ratio=0.5, frame_cls=0)
    assert method.where == "pre" and method.needs == frozenset()
    assert TempMe(merge_frames=1).where == "mid"
    torch.manual_seed(0)
    host = vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)
    vit.apply(host, {1: method}, proportional_attn=True)
    logits = host(torch.randn(2, 3, 32, 32))
    assert torch.isfinite(logits).all() and vit.tokens_after(host) == [17 - 2 * 4]


def test_settings_the_paper_cannot_express_are_refused():
    with pytest.raises(ValueError, match=r"^frame_num must be"):
        TempMe(merge_frames=3, frame_num=4, dim=8)
    with pytest.raises(ValueError, match=r"^frame_cls must be"):
        TempMe(frame_tokens=2, frame_cls=2)
    method = TempMe(frame_tokens=4, merge_frames=2, ratio=0.5, frame_cls=0, frame_num=4, dim=8)
    with pytest.raises(ValueError, match=r"^frame_num must be"):
        method(torch.randn(1, 8 * 4, 8), Signals(prefix=0, size=torch.ones(1, 32, 1)))


def test_official_reducers_pair_a_join_and_a_merge_in_blocks_8_to_10():
    from reference.hosts.vit import split_hooks

    reducers = TempMe.official_reducers(dim=16)
    assert sorted(reducers) == list(range(12))
    for block in (8, 9, 10):
        join, merge = split_hooks(reducers[block])
        assert join.merge_frames > 1 and join.where == "pre"
        assert merge.merge_frames == 1 and merge.where == "mid"
    assert all(isinstance(reducers[b], TempMe) for b in (*range(8), 11))
