"""Victor: visual compact token registers that take over from the image tokens.

Paper: "Efficient Vision-Language Models by Summarizing Visual Tokens into Compact Registers",
https://arxiv.org/abs/2410.14072
Official code: none released. PROVISIONAL: written from the abstract (the paper's body was not
available here); every detail the abstract does not state is guessed and listed below.

Algorithm (the abstract): a few learnable register tokens are added after the image tokens; the
first few decoder layers summarise the image into them; after those layers every image token is
discarded, so the later layers, and their KV caches, see the prefix, the registers and the text
only (8 registers, about 1% of LLaVA-1.5's 576 image tokens, is the headline setting).

Host mapping: a ``SequenceMethod`` of the LLaVA host: ``tokens`` places the registers after the
image tokens; layers ``>= summary_layers`` are routed (``route``/``merge``) through every token
but the image's, which is the same as dropping the image tokens there (an ``LLMReducer`` that
drops them after layer ``summary_layers - 1`` gives the same logits; a test says so), and their
caches then hold no image key.

Guessed (none of this is in the abstract):
- ``summary_layers = 3``: the layers that see the image tokens ("the first few layers").
- The registers are ``num_registers`` free embeddings ``[R, hidden]`` (initialised normal, std
  0.02, as a new vocabulary row) and the only new parameters; positions run on over them like
  text, and the kept tokens keep their positions after the drop (decoding continues at the
  prompt's full length).
- Attention in the first layers is the plain causal mask (the text may attend the image there
  too; the abstract names no special mask).
- Decoded tokens see the image tokens in the first ``summary_layers`` layers too (those caches
  keep them); the later layers' caches hold none.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from reference.hosts.llava import Layout, LlavaConfig, SequenceMethod
from reference.registry import register


@register
class Victor(SequenceMethod):
    """``num_registers`` learned registers after the image; image tokens gone from layer
    ``summary_layers`` on.

    Args:
        hidden: the language model's width.
        num_registers: register tokens ``R``.
        summary_layers: decoder layers that still see the image tokens.
    """

    catalog_id = "victor"
    kind = "compression-tokens"
    basis = (
        "paper (provisional): the abstract of arXiv 2410.14072 only; no code was released and "
        "the paper's body was not available, so the layer count, initialisation, positions and "
        "mask are guessed"
    )
    test_configs: ClassVar[dict[str, dict]] = {
        "some": {"hidden": 64, "num_registers": 2, "summary_layers": 2}
    }

    def __init__(self, hidden: int = 4096, num_registers: int = 8, summary_layers: int = 3):
        super().__init__()
        if num_registers < 1:
            raise ValueError(f"num_registers must be >= 1, got {num_registers}")
        if summary_layers < 1:
            raise ValueError(f"summary_layers must be >= 1, got {summary_layers}")
        self.summary_layers = summary_layers
        self.registers = nn.Parameter(torch.randn(num_registers, hidden) * 0.02)

    @classmethod
    def for_host(cls, cfg: LlavaConfig, **kwargs) -> Victor:
        method = cls(**{"hidden": cfg.hidden, **kwargs})
        if method.summary_layers >= cfg.layers:
            raise ValueError(
                f"summary_layers must be < the decoder's {cfg.layers} layers, "
                f"got {method.summary_layers}"
            )
        return method

    def tokens(self, batch: int) -> Tensor:
        return self.registers.expand(batch, -1, -1)  # [B, R, hidden]

    def route(self, layout: Layout, h: Tensor) -> Tensor | None:
        if layout.layer < self.summary_layers:
            return None
        b, n = h.shape[:2]
        keep = torch.ones(n, dtype=torch.bool, device=h.device)
        keep[layout.image_start : layout.image_start + layout.image_len] = False
        return torch.arange(n, device=h.device)[keep].expand(b, -1)  # [B, N - N_image]

    def merge(self, layout: Layout, h: Tensor, index: Tensor, mid: Tensor, mlp: Tensor) -> Tensor:
        # The image tokens stay as they were: no later token reads them.
        routed = mid + mlp
        return h.scatter(1, index[..., None].expand_as(routed), routed)
