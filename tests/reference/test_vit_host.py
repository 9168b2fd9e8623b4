"""The ViT host: timm weight parity, hooks, proportional attention."""

from __future__ import annotations

import os

import pytest
import torch

from reference.core import Reduction, Signals, TokenReducer, keep_tokens
from reference.hosts import vit
from reference.tome import ToMe
from tests.reference.conftest import tiny_host

SMALL = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=7)


def _timm():
    try:
        import timm.models.vision_transformer as timm_vit
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("timm (with torchvision) is not installed")
    return timm_vit


def test_state_dict_and_logits_match_timm():
    timm_vit = _timm()
    torch.manual_seed(0)
    reference_model = timm_vit.VisionTransformer(**SMALL).eval()
    ours = vit.VisionTransformer(**SMALL).eval()
    assert sorted(ours.state_dict()) == sorted(reference_model.state_dict())
    ours.load_state_dict(reference_model.state_dict(), strict=True)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), reference_model(images), rtol=1e-5, atol=1e-5)
        # A method attached at zero budget changes nothing either.
        vit.apply(ours, {i: ToMe(r=0) for i in range(3)}, proportional_attn=True)
        torch.testing.assert_close(ours(images), reference_model(images), rtol=1e-5, atol=1e-5)


def test_named_configs_have_timms_shapes():
    timm_vit = _timm()
    for name in ("vit_small_patch16_224", "vit_base_patch16_224"):
        theirs = {
            k: v.shape for k, v in timm_vit.__dict__[name](pretrained=False).state_dict().items()
        }
        ours = {k: v.shape for k, v in vit.create(name).state_dict().items()}
        assert ours == theirs


class DropLast(TokenReducer):
    """Keeps all but the last token; records what it saw."""

    catalog_id = "test_drop_last"

    def __init__(self, where: str, needs=frozenset()):
        super().__init__()
        self.where, self.needs, self.seen = where, frozenset(needs), []

    def forward(self, x: torch.Tensor, signals: Signals) -> Reduction:
        self.seen.append(signals)
        b, n, _ = x.shape
        keep = torch.arange(signals.prefix, n - 1).expand(b, -1)
        return keep_tokens(x, signals.size, signals.prefix, keep)


@pytest.mark.parametrize("where", ["pre", "mid"])
def test_hooks_reduce_tokens_and_pass_signals(where):
    host = tiny_host(depth=2)
    method = DropLast(where, needs={"keys", "cls_attn"})
    vit.apply(host, {0: method, 1: DropLast(where)})
    host(torch.randn(2, 3, 32, 32))
    assert vit.tokens_after(host) == [16, 15]
    seen = method.seen[0]
    if where == "mid":
        assert seen.keys.shape == (2, 17, 8) and seen.cls_attn.shape == (2, 4, 17)
        torch.testing.assert_close(seen.cls_attn.sum(-1), torch.ones(2, 4))
    else:
        assert seen.keys is None  # no attention has run yet at the "pre" hook


def test_cls_attention_row_equals_the_full_map_row():
    host = tiny_host(depth=1)
    block = host.blocks[0]
    x = torch.randn(2, 17, 32)
    size = torch.rand(2, 17, 1) + 0.5
    _, only_row = block.attn(x, size, frozenset({"cls_attn"}))
    _, full = block.attn(x, size, frozenset({"attn"}))
    torch.testing.assert_close(only_row["cls_attn"], full["attn"][:, :, 0])


def test_proportional_attention_counts_a_merged_token_as_its_size():
    """Attention to one token of size 2 equals attention to two identical tokens."""
    host = tiny_host(depth=1)
    attn = host.blocks[0].attn
    x = torch.randn(1, 5, 32)
    doubled = torch.cat([x, x[:, -1:]], dim=1)  # last token twice
    out_doubled, _ = attn(doubled, None, frozenset())
    size = torch.tensor([[1.0, 1.0, 1.0, 1.0, 2.0]])[..., None]
    out_sized, _ = attn(x, size, frozenset())
    torch.testing.assert_close(out_sized, out_doubled[:, :5], rtol=1e-5, atol=1e-5)


def test_attention_logits_are_the_scaled_products_plus_the_size_bias():
    host = tiny_host(depth=1)
    attn = host.blocks[0].attn
    x = torch.randn(2, 17, 32)
    size = torch.rand(2, 17, 1) + 0.5
    out_fast, _ = attn(x, size, frozenset())
    out, sig = attn(x, size, frozenset({"attn_logits"}))
    q, k, _ = attn.qkv(x).reshape(2, 17, 3, 4, 8).permute(2, 0, 3, 1, 4)
    expected = q @ k.transpose(-1, -2) * 8**-0.5 + size.log()[:, None, None, :, 0]
    torch.testing.assert_close(sig["attn_logits"], expected)
    torch.testing.assert_close(sig["attn"], expected.softmax(-1))
    torch.testing.assert_close(out, out_fast, rtol=1e-5, atol=1e-5)
    _, plain = attn(x, size, frozenset({"attn"}))
    assert "attn_logits" not in plain  # computed only when named


def test_the_vit_host_gives_no_next_block_projections():
    """A "mid" hook's output is not the next block's input yet: next_q/next_k stay None."""
    host = tiny_host(depth=2)
    method = DropLast("mid", needs={"next_q", "next_k", "attn_logits"})
    vit.apply(host, {0: method})
    host(torch.randn(2, 3, 32, 32))
    (seen,) = method.seen
    assert seen.next_q is None and seen.next_k is None
    assert seen.attn_logits.shape == (2, 4, 17, 17)


def test_a_masked_key_changes_no_present_token():
    """Tokens marked absent in the key mask get no attention, on every signal path:
    present tokens come out as if the absent ones were not there at all."""
    host = tiny_host(depth=1)
    attn = host.blocks[0].attn
    x = torch.randn(2, 9, 32)
    size = torch.rand(2, 9, 1) + 0.5
    keep = torch.ones(2, 9)
    keep[0, 6:] = 0  # sample 0: its last three tokens are empty slots
    for needs in [frozenset(), frozenset({"cls_attn"}), frozenset({"attn_logits"})]:
        out, sig = attn(x, size, needs, keep)
        alone, alone_sig = attn(x[:1, :6], size[:1, :6], needs)
        torch.testing.assert_close(out[0, :6], alone[0], rtol=1e-5, atol=1e-6)
        plain, _ = attn(x[1:], size[1:], needs)
        torch.testing.assert_close(out[1], plain[0], rtol=1e-5, atol=1e-6)
        if "cls_attn" in sig:
            torch.testing.assert_close(sig["cls_attn"][0, :, :6], alone_sig["cls_attn"][0])
            assert (sig["cls_attn"][0, :, 6:] == 0).all()
        assert torch.isfinite(out).all()  # an absent query still attends to itself


def test_a_soft_mask_is_dynamicvits_attention_policy():
    """A mask with a gradient (DynamicViT's training path) weights the exponentiated
    logits, a token's own key always counting, with the official eps = 1e-6."""
    host = tiny_host(depth=1)
    attn = host.blocks[0].attn
    x = torch.randn(2, 7, 32)
    keep = torch.tensor([[1.0, 1, 0, 1, 0, 1, 1], [1.0, 0, 1, 1, 1, 0, 1]], requires_grad=True)
    out, sig = attn(x, None, frozenset({"attn"}), keep)
    q, k, _ = attn.qkv(x).reshape(2, 7, 3, 4, 8).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) * 8**-0.5
    w = keep.detach()[:, None, None, :] * (1 - torch.eye(7)) + torch.eye(7)
    e = (logits - logits.amax(-1, keepdim=True)).exp() * w
    expected = (e + 1e-6 / 7) / (e.sum(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(sig["attn"], expected, rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert keep.grad is not None and torch.isfinite(keep.grad).all()


def test_the_host_carries_a_padding_mask_through_later_reductions():
    """Empty slots stay masked after a later reduction that keeps them."""

    class PadOne(TokenReducer):
        """Sample 0 loses its last token to an empty slot (size 0, mask 0)."""

        def forward(self, x, signals):
            b, n, _ = x.shape
            ar = torch.arange(n).expand(b, n)
            mask = torch.ones(b, n)
            mask[0, -1] = 0
            size = signals.size * mask[..., None]
            return Reduction(x=x * mask[..., None], size=size, index=ar, assign=ar, mask=mask)

    host = tiny_host(depth=3)
    seen = []

    class Spy(DropLast):
        def forward(self, x, signals):
            seen.append(signals.present)
            return super().forward(x, signals)

    class DropFirstPatch(TokenReducer):
        def forward(self, x, signals):
            keep = torch.arange(signals.prefix + 1, x.shape[1]).expand(x.shape[0], -1)
            return keep_tokens(x, signals.size, signals.prefix, keep)

    vit.apply(host, {0: PadOne(), 1: DropFirstPatch(), 2: Spy("mid")})
    host(torch.randn(2, 3, 32, 32))
    (present,) = seen
    assert present.shape == (2, 16) and present.sum(1).tolist() == [15, 16]
    assert not present[0, -1]


@pytest.mark.parametrize("timm_model", [False, True], ids=["host", "timm"])
def test_a_block_runs_one_pre_and_one_mid_method(timm_model):
    """TempMe joins frames before a block's attention and merges after it; the "mid"
    method sees the signals of the tokens the attention saw."""
    import reference

    if timm_model:
        timm_vit = _timm()
        torch.manual_seed(0)
        host = timm_vit.VisionTransformer(
            img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=10
        ).eval()
    else:
        host = tiny_host(depth=2)
    pre, mid = DropLast("pre"), DropLast("mid", needs={"keys"})
    with reference.attach(host, {0: [pre, mid], 1: DropLast("mid")}) as handle:
        host(torch.randn(2, 3, 32, 32))
        assert handle.tokens_after() == [16, 15, 14]
    assert mid.seen[0].keys.shape[1] == 16  # the keys of the 16 tokens left by "pre"
    with pytest.raises(ValueError, match="at most one 'pre' and one 'mid'"):
        reference.attach(host, {0: [DropLast("mid"), DropLast("mid")]})
