"""Wan DiT tensor and module names: diffusers' ``WanTransformer3DModel`` layout -> the original Wan
(DiffSynth) layout.

The inverse of diffusers' own ``convert_wan_transformer_to_diffusers``
(``diffusers/loaders/single_file_utils.py``, the rename table ``TRANSFORMER_KEYS_RENAME_DICT``) for the
tensors a Wan2.1/2.2 T2V, I2V or TI2V DiT has (VACE, Animate and FLF2V extras are not covered)::

    condition_embedder.time_embedder.linear_1/2   time_embedding.0/2
    condition_embedder.text_embedder.linear_1/2   text_embedding.0/2
    condition_embedder.time_proj                  time_projection.1
    condition_embedder.image_embedder.*           img_emb.proj.0/1/3/4 (Wan2.1 I2V only)
    scale_shift_table / proj_out                  head.modulation / head.head
    blocks.N.scale_shift_table                    blocks.N.modulation
    blocks.N.attn1 / attn2                        blocks.N.self_attn / cross_attn
    to_q, to_k, to_v, to_out.0                    q, k, v, o
    add_k_proj, add_v_proj, norm_added_k          k_img, v_img, norm_k_img
    blocks.N.norm2 / norm3                        blocks.N.norm3 / norm2 (swapped: diffusers' norm2 is
                                                  the cross-attention norm, Wan's norm3)
    blocks.N.ffn.net.0.proj / ffn.net.2           blocks.N.ffn.0 / ffn.2

Linear weights keep their shapes in both layouts, so a LoRA factor or a full weight moves between
them by name alone. ``rewardfl``'s ``wan2_2_diffusers`` model names its checkpoints and exported
LoRA files in the Wan layout with these rules, so they load in ``wan2_2`` and vice versa.
"""

from __future__ import annotations

import re
from typing import Callable

import torch

__all__ = ["diffusers_to_wan_key", "diffusers_to_wan_state_dict"]

_NORM_SWAP = {"2": "3", "3": "2"}

#: (pattern, replacement), applied in order to a name followed by "."
_RULES: list[tuple[str, object]] = [
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^condition_embedder\.image_embedder\.norm1\.", "img_emb.proj.0."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.0\.proj\.", "img_emb.proj.1."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.2\.", "img_emb.proj.3."),
    (r"^condition_embedder\.image_embedder\.norm2\.", "img_emb.proj.4."),
    (r"^scale_shift_table\.", "head.modulation."),
    (r"^proj_out\.", "head.head."),
    (r"^(blocks\.\d+)\.scale_shift_table\.", r"\1.modulation."),
    (r"^(blocks\.\d+)\.attn1\.", r"\1.self_attn."),
    (r"^(blocks\.\d+)\.attn2\.", r"\1.cross_attn."),
    (r"\.to_q\.", ".q."),
    (r"\.to_k\.", ".k."),
    (r"\.to_v\.", ".v."),
    (r"\.to_out\.0\.", ".o."),
    (r"\.add_k_proj\.", ".k_img."),
    (r"\.add_v_proj\.", ".v_img."),
    (r"\.norm_added_k\.", ".norm_k_img."),
    (r"^(blocks\.\d+)\.norm([23])\.", lambda m: f"{m.group(1)}.norm{_NORM_SWAP[m.group(2)]}."),
    (r"^(blocks\.\d+)\.ffn\.net\.0\.proj\.", r"\1.ffn.0."),
    (r"^(blocks\.\d+)\.ffn\.net\.2\.", r"\1.ffn.2."),
]
_COMPILED: list[tuple[re.Pattern, object]] = [(re.compile(p), r) for p, r in _RULES]


def diffusers_to_wan_key(name: str) -> str:
    """A tensor, parameter or module name of ``WanTransformer3DModel`` in the Wan (DiffSynth) layout.

    ``blocks.0.attn1.to_q.lora_A.weight`` -> ``blocks.0.self_attn.q.lora_A.weight``; suffixes after
    the module path (``weight``, ``lora_A.weight``) pass through. A name no rule touches (e.g.
    ``patch_embedding.weight``, ``blocks.0.attn1.norm_q.weight``) is the same in both layouts.
    """
    out = name + "."
    for pattern, repl in _COMPILED:
        out = pattern.sub(repl, out)
    return out[:-1]


def diffusers_to_wan_state_dict(state: dict[str, torch.Tensor],
                                rename: Callable[[str], str] = diffusers_to_wan_key) -> dict[str, torch.Tensor]:
    """A diffusers-layout Wan DiT state dict with Wan (DiffSynth) keys; tensors shared, not copied.

    Raises ValueError when two keys map to one (a layout these rules do not know).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = rename(key)
        if new in out:
            raise ValueError(f"diffusers_to_wan_state_dict: '{key}' and another key both map to '{new}'")
        out[new] = value
    return out
