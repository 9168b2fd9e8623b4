"""TPS's own invariants: top-k reserved set, nearest-host matching, exp-similarity fusion, and
the official pruning-then-squeezing outputs (golden fixtures)."""

from __future__ import annotations

import math

import pytest
import torch

from reference.core import Signals
from reference.tps import TPS, squeeze
from tests.reference.conftest import B, N, make_signals, tokens
from tests.reference.fixtures import load, tensor


def naive_squeeze(x: torch.Tensor, kept: list[int], prefix: int) -> dict[int, torch.Tensor]:
    """Paper's matching and fusing for one image, token by token, in float64."""
    x = x.double()
    unit = x / (x.norm(dim=-1, keepdim=True) + 1e-6)
    num = {h: math.e * x[h] for h in kept}
    den = dict.fromkeys(kept, math.e)
    for j in range(prefix, x.shape[0]):
        if j in kept:
            continue
        cos = {h: float(unit[j] @ unit[h]) for h in kept}
        host = max(cos, key=cos.get)
        num[host] = num[host] + math.exp(cos[host]) * x[j]
        den[host] += math.exp(cos[host])
    return {h: num[h] / den[h] for h in kept}


def check_squeezed(out, x, prefix):
    for i in range(B):
        kept = out.index[i, prefix:].tolist()
        expected = naive_squeeze(x[i], kept, prefix)
        for slot, h in enumerate(kept, start=prefix):
            torch.testing.assert_close(out.x[i, slot].double(), expected[h], rtol=1e-5, atol=1e-5)


def test_dtps_inference_reserves_top_k_of_predictor_and_fuses_pruned_into_hosts(x):
    torch.manual_seed(0)
    method = TPS(dim=x.shape[-1], keep_rate=0.5).eval()
    out = method(x, make_signals(x))
    logp = method.predictor(x[:, 1:], torch.ones(B, N - 1, 1))
    top = logp[..., 0].topk(8, dim=1).indices + 1
    assert torch.equal(out.index[:, 1:], top.sort(dim=1).values)
    check_squeezed(out, x, prefix=1)


def test_etps_reserves_top_cls_attention_and_tracks_hosts(x):
    signals = make_signals(x)
    method = TPS(keep_rate=0.25, variant="etps")
    assert method.where == "mid" and method.needs == {"cls_attn"}
    assert not list(method.parameters())
    out = method(x, signals)
    top = signals.cls_attn[:, :, 1:].mean(1).topk(4, dim=1).indices + 1
    assert torch.equal(out.index[:, 1:], top.sort(dim=1).values)
    check_squeezed(out, x, prefix=1)
    # Every pruned token went to a host slot, and the host sizes count them.
    assert (out.assign >= 0).all()
    counts = torch.zeros(B, out.num_tokens).scatter_add(1, out.assign, torch.ones(B, N))
    torch.testing.assert_close(out.size[..., 0], counts)


def test_training_keeps_count_and_carries_decisions_across_steps(x):
    torch.manual_seed(0)
    first, second = TPS(dim=x.shape[-1]).train(), TPS(dim=x.shape[-1]).train()
    signals = make_signals(x)
    out1 = first(x, signals)
    assert out1.x.shape == x.shape and out1.mask.shape == (B, N)
    keep1 = out1.mask[:, 1:].detach()
    assert set(keep1.unique().tolist()) <= {0.0, 1.0} and (out1.mask[:, 0] == 1).all()
    # Pruned tokens are squeezed but stay unchanged in place; non-host kept tokens too.
    pruned = keep1 == 0
    assert pruned.any() and not pruned.all()
    torch.testing.assert_close(out1.x[:, 1:][pruned], x[:, 1:][pruned])
    # Hosts follow the same fusion rule as at inference.
    for i in range(B):
        kept = (keep1[i].nonzero()[:, 0] + 1).tolist()
        for h, value in naive_squeeze(x[i], kept, prefix=1).items():
            torch.testing.assert_close(out1.x[i, h].detach().double(), value, rtol=1e-5, atol=1e-5)

    out2 = second(out1.x.detach(), signals)  # same forward: state carries the decision
    keep2 = out2.mask[:, 1:].detach()
    assert (keep2 <= keep1).all(), "a token pruned earlier came back"
    # A token pruned at the first step is neither a host nor squeezed at the second.
    torch.testing.assert_close(out2.x[:, 1:][pruned], out1.x[:, 1:][pruned].detach())


def test_reserved_count_rounds_down_like_the_official_int(x):
    method = TPS(dim=x.shape[-1], keep_rate=0.99).eval()
    assert method.budget(N, 1) == (1 + 15, 1 + 15)  # int(0.99 * 16) = 15
    assert method(x, make_signals(x)).num_tokens == 16


def test_bfloat16_squeeze_stays_close_to_float32():
    x = tokens()
    method = TPS(keep_rate=0.5, variant="etps")
    full = method(x, make_signals(x))
    half = method(x.bfloat16(), make_signals(x.bfloat16()))
    assert torch.equal(full.index, half.index)
    torch.testing.assert_close(half.x.float(), full.x, rtol=0.05, atol=0.05)


def test_official_schedule_keeps_int_of_196_times_rho_to_the_stage():
    """Official ``keep_ratio_list = [0.7 ** (k + 1)]`` with ``int(init_n * ratio)`` keeps
    137/96/67 of 196 (not 137/95/66, rounding per stage); ``relative=True`` gives those."""
    from reference.hosts import vit

    torch.manual_seed(0)
    model = vit.VisionTransformer(img_size=224, embed_dim=16, depth=12, num_heads=2).eval()
    setting, _ = TPS.paper_setting(12, 16)
    for variant in ("etps", "dtps"):
        reducers = {layer: TPS(16, **{**kw, "variant": variant}) for layer, kw in setting.items()}
        vit.apply(model, {layer: r.eval() for layer, r in reducers.items()})
        with torch.no_grad():
            model(torch.randn(2, 3, 224, 224))
        assert vit.tokens_after(model) == [1 + 137, 1 + 96, 1 + 67]
    relative = TPS(16, keep_rate=0.7, relative=True).eval()
    assert [relative.budget(1 + m, 1)[0] - 1 for m in (196, 137, 95)] == [137, 95, 66]


@pytest.mark.parametrize("case", load("tps")["inference"], ids=lambda c: f"seed{c['seed']}")
def test_reproduces_the_official_pruning_and_squeezing_golden_fixture(case):
    """Three dTPS stages of the official eval path (``PredictorLG`` scores, reserved
    ``int(N0 * rho ** s)``, ``TPSModule`` squeezing) with identity blocks: same scores, same
    reserved patches, same squeezed tokens. The official order (by score) is spatial here."""
    x = tensor(case["x"])  # [B, 1 + 36, C]
    b, n, c = x.shape
    signals = Signals(prefix=1, size=torch.ones(b, n, 1))
    entering = torch.arange(n - 1).expand(b, -1)  # original positions of the tokens
    for s, (kept, scores, official) in enumerate(
        zip(case["kept"], case["scores"], case["out"], strict=True)
    ):
        method = TPS(c, keep_rate=case["keep_ratio"] ** (s + 1), temperature=case["temperature"])
        weights = {
            key.split(".", 1)[1]: tensor(value)
            for key, value in case["predictors"].items()
            if key.startswith(f"{s}.")
        }
        method.predictor.load_state_dict(weights)
        method.eval()
        with torch.no_grad():
            ours = method.predictor(x[:, 1:], torch.ones(b, x.shape[1] - 1, 1))[..., 0]
            out = method(x, signals)
        # The official tokens are in the official order: put them in position order.
        before = torch.tensor(case["kept"][s - 1]) if s else entering
        torch.testing.assert_close(
            ours, tensor(scores).gather(1, before.argsort(dim=1)), atol=1e-5, rtol=1e-5
        )
        entering = entering.gather(1, out.index[:, 1:] - 1)
        kept = torch.tensor(kept)
        assert torch.equal(entering, kept.sort(dim=1).values)
        order = kept.argsort(dim=1)[..., None].expand(-1, -1, c)
        expected = tensor(official).gather(1, order)
        torch.testing.assert_close(out.x[:, 1:], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.x[:, 0], x[:, 0])
        x = out.x
        signals = Signals(prefix=1, size=out.size, state=signals.state)


@pytest.mark.parametrize("case", load("tps")["training"], ids=lambda c: f"seed{c['seed']}")
def test_reproduces_the_official_training_squeeze_golden_fixture(case):
    """The official ``TPSModule`` in training on fixed decisions: hosts are the kept tokens,
    only the tokens pruned now are squeezed, every other token is unchanged."""
    keep, pruned = tensor(case["keep"]), tensor(case["pruned"])
    out, _ = squeeze(tensor(case["x"]), keep > 0, pruned, case["temperature"])
    torch.testing.assert_close(out, tensor(case["out"]), atol=1e-5, rtol=1e-5)
