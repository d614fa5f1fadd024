"""Write the tiny Wan2.2 twin's weight files: ``python -m rewardfl.demo.make_tiny OUT_DIR``.

OUT_DIR receives real files that go through the same loading path as the real model::

    dit_high_noise.safetensors  dit_low_noise.safetensors   tiny-i2v DiTs (different seeds)
                                                            (--kind ti2v: dit_ti2v.safetensors)
    text_encoder.safetensors                                umT5-style encoder, dim 32, 2 layers
    vae.safetensors                                         Wan2.1 VAE, base width 8, z 16
    tokenizer/                                              byte-level tokenizer (pad 0, </s> 1)
    model_paths.json                                        the dict form, tokenizer included

Weights are deterministic (fixed seeds). ``--vae identity`` (default) sets the VAE to a
hand-built near-identity autoencoder (latent channels 0-2 hold the colour of each 8x8 block,
the decoder upsamples and blurs it back), so decoded videos look like pictures and a reward on
them means something; ``--vae random`` keeps diffsynth's random init. Re-running with the
same options on a complete folder does nothing (a stamp file records the options).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import torch

from rewardfl.cli import user_error_exit
from rewardfl.fileio import stamp_matches, write_json, write_safetensors, write_stamp
from rewardfl.models.wan.architectures import TINY_DITS, TINY_TEXT_ENCODER, TINY_VAE

__all__ = ["make_tiny", "identity_vae_", "write_byte_tokenizer"]

FORMAT_VERSION = 1
#: DiT files and model_paths keys per kind: "i2v" = Wan2.2-I2V-A14B's layout (two experts),
#: "ti2v" = Wan2.2-TI2V-5B's (one expert, first-frame injection)
DITS = {
    "i2v": (("high_noise_model", "dit_high_noise.safetensors", 1), ("low_noise_model", "dit_low_noise.safetensors", 2)),
    "ti2v": (("dit", "dit_ti2v.safetensors", 5),),
}
COMMON_FILES = ("text_encoder.safetensors", "vae.safetensors", "tokenizer", "model_paths.json")


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def write_byte_tokenizer(folder: str) -> None:
    """A T5-style byte-level tokenizer: <pad>=0, </s>=1 appended, <unk>=2, byte b -> 3 + rank of b."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=512)
    fast.save_pretrained(folder)


def identity_vae_(vae, mean: Optional[torch.Tensor] = None, std: Optional[torch.Tensor] = None) -> None:
    """Set a Wan2.1-family ``VideoVAE_`` to a near-identity autoencoder, in place.

    Normalised latent channels 0-2 hold the RGB average of each 8x8 block (in [-1, 1]), the others
    0; decoding upsamples them back with a 3x3 blur per 2x step. Residual branches and attention
    outputs are zero (identities), down-convs average 2x2, temporal convs copy the current frame.
    A constant channel (value ``C``) rides along so that the RMS norms before the SiLUs of both
    heads divide by about ``C`` instead of by the colour's own magnitude; the heads' gains keep the
    SiLUs in their linear range. Reconstruction error of smooth images is a few percent.
    """
    from diffsynth.models.wan_video_vae import Resample, ResidualBlock, WanVideoVAE

    C, S = 10.0, 0.2  # constant channel, SiLU input scale (silu(x) ~ x / 2 for |x| <= S / C)
    if mean is None:  # the Wan2.1 VAE's latent statistics, as diffsynth's WanVideoVAE applies them
        from diffsynth.core.vram.initialization import skip_model_initialization

        with skip_model_initialization():
            ref = WanVideoVAE(z_dim=vae.z_dim)
        mean, std = ref.mean, ref.std
    z = vae.z_dim
    with torch.no_grad():
        for p in vae.parameters():
            p.zero_()
        for m in vae.modules():
            if hasattr(m, "gamma"):
                m.gamma.fill_(1.0)
        for m in vae.modules():
            if isinstance(m, ResidualBlock) and not isinstance(m.shortcut, torch.nn.Identity):
                _copy_channels(m.shortcut, range(4))
            elif isinstance(m, Resample):
                conv = m.resample[1]
                if m.mode.startswith("upsample"):
                    blur = torch.tensor([1.0, 2.0, 1.0])
                    for i in range(4):
                        conv.weight[i, i] = torch.outer(blur, blur) / 16
                    if m.mode == "upsample3d":  # dim -> 2 dim: both output frames copy the input
                        w, d = m.time_conv.weight, m.time_conv.weight.shape[1]
                        for i in range(4):
                            w[i, i, -1, 0, 0] = 1.0
                            w[d + i, i, -1, 0, 0] = 1.0
                else:
                    for i in range(4):
                        conv.weight[i, i, :2, :2] = 0.25
                    if m.mode == "downsample3d":
                        _copy_channels(m.time_conv, range(4))
        enc, dec = vae.encoder, vae.decoder
        _copy_channels(enc.conv1, range(3))
        enc.conv1.bias[3] = C
        norm, head = enc.head[0], enc.head[-1]
        norm.gamma.fill_(S / norm.scale)  # -> S * [rgb / C, 1]
        for i in range(z):
            if i < 3:
                head.weight[i, i, -1, 1, 1] = 2 * C / S * std[i]  # silu(x) ~ x / 2
            head.bias[i] = mean[i]
        _copy_channels(vae.conv1, range(2 * z))
        for i in range(3):  # conv2 sees z * std + mean; hand the decoder the normalised latent
            vae.conv2.weight[i, i, 0, 0, 0] = 1.0 / std[i]
            vae.conv2.bias[i] = -mean[i] / std[i]
        _copy_channels(dec.conv1, range(3))
        dec.conv1.bias[3] = C
        norm, head = dec.head[0], dec.head[-1]
        norm.gamma.fill_(S / norm.scale)
        for i in range(3):
            head.weight[i, i, -1, 1, 1] = 2 * C / S


def _copy_channels(conv, channels) -> None:
    """Make a (causal) conv copy input channel i to output channel i at the current frame and pixel."""
    w = conv.weight
    for i in channels:
        if w.dim() == 5:
            w[i, i, -1, w.shape[3] // 2, w.shape[4] // 2] = 1.0
        else:
            w[i, i, w.shape[2] // 2, w.shape[3] // 2] = 1.0


def _stamp(vae_init: str, kind: str) -> dict:
    return {"format": FORMAT_VERSION, "vae": vae_init, "kind": kind}


def make_tiny(out_dir: str, *, vae_init: str = "identity", kind: str = "i2v", force: bool = False) -> str:
    """Write the tiny twin into ``out_dir`` (idempotent); returns the model_paths JSON path.

    ``kind``: "i2v" (default: two experts, 36-channel input like Wan2.2-I2V-A14B) or "ti2v"
    (one expert with first-frame latent injection like Wan2.2-TI2V-5B).
    """
    if vae_init not in ("identity", "random"):
        raise ValueError(f"make_tiny: --vae must be identity or random, got {vae_init!r}")
    if kind not in DITS:
        raise ValueError(f"make_tiny: --kind must be one of {sorted(DITS)}, got {kind!r}")
    files = [f for _, f, _ in DITS[kind]] + list(COMMON_FILES)
    os.makedirs(out_dir, exist_ok=True)
    stamp_path = os.path.join(out_dir, "tiny_stamp.json")
    paths_json = os.path.join(out_dir, "model_paths.json")
    if (not force and all(os.path.exists(os.path.join(out_dir, f)) for f in files)
            and stamp_matches(stamp_path, _stamp(vae_init, kind))):
        return paths_json
    from diffsynth.models.wan_video_dit import WanModel
    from diffsynth.models.wan_video_text_encoder import WanTextEncoder
    from diffsynth.models.wan_video_vae import VideoVAE_

    kw = dict(TINY_DITS[f"tiny-{kind}"])
    spec = {}
    for key, name, seed in DITS[kind]:
        dit = _seeded(seed, lambda: WanModel(**kw))
        write_safetensors(os.path.join(out_dir, name), dit.state_dict(), {"rewardfl": f"tiny-{kind}"})
        spec[key] = name
    te = _seeded(3, lambda: WanTextEncoder(**TINY_TEXT_ENCODER))
    write_safetensors(os.path.join(out_dir, "text_encoder.safetensors"), te.state_dict())
    vae = _seeded(4, lambda: VideoVAE_(**TINY_VAE))
    if vae_init == "identity":
        identity_vae_(vae)
    write_safetensors(os.path.join(out_dir, "vae.safetensors"), vae.state_dict())
    write_byte_tokenizer(os.path.join(out_dir, "tokenizer"))
    spec.update({"text_encoder": "text_encoder.safetensors", "vae": "vae.safetensors", "tokenizer": "tokenizer"})
    write_json(paths_json, spec, indent=2)
    write_stamp(stamp_path, _stamp(vae_init, kind))
    return paths_json


@user_error_exit("rewardfl.demo.make_tiny")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rewardfl.demo.make_tiny", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", help="folder to write the tiny weight files and model_paths.json into")
    parser.add_argument("--vae", choices=("identity", "random"), default="identity",
                        help="VAE weights: a near-identity autoencoder (default) or diffsynth's random init")
    parser.add_argument("--kind", choices=sorted(DITS), default="i2v",
                        help="i2v: two experts like Wan2.2-I2V-A14B (default); ti2v: one expert like TI2V-5B")
    parser.add_argument("--force", action="store_true", help="rewrite even if the folder is complete")
    args = parser.parse_args(argv)
    print(make_tiny(args.out_dir, vae_init=args.vae, kind=args.kind, force=args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
