"""Wan DiT tensor and module names: diffusers' ``WanTransformer3DModel`` layout -> the original Wan
(DiffSynth) layout.

The one table of the two layouts' names (:data:`BLOCK_NAMES`, :data:`TOP_NAMES`), read both ways:
the inverse of diffusers' own ``convert_wan_transformer_to_diffusers``
(``diffusers/loaders/single_file_utils.py``, the rename table ``TRANSFORMER_KEYS_RENAME_DICT``) for the
tensors a Wan2.1/2.2 T2V, I2V or TI2V DiT has (VACE, Animate and FLF2V extras are not covered), and
what ``lora_formats`` names diffusers-layout LoRA layers by::

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
LoRA files in the Wan layout with this table, so they load in ``wan2_2`` and vice versa.
"""

from __future__ import annotations

import re
from typing import Callable

import torch

__all__ = ["BLOCK_NAMES", "TOP_NAMES", "wan_to_diffusers_module", "diffusers_to_wan_key",
           "diffusers_to_wan_state_dict"]

#: Wan name inside ``blocks.N`` -> diffusers' name there (modules, and the parameter ``modulation``);
#: a name's children follow their parent (``self_attn.norm_q`` -> ``attn1.norm_q``)
BLOCK_NAMES = {
    "self_attn": "attn1", "cross_attn": "attn2",
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.k_img": "attn2.add_k_proj", "cross_attn.v_img": "attn2.add_v_proj",  # Wan2.1 I2V only
    "cross_attn.norm_k_img": "attn2.norm_added_k",
    "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
    "modulation": "scale_shift_table",
    "norm2": "norm3", "norm3": "norm2",  # swapped: diffusers' norm2 is the cross-attention norm, Wan's norm3
}
#: Wan name outside the blocks -> diffusers'
TOP_NAMES = {
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",  # Wan2.1 I2V only
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
    "head.modulation": "scale_shift_table",
    "head.head": "proj_out",
}
_BLOCK = re.compile(r"(blocks\.\d+)\.(.+)")
_BLOCK_BACK = {v: k for k, v in BLOCK_NAMES.items()}
_TOP_BACK = {v: k for k, v in TOP_NAMES.items()}


def _rename(name: str, table: dict[str, str]) -> str:
    """``name`` with its longest prefix (whole dotted parts) found in ``table`` replaced."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        head = ".".join(parts[:end])
        if head in table:
            return ".".join([table[head]] + parts[end:])
    return name


def wan_to_diffusers_module(wan: str) -> str:
    """A Wan module or parameter name as diffusers' ``WanTransformer3DModel`` names it (the inverse
    of :func:`diffusers_to_wan_key`)."""
    m = _BLOCK.fullmatch(wan)
    if m:
        return f"{m[1]}.{_rename(m[2], BLOCK_NAMES)}"
    return _rename(wan, TOP_NAMES)


def diffusers_to_wan_key(name: str) -> str:
    """A tensor, parameter or module name of ``WanTransformer3DModel`` in the Wan (DiffSynth) layout.

    ``blocks.0.attn1.to_q.lora_A.weight`` -> ``blocks.0.self_attn.q.lora_A.weight``; suffixes after
    the module path (``weight``, ``lora_A.weight``) pass through. A name the tables do not hold (e.g.
    ``patch_embedding.weight``, ``blocks.0.norm1``) is the same in both layouts.
    """
    m = _BLOCK.fullmatch(name)
    if m:
        return f"{m[1]}.{_rename(m[2], _BLOCK_BACK)}"
    return _rename(name, _TOP_BACK)


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
