"""LongVU: spatiotemporal adaptive compression of a long video within the LLM's context.

Paper: "LongVU: Spatiotemporal Adaptive Compression for Long Video-Language Understanding",
https://arxiv.org/abs/2410.17434
Official code: https://github.com/Vision-CAIR/LongVU, ``longvu/cambrian_arch.py``
(``CambrianMetaForCausalLM.select_frame``: temporal reduction; ``prepare_inputs_labels_for_
multimodal``: the resolutions, the cross-modal query ("ablation mix") and the spatial drop).

Algorithm, per video of ``T`` frames, with a visual budget ``max_length - 16 - text tokens``:
1. Temporal reduction (only when ``T`` low-resolution frames would not fit): in windows of 16
   frames, a frame whose flattened, L2-normalised features have a mean cosine similarity to the
   window's frames >= ``dino_threshold`` (0.83) is dropped; the window's middle frame stays.
2. Every kept frame is projected at ``image_token_len`` (12 x 12) tokens and at ``lowres_token``
   (8 x 8, bilinear), each row closed by the learned ``image_newline``.
3. Cross-modal query: if every frame fits at low but not all at high resolution, the frames with
   the highest mean dot product of their low-resolution tokens with the text after the video
   get their high-resolution tokens, as many as the budget allows.
4. Spatial reduction, if the tokens still exceed the budget: in chunks of 8 frames, a token of a
   later frame whose cosine similarity to the chunk's first frame's token at the same position is
   >= ``drop_threshold`` (0.8) is dropped; then each chunk is cut from the end to fit.

Placement: a ``Projector`` wrapping LLaVA's MLP (``mm_projector``, ``image_newline``), because the
official compression spans the connector: frames are selected before the projection, and steps 3-4
compare projected tokens with the LLM's text embeddings under the LLM's context budget.
Conventions: video as ``reference.llama_vid`` (features ``[B, T * N, C]``, ``signals.grid`` one
frame's, ``state["frames"] = T``). ``state["text"]``: the LLM's embeddings ``[B, L, out_dim]`` of
the text after the video (``state["text_mask"]`` ``[B, L]`` optional; a text of another width is
ignored: it is not the LLM's); ``state["prompt_len"]`` (int or ``[B]``): the prompt's text tokens
for the budget (default: the valid text tokens).
The output is padded at the end to the longest sample (zeros) and ``state["projector_valid"]``
``[B, M]`` marks the real tokens; ``num_tokens`` is the count when nothing is similar.
Defaults: the video model (``scripts/train_video_qwen.sh``: SVA width 1024 -> Qwen2-7B 3584, 144
tokens, low resolution 8, ``drop_threshold`` 0.8, ``dino_threshold`` 0.83, 8192 context):
16,525,824 parameters, as the official ``mm_projector`` and ``image_newline``.

Stand-ins and deviations:
- Two towers in the official code, one here: step 1 compares DINOv2 features, steps 2-4 use the
  SigLIP + DINOv2 features merged by the learned SVA connector (Cambrian), which is not
  implemented. ``features`` stand in for the SVA's output (``in_dim`` its width; resized to
  ``image_token_len`` bilinearly, as the official resizes the SVA's query grid: a factor-2 resize
  is 2 x 2 average pooling); step 1 uses ``state["frame_features"]`` ``[B, T * N', C']`` (the
  DINOv2 features) if given, else ``features``.
- The budget: the official counts the ``<image>`` placeholder in steps 1-2 (``prompt_len + 1``)
  and not in 3-4; kept so. Frames are square (``unpad_image`` is the identity), no ``frame_pos``.
- Batches run sample by sample (the official decides the resolutions from the batch's first
  sample); similarities are computed in float32 (the official in the model's dtype).
- Where the official has no high resolution (``input_high_res`` False) it resizes to a literal
  8 x 8 and then fails unless ``image_token_len`` is 64; here the grid stays ``image_token_len``.
- No text where step 3 would need it raises a ValueError (the official always has a prompt).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference.projector import Projector, ProjectorSignals
from reference.registry import register


@torch.no_grad()
def select_frames(
    frames: Tensor, threshold: float = 0.83, window: int = 16, max_frames: int = 400
) -> Tensor:
    """Temporal reduction (step 1): the indices of the kept frames, ascending.

    Args:
        frames: per-frame features ``[T, N, C]`` (DINOv2's in the official code).
    """
    flat = frames.flatten(1).float()
    flat = flat / flat.norm(dim=1, keepdim=True)
    kept = []
    for start in range(0, frames.shape[0], window):
        seg = flat[start : start + window]
        sim = (seg @ seg.T).mean(1)  # mean similarity to the window's frames, itself included
        sim[seg.shape[0] // 2] = 0  # the middle frame is always kept
        kept.append(torch.where(sim < threshold)[0] + start)
    index = torch.cat(kept)
    if index.shape[0] > max_frames:  # uniform subsampling (the official guard against OOM)
        step = index.shape[0] / max_frames
        index = index[[int(step * i) for i in range(max_frames)]]
    return index


@torch.no_grad()
def spatial_keep(tokens: Tensor, threshold: float = 0.8, chunk: int = 8) -> Tensor:
    """Spatial reduction (step 4): ``[T, P]`` True for the kept tokens of ``tokens [T, P, C]``;
    every chunk's first frame is kept whole."""
    keep = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    for start in range(0, tokens.shape[0], chunk):
        c = tokens[start : start + chunk].float()
        sim = F.cosine_similarity(c[:1].expand_as(c[1:]), c[1:], dim=-1)  # [k - 1, P]
        keep[start + 1 : start + c.shape[0]] = sim < threshold
    return keep


def fit_chunks(keep: Tensor, budget: int, chunk: int = 8) -> Tensor:
    """Flat indices of the kept tokens (frame after frame) cut to ``budget``: when over it, every
    chunk loses the same number of its last tokens, then the tail is cut."""
    flat = [
        torch.where(keep[s : s + chunk].flatten())[0] + s * keep.shape[1]
        for s in range(0, keep.shape[0], chunk)
    ]
    total = sum(len(f) for f in flat)
    if total > budget:
        cut = math.ceil((total - budget) / len(flat))
        flat = [f[: max(len(f) - cut, 0)] for f in flat]
    return torch.cat(flat)[:budget]


@register
class LongVU(Projector):
    """Frame selection, cross-modal resolution choice and spatial drop around the MLP projector."""

    catalog_id = "longvu"
    kind = "pruning"
    test_configs: ClassVar[dict[str, dict]] = {
        "some": {"in_dim": 32, "out_dim": 64, "image_token_len": 4, "lowres_token": 1},
    }
    invalid_configs = (
        ({"image_token_len": 5}, "image_token_len"),
        ({"lowres_token": 0}, "lowres_token"),
        ({"lowres_token": 3}, "lowres_token"),
        ({"window": 0}, "window"),
        ({"chunk": 0}, "chunk"),
        ({"max_length": 0}, "max_length"),
    )

    def __init__(
        self,
        in_dim: int = 1024,
        out_dim: int = 3584,
        image_token_len: int = 144,
        lowres_token: int | None = 8,
        max_length: int = 8192,
        inference_max_length: int = 16,
        dino_threshold: float = 0.83,
        drop_threshold: float = 0.8,
        window: int = 16,
        chunk: int = 8,
        max_frames: int = 400,
    ):
        super().__init__()
        side = math.isqrt(max(image_token_len, 0))
        if image_token_len < 1 or side * side != image_token_len:
            raise ValueError(f"image_token_len must be a positive square, got {image_token_len}")
        if lowres_token is not None and not 1 <= lowres_token <= side:
            raise ValueError(f"lowres_token must be in [1, {side}] or None, got {lowres_token}")
        for name, value in (("window", window), ("chunk", chunk), ("max_length", max_length)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.side, self.lowres = side, lowres_token
        self.max_length, self.inference_max_length = max_length, inference_max_length
        self.dino_threshold, self.drop_threshold = dino_threshold, drop_threshold
        self.window, self.chunk, self.max_frames = window, chunk, max_frames
        self.mm_projector = nn.Sequential(
            nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim)
        )
        self.image_newline = nn.Parameter(torch.randn(out_dim) / math.sqrt(out_dim))

    def _per_frame(self, side: int) -> int:
        return side * (side + 1)  # a newline closes every row

    def plan(self, frames: int, prompt_len: int) -> dict:
        """The official decisions for ``frames`` kept frames and ``prompt_len`` text tokens."""
        budget_sel = self.max_length - (prompt_len + 1) - self.inference_max_length
        high, low = self.side, self.lowres or self.side
        mix = self.lowres is not None and max(1, budget_sel // high**2) <= frames
        mix = mix and frames <= max(1, budget_sel // low**2)
        return {
            "select": frames >= max(1, budget_sel // low**2),
            "mix": mix,  # low resolution first, some frames raised (step 3)
            "budget": self.max_length - self.inference_max_length - prompt_len,
        }

    def num_tokens(self, n: int, frames: int = 1, prompt_len: int = 0) -> int:
        """Tokens out when no frame and no token is similar enough to be dropped."""
        plan = self.plan(frames, prompt_len)
        high, low = self._per_frame(self.side), self._per_frame(self.lowres or self.side)
        total = frames * (low if plan["mix"] else high)
        if plan["mix"] and high > low and plan["budget"] > total:
            raised = min((plan["budget"] - total) // (high - low), frames)
            if raised >= 1:
                return total + raised * (high - low)
        return min(total, plan["budget"])

    def project(self, frames: Tensor, grid: tuple[int, int], side: int) -> Tensor:
        """``[T, h * w, C]`` -> ``[T, side * (side + 1), out_dim]`` (resize, MLP, newlines)."""
        x = frames.transpose(1, 2).unflatten(2, grid)  # [T, C, h, w]
        if grid != (side, side):
            x = F.interpolate(x.float(), size=(side, side), mode="bilinear", align_corners=False)
        x = self.mm_projector(x.to(frames.dtype).flatten(2).transpose(1, 2))
        x = x.unflatten(1, (side, side))
        newline = self.image_newline.to(x.dtype).expand(x.shape[0], side, 1, -1)
        return torch.cat([x, newline], dim=2).flatten(1, 2)

    def compress(self, x, grid, select, text, prompt_len) -> Tensor:
        """One video: ``x [T, N, C]``, ``select [T, N', C']``, ``text [L, out_dim]`` or None."""
        plan = self.plan(x.shape[0], prompt_len)
        if plan["select"]:
            index = select_frames(select, self.dino_threshold, self.window, self.max_frames)
            x = x[index.to(x.device)]
        plan = self.plan(x.shape[0], prompt_len)
        high = self.project(x, grid, self.side)
        if not plan["mix"]:
            tokens = high
        else:
            tokens = self.project(x, grid, self.lowres)
            extra = high.shape[1] - tokens.shape[1]
            room = plan["budget"] - tokens.shape[0] * tokens.shape[1]
            if extra > 0 and room >= extra:  # step 3: raise the frames nearest the text
                if text is None:
                    raise ValueError(
                        "LongVU's cross-modal query needs state['text']: the LLM's embeddings "
                        f"[B, L, {high.shape[-1]}]"
                    )
                with torch.no_grad():
                    sim = (tokens.float() @ text.float().T).mean(-1).mean(-1)  # [T]
                raised = set(torch.topk(sim, min(room // extra, len(x))).indices.tolist())
                rows = [high[t] if t in raised else tokens[t] for t in range(len(x))]
                return torch.cat(rows)
        if plan["budget"] < tokens.shape[0] * tokens.shape[1]:  # step 4
            keep = spatial_keep(tokens, self.drop_threshold, self.chunk)
            index = fit_chunks(keep, plan["budget"], self.chunk)
            return tokens.flatten(0, 1)[index.to(tokens.device)]
        return tokens.flatten(0, 1)

    def forward(self, features: Tensor, signals: ProjectorSignals) -> Tensor:
        b, total, c = features.shape
        state = signals.state
        frames = int(state.get("frames", 1))
        if frames < 1 or total % frames:
            raise ValueError(f"frames must divide the {total} tokens, got {frames}")
        grid = tuple(signals.grid)
        if grid[0] * grid[1] != total // frames:
            side = math.isqrt(total // frames)
            if side * side != total // frames:
                raise ValueError(f"signals.grid {grid} does not fit {total // frames} tokens")
            grid = (side, side)
        x = features.reshape(b, frames, total // frames, c)
        select = state.get("frame_features")
        if select is None:
            select = x
        else:
            select = select.reshape(b, frames, select.shape[1] // frames, select.shape[-1])
        text, mask = state.get("text"), state.get("text_mask")
        if text is not None and text.shape[-1] != self.image_newline.shape[0]:
            text = None  # not the LLM's embeddings (e.g. a vision-width text): unusable here
        prompt = state.get("prompt_len")
        if prompt is not None:  # an int or [B]
            prompt = torch.as_tensor(prompt).reshape(-1).expand(b)
        out = []
        for i in range(b):
            t = None if text is None else text[i]
            if t is not None and mask is not None:
                t = t[mask[i].bool()]
            n_text = (0 if t is None else t.shape[0]) if prompt is None else int(prompt[i])
            out.append(self.compress(x[i], grid, select[i], t, n_text))
        if not out:  # an empty batch
            return features.new_zeros(0, self.num_tokens(total, frames), self.image_newline.numel())
        m = max(o.shape[0] for o in out)
        valid = torch.zeros(b, m, dtype=torch.bool, device=features.device)
        for i, o in enumerate(out):
            valid[i, : o.shape[0]] = True
        state["projector_valid"] = valid
        return torch.stack([F.pad(o, (0, 0, 0, m - o.shape[0])) for o in out])


def load_official(method: LongVU, state_dict: dict[str, Tensor]) -> None:
    """Load ``model.mm_projector.*`` and ``model.image_newline`` of a LongVU checkpoint (the SVA
    connector, the towers and the LLM are ignored)."""
    own = method.state_dict()
    loaded = {k.removeprefix("model."): v for k, v in state_dict.items()}
    method.load_state_dict({k: v for k, v in loaded.items() if k in own})
