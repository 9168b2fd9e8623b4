"""DynamicViT's own invariants: top-k of its predictor, hierarchical masks, masked Agg, and
the official inference selection (golden fixture)."""

from __future__ import annotations

import torch

from reference.core import Signals
from reference.dynamicvit import DynamicViT
from tests.reference.conftest import C, N, make_signals, tokens
from tests.reference.fixtures import load, tensor


def build(keep_ratio: float = 0.5) -> DynamicViT:
    torch.manual_seed(0)
    return DynamicViT(dim=C, keep_ratio=keep_ratio).eval()


def test_inference_keeps_the_top_k_of_the_predictor(x):
    method = build(0.5)
    out = method(x, make_signals(x))
    scores = method.predictor(x[:, 1:], torch.ones(x.shape[0], N - 1))[..., 0]  # [B, M]
    expected = scores.topk(8, dim=1).indices.sort(dim=1).values + 1
    assert torch.equal(out.index[:, 1:], expected)
    torch.testing.assert_close(out.x, x.gather(1, out.index[..., None].expand(-1, -1, C)))


def test_keep_count_follows_the_ratio(x):
    for ratio in (0.25, 0.5, 0.7, 0.9):
        out = build(ratio)(x, make_signals(x))
        assert out.num_tokens == 1 + int((N - 1) * ratio)


def test_global_feature_ignores_dropped_tokens(x):
    predictor = build().predictor
    for module in predictor.modules():  # larger weights than the init, so changes show
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.5)
    policy = torch.ones(x.shape[0], N - 1)
    policy[:, 3] = 0
    patches = x[:, 1:]
    base = predictor(patches, policy)
    others = (torch.arange(N - 1) != 3) & (torch.arange(N - 1) != 4)
    moved = patches.clone()
    moved[:, 3] = torch.randn_like(moved[:, 3])  # a dropped token: the others must not see it
    torch.testing.assert_close(predictor(moved, policy)[:, others], base[:, others])
    moved = patches.clone()
    moved[:, 4] = torch.randn_like(moved[:, 4])  # a kept token enters every global feature
    assert (predictor(moved, policy)[:, others] - base[:, others]).abs().amin(1).gt(0).all()


def test_training_masks_are_hard_and_hierarchical():
    method = build().train()
    x = tokens()
    signals = make_signals(x)
    prev = torch.ones(x.shape[0], N - 1)
    prev[:, :5] = 0
    signals.state["dynamicvit"] = {"policy": prev, "decisions": []}
    first = method(x, signals)
    assert first.x is x and first.num_tokens == N
    assert ((first.mask == 0) | (first.mask == 1)).all() and (first.mask[:, 0] == 1).all()
    assert (first.mask[:, 1:6] == 0).all(), "tokens dropped by an earlier stage came back"
    second = method(x, signals)
    assert (second.mask <= first.mask).all()
    assert len(signals.state["dynamicvit"]["decisions"]) == 2


def test_official_schedule_keeps_int_of_196_times_rho_to_the_stage():
    """Official ``models/dyvit.py``: ``int(init_n * token_ratio[s])`` with ``token_ratio =
    [0.7, 0.7**2, 0.7**3]`` keeps 137/96/67 of 196 (not 137/95/66, rounding per stage)."""
    from reference.hosts import vit

    torch.manual_seed(0)
    model = vit.VisionTransformer(img_size=224, embed_dim=16, depth=12, num_heads=2).eval()
    setting, _ = DynamicViT.paper_setting(12, 16)
    vit.apply(model, {layer: DynamicViT(**kw).eval() for layer, kw in setting.items()})
    with torch.no_grad():
        model(torch.randn(2, 3, 224, 224))
    assert vit.tokens_after(model) == [1 + 137, 1 + 96, 1 + 67]
    relative = DynamicViT(dim=16, keep_ratio=0.7, relative=True)
    assert [relative.kept(m) for m in (196, 137, 95)] == [137, 95, 66]


def test_reproduces_the_official_inference_selection_golden_fixture():
    """Three stages of the official eval path (``PredictorLG``, ``argsort``, ``int(196 *
    0.7 ** s)``) with identity blocks: same scores, same kept patches (137/96/67) per image.
    The official code orders kept tokens by score; here they stay in spatial order."""
    case = load("dynamicvit")["cases"][0]
    x = tensor(case["x"])  # [B, 1 + 196, C]
    b, n, c = x.shape
    signals = Signals(prefix=1, size=torch.ones(b, n, 1))
    entering = torch.arange(n - 1).expand(b, -1)  # original positions of the tokens
    out_x = x
    for s, (kept, scores) in enumerate(zip(case["kept"], case["scores"], strict=True)):
        method = DynamicViT(dim=c, keep_ratio=0.7 ** (s + 1)).eval()
        weights = {
            key.split(".", 1)[1].replace("in_conv", "in_proj").replace("out_conv", "out_proj"): v
            for key, v in case["predictors"].items()
            if key.startswith(f"{s}.")
        }
        method.predictor.load_state_dict({k: tensor(v) for k, v in weights.items()})
        with torch.no_grad():
            ours = method.predictor(out_x[:, 1:], torch.ones(b, n - 1))[..., 0]
            out = method(out_x, signals)
        # Official scores are in the official token order: put them in position order.
        official_entering = torch.tensor(case["kept"][s - 1]) if s else entering
        order = official_entering.argsort(dim=1)
        torch.testing.assert_close(ours, tensor(scores).gather(1, order), atol=1e-5, rtol=1e-5)
        entering = entering.gather(1, out.index[:, 1:] - 1)
        assert torch.equal(entering, torch.tensor(kept).sort(dim=1).values)
        expected = x[:, 1:].gather(1, entering[..., None].expand(-1, -1, c))
        torch.testing.assert_close(out.x[:, 1:], expected, atol=0, rtol=0)
        out_x, n = out.x, out.x.shape[1]
        signals = Signals(prefix=1, size=out.size, state=signals.state)
    assert [len(k[0]) for k in case["kept"]] == [137, 96, 67]
