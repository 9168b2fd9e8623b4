"""The project's own hosts: models built for the contract, with every hook in place.

- ``reference.hosts.vit``: a ViT whose ``state_dict`` is timm's ``VisionTransformer``'s,
  with a ``"pre"`` and a ``"mid"`` hook in every block and a key-padding mask.
- ``reference.hosts.llava``: a LLaVA-style model (that ViT as vision tower, a projector,
  a LLaMA-style decoder with a per-layer KV cache) with a vision hook, a projector slot
  and hooks after every decoder layer; it loads a transformers LLaVA's weights.

Other libraries' models are reached through ``reference.adapters`` and ``reference.attach``.
"""
