"""Reference implementations of the catalog's token-reduction methods.

    import reference

    with reference.attach(model, "tome", r=13):  # a timm ViT or a reference host
        logits = model(images)
    with reference.attach(llava, "fastv", ratio=0.5):  # a transformers LLaVA: K = 2, R = 50%
        out = llava.generate(**inputs, max_new_tokens=32)
    # leaving a block (or ``handle.detach()``) restores the model exactly

One module per paper, named after its catalog id (``reference/<id>.py``); the
catalog entry names its module in ``reference:`` and the module names its
entry with ``catalog_id``; ``python -m tools validate`` checks both directions,
and ``python -m tools refs`` lists them.

The contract (``reference.core``):

- A method is a ``TokenReducer`` (an ``nn.Module``) built with its budget: a
  number of tokens removed per layer ``r``, a keep ratio or a keep count,
  depending on the paper.
- It is called as ``method(x, signals)`` with tokens ``x [B, N, C]`` and a
  ``Signals`` record: the number of protected prefix tokens (CLS,
  distillation), token sizes ``[B, N, 1]``, and the signals it declares in
  ``needs``: head-averaged keys ``[B, N, D]``, the CLS attention row
  ``[B, H, N]``, full attention maps ``[B, H, N, N]`` (probabilities, or the
  pre-softmax ``attn_logits``), values, or the next block's full-width query
  and key projections ``next_q``/``next_k`` ``[B, N, C]`` (LLaVA vision hook),
  plus a per-forward ``state`` dict for methods that carry state across layers.
- It returns a ``Reduction``: the reduced tokens ``[B, N', C]`` with the prefix
  unchanged in front, token sizes for proportional attention, ``index``
  (the input token each output continues) and ``assign`` (the output slot each
  input token went to, ``-1`` if dropped), and for training paths that keep
  the token count fixed, a soft or hard keep ``mask``.
- Learned parts are parameters of the module, with a training path
  (``module.train()``: soft or Gumbel-softmax masks) and an inference path
  (``module.eval()``: hard selection, fewer tokens).
- ``where`` says where the host calls it: ``"mid"`` (after attention, before
  the MLP, as ToMe and EViT) or ``"pre"`` (before the block's attention).

The host (``reference.hosts.vit``) is a ViT whose ``state_dict`` matches timm's
``VisionTransformer``; ``vit.apply(model, {layer: method, ...})`` attaches
methods to blocks (ToMe's ``apply_patch``).

For vision-language models, ``reference.hosts.llava`` is a LLaVA-style host (this ViT
as vision tower, an MLP projector, a LLaMA-style decoder with a KV cache).
Vision-stage methods are ``TokenReducer``s run on the tower's features
(``host.apply(vision=method)``); language-model methods are ``LLMReducer``s run
after a decoder layer during prefill (``host.apply(llm={layer: method})``) with
the attention row of each sample's last prompt token. They keep every text
token and only drop or merge image tokens; kept tokens keep their position ids.
Signals the host cannot compute (text features for text-guided methods) are
passed in ``state`` by the caller.
"""

from reference.attach import Handle, attach

__all__ = ["Handle", "attach"]
