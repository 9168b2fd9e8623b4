"""VoCo-LLaMA: the language model compresses the image into a few learned VoCo tokens.

Paper: "VoCo-LLaMA: Towards Vision Compression with Large Language Models",
https://arxiv.org/abs/2406.12275
Official code: https://github.com/Yxxxb/VoCo-LLaMA, ``llava/model/language_model/
llava_llama_1stg.py`` (``make_voco_mask_llava`` and the mask block of ``LlamaModel.forward``;
``llava/model/llava_arch.py``: ``prepare_inputs_labels_for_multimodal`` finds the VoCo tokens).

Algorithm: the prompt is ``[prefix][image][VoCo x M][text]``, the VoCo tokens one special token
of the vocabulary (``<voco>``, id 32000 after Vicuna's 32000, a learned embedding row; the
released scripts use ``M = 2`` in training and evaluation, the default here; the paper's
headline setting is ``M = 1``). In every decoder layer, a token up to
the last VoCo token attends causally as usual (the VoCo tokens see the image); a token after it
attends only the keys from the first VoCo token on (the image and the prefix are masked out).
Trained so, the VoCo tokens' keys and values carry the image: after the prefill no later token
can attend the prefix or image keys, and the host drops them from every layer's cache.

Host mapping: a ``SequenceMethod`` of the LLaVA host (``apply(sequence=VocoLlama(...))``):
``tokens`` places the ``M`` VoCo tokens right after the image tokens, ``attention`` is the mask
rule; positions run on ``0..n-1`` over the whole prompt, as the official (no renumbering).

Deviations from the official code:
- The official prompt has a ``"\\n"`` token between the image and the VoCo tokens
  (``"<image>\\n<voco><voco>\\n..."``, the system prompt after them), which later text cannot
  attend; the host has no slot there (in the prefix it would be masked alike, but before the
  image).
- VoCo positions: the official counts them from the end of the unpadded prompt and marks them
  at that distance from the end of the padded batch, which is off for a right-padded sample
  (training batches); here they are where the tokens are, the same for every sample.
- Decoding: the official cached decoding with the pinned transformers 4.37.2 and its
  replacement ``modeling_attn_mask_utils.py`` raises ``AttributeError`` (the SDPA mask of a
  one-token query on an all-ones mask is None, whose ``.dtype`` the mask block reads); here a
  decoded token attends what the prompt's last token attends (the VoCo tokens onwards), the
  paper's VoCo cache, and the prefix and image keys leave the cache.
- The whole LLM is fine-tuned in the paper; the learned part here is the VoCo embedding row
  (``voco_embedding``, the official ``model.embed_tokens.weight[32000]``; the resized
  ``lm_head`` row is never an input and is not kept). Initialised as transformers' resize does
  (normal, std 0.02).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from reference.hosts.llava import Layout, SequenceMethod
from reference.registry import register

VOCO_TOKEN_ID = 32000  # ``<voco>``, added after Vicuna's 32000 tokens


def voco_attention(n: int, first: int, count: int, device=None) -> Tensor:
    """``[N, N]`` bool, True where query ``i`` may attend key ``j`` (before the causal mask):
    up to the last VoCo token ``first + count - 1`` everything, after it keys ``>= first``."""
    idx = torch.arange(n, device=device)
    return (idx[:, None] < first + count) | (idx[None, :] >= first)


@register
class VocoLlama(SequenceMethod):
    """``voco_num`` learned VoCo tokens after the image; later text attends only them.

    Args:
        hidden: the language model's width.
        voco_num: VoCo tokens ``M`` (all the same token, as the official ``<voco>`` repeated).
    """

    catalog_id = "voco_llama"
    kind = "compression-tokens"
    test_configs: ClassVar[dict[str, dict]] = {"some": {"hidden": 64, "voco_num": 2}}

    def __init__(self, hidden: int = 4096, voco_num: int = 2):
        super().__init__()
        if voco_num < 1:
            raise ValueError(f"voco_num must be >= 1, got {voco_num}")
        self.voco_num = voco_num
        self.voco_embedding = nn.Parameter(torch.randn(1, hidden) * 0.02)

    def tokens(self, batch: int) -> Tensor:
        return self.voco_embedding.expand(batch, self.voco_num, -1)  # [B, M, hidden]

    def attention(self, layout: Layout) -> Tensor:
        b, n = layout.valid.shape
        first = layout.image_start + layout.image_len
        rule = voco_attention(n, first, layout.inserted, layout.valid.device)
        return rule.expand(b, n, n)


def load_official(method: VocoLlama, state_dict: dict[str, Tensor]) -> None:
    """Take the ``<voco>`` row (id 32000) of an official checkpoint's
    ``model.embed_tokens.weight``."""
    row = state_dict["model.embed_tokens.weight"][VOCO_TOKEN_ID]
    with torch.no_grad():
        method.voco_embedding.copy_(row[None])
