"""Which Wan architecture a weights file holds, read from its tensor names and shapes alone.

The DiT's hyper-parameters follow from its shapes except the head count, so a DiT must match a
known architecture: one of diffsynth's ``MODEL_CONFIGS`` entries for ``WanModel`` (Wan2.1/2.2
T2V, I2V, TI2V) or one of rewardfl's tiny twins (:data:`TINY_DITS`). The VAE and the umT5 text
encoder are fully determined by their shapes.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional

__all__ = ["TINY_DITS", "TINY_TEXT_ENCODER", "TINY_VAE", "DiTArch", "known_dits", "dit_architecture", "dit_key",
           "conditioning_of", "vae_architecture", "vae_key", "vae_stride", "text_encoder_architecture"]

#: tiny twins of the Wan DiTs, for tests and the CPU demo (diffsynth's WanModel kwargs)
TINY_DITS = {
    # Wan2.2-I2V-A14B in miniature: 36 = 16 noisy latent + 4 mask + 16 first-frame latent
    "tiny-i2v": dict(dim=64, in_dim=36, ffn_dim=128, out_dim=16, text_dim=32, freq_dim=256, eps=1e-6,
                     patch_size=(1, 2, 2), num_heads=2, num_layers=2, has_image_input=False,
                     require_clip_embedding=False),
    # Wan2.2-TI2V-5B in miniature: one expert, first-frame latent injected, per-token timesteps
    "tiny-ti2v": dict(dim=64, in_dim=16, ffn_dim=128, out_dim=16, text_dim=32, freq_dim=256, eps=1e-6,
                      patch_size=(1, 2, 2), num_heads=2, num_layers=2, has_image_input=False,
                      seperated_timestep=True, require_clip_embedding=False, require_vae_embedding=False,
                      fuse_vae_embedding_in_latents=True),
}
#: the tiny twins' umT5-style text encoder (diffsynth's WanTextEncoder kwargs) and Wan2.1-family
#: VAE (VideoVAE_ kwargs); loading reads both from their shapes, these say what the twin is
TINY_TEXT_ENCODER = dict(vocab=259, dim=32, dim_attn=32, dim_ffn=64, num_heads=2, num_layers=2, num_buckets=32,
                         shared_pos=False)
TINY_VAE = dict(dim=8, z_dim=16)

_WAN_MODEL = "diffsynth.models.wan_video_dit.WanModel"
# WanModel options whose extra weights or inputs rewardfl does not drive
_UNSUPPORTED_FLAGS = ("has_ref_conv", "add_control_adapter", "has_image_pos_emb") + tuple(
    f"wantodance_enable_{n}" for n in ("music_inject", "refimage", "refface", "global", "dynamicfps", "unimodel"))


@dataclasses.dataclass(frozen=True)
class DiTArch:
    """A recognised DiT: ``kwargs`` builds ``WanModel``; ``conditioning`` is how the first frame enters.

    ``conditioning``: ``"i2v"`` (y = mask + first-frame latent concatenated to the input channels,
    Wan2.2-I2V-A14B), ``"ti2v"`` (first-frame latent injected into latent frame 0, Wan2.2-TI2V-5B)
    or ``"t2v"`` (no image input).
    """

    name: str
    kwargs: dict
    conditioning: str

    @property
    def z_dim(self) -> int:
        return self.kwargs["out_dim"]


def dit_key(key: str) -> Optional[str]:
    """A DiT tensor name in diffsynth's layout (original Wan layout; ``model.``/``diffusion_model.`` stripped)."""
    for prefix in ("model.", "diffusion_model."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    if key.startswith("vace"):
        return None
    return key


def known_dits() -> list[tuple[str, dict]]:
    """(name, WanModel kwargs) of every DiT rewardfl recognises: the tiny twins, then diffsynth's."""
    from diffsynth.configs.model_configs import MODEL_CONFIGS

    out = list(TINY_DITS.items())
    for cfg in MODEL_CONFIGS:
        kw = cfg.get("extra_kwargs") or {}
        if cfg.get("model_class") != _WAN_MODEL or any(kw.get(f) for f in _UNSUPPORTED_FLAGS):
            continue
        if cfg.get("state_dict_converter", "").endswith("FromDiffusers"):
            continue
        name = f"diffsynth:{cfg['model_hash']}"
        out.append((name, dict(kw, patch_size=tuple(kw["patch_size"]))))
    return out


def _describe(kw: dict) -> str:
    return (f"dim={kw['dim']} in_dim={kw['in_dim']} ffn_dim={kw['ffn_dim']} out_dim={kw['out_dim']} "
            f"layers={kw['num_layers']} text_dim={kw['text_dim']}")


def dit_architecture(shapes: dict[str, tuple[int, ...]], where: str) -> DiTArch:
    """The known architecture whose shapes ``shapes`` (diffsynth layout) has; ValueError otherwise."""
    need = ("patch_embedding.weight", "blocks.0.ffn.0.weight", "text_embedding.0.weight",
            "time_embedding.0.weight", "head.head.weight")
    missing = [k for k in need if k not in shapes]
    if missing:
        raise ValueError(f"{where}: not Wan DiT weights in the original (or diffsynth) layout: missing "
                         f"{missing}; diffusers-layout weights must be converted first")
    pe = shapes["patch_embedding.weight"]
    patch = tuple(pe[2:])
    found = dict(
        dim=pe[0], in_dim=pe[1], patch_size=patch, ffn_dim=shapes["blocks.0.ffn.0.weight"][0],
        text_dim=shapes["text_embedding.0.weight"][1], freq_dim=shapes["time_embedding.0.weight"][1],
        out_dim=shapes["head.head.weight"][0] // math.prod(patch),
        num_layers=len({m.group(1) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}),
        has_image_input="img_emb.proj.0.weight" in shapes,
    )
    for name, kw in known_dits():
        if all(tuple(kw[k]) == v if k == "patch_size" else kw.get(k, False) == v for k, v in found.items()):
            break
    else:
        raise ValueError(f"{where}: DiT shapes ({_describe(found)}) match no known Wan architecture "
                         "(Wan2.1/2.2 T2V, I2V-A14B, TI2V-5B, or rewardfl's tiny twin); is this file a Wan DiT?")
    if found["has_image_input"]:
        raise ValueError(f"{where}: this DiT ({_describe(found)}) needs CLIP image features (Wan2.1-I2V); "
                         "wan2_2 supports Wan2.2 I2V-A14B / TI2V-5B / T2V weights")
    conditioning = conditioning_of(kw)
    if conditioning is None:
        raise ValueError(f"{where}: DiT with {kw['in_dim']} input channels ({_describe(found)}) needs control "
                         "inputs rewardfl does not provide")
    return DiTArch(name, dict(kw, patch_size=tuple(kw["patch_size"])), conditioning)


def conditioning_of(kwargs: dict) -> Optional[str]:
    """How the first frame enters a DiT with these ``WanModel`` kwargs (see :class:`DiTArch`), from its
    channels: ``ti2v`` (``fuse_vae_embedding_in_latents``), ``i2v`` (input = noisy latent + 4 mask +
    first-frame latent channels), ``t2v`` (input = latent channels); None for other inputs."""
    if kwargs.get("fuse_vae_embedding_in_latents"):
        return "ti2v"
    if kwargs["in_dim"] == 2 * kwargs["out_dim"] + 4 and kwargs.get("require_vae_embedding", True):
        return "i2v"
    if kwargs["in_dim"] == kwargs["out_dim"]:
        return "t2v"
    return None


# --------------------------------------------------------------------------- VAE


def vae_key(key: str) -> str:
    """A VAE tensor name as ``VideoVAE_`` names it (``model.`` prefix stripped)."""
    return key[len("model."):] if key.startswith("model.") else key


def vae_stride(vae_arch: dict) -> tuple[int, int, int]:
    """(time, height, width) pixels per latent of the VAE ``vae_arch`` describes: 4x8x8 for the
    Wan2.1 family, 4x16x16 for the Wan2.2 VAE."""
    return (4, 8, 8) if vae_arch["kind"] == "wan2.1" else (4, 16, 16)


def vae_architecture(shapes: dict[str, tuple[int, ...]], where: str) -> dict:
    """``{"kind": "wan2.1"|"wan2.2", "dim": .., "z_dim": ..}`` from a VAE's shapes (``vae_key`` layout)."""
    conv1 = shapes.get("encoder.conv1.weight")
    conv2 = shapes.get("conv2.weight")
    if conv1 is None or conv2 is None or len(conv1) != 5:
        raise ValueError(f"{where}: not a Wan VAE weights file (no encoder.conv1.weight / conv2.weight)")
    z_dim = conv2[0]
    if conv1[1] == 3:
        return {"kind": "wan2.1", "dim": conv1[0], "z_dim": z_dim}
    if conv1[1] == 12 and z_dim == 48 and conv1[0] == 160:
        return {"kind": "wan2.2", "dim": 160, "z_dim": 48}
    raise ValueError(f"{where}: VAE shapes (encoder.conv1 {conv1}, conv2 {conv2}) match neither the Wan2.1 "
                     "VAE family nor the Wan2.2 VAE")


# --------------------------------------------------------------------------- text encoder


def text_encoder_architecture(shapes: dict[str, tuple[int, ...]], where: str) -> dict:
    """``WanTextEncoder`` kwargs (umT5 encoder) from its shapes."""
    try:
        vocab, dim = shapes["token_embedding.weight"]
        dim_attn = shapes["blocks.0.attn.q.weight"][0]
        dim_ffn = shapes["blocks.0.ffn.fc1.weight"][0]
        num_buckets, num_heads = shapes["blocks.0.pos_embedding.embedding.weight"]
    except (KeyError, ValueError) as e:
        raise ValueError(f"{where}: not umT5 text encoder weights in Wan's layout (missing {e})") from e
    num_layers = len({m.group(1) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))})
    return dict(vocab=vocab, dim=dim, dim_attn=dim_attn, dim_ffn=dim_ffn, num_heads=num_heads,
                num_layers=num_layers, num_buckets=num_buckets, shared_pos=False)
