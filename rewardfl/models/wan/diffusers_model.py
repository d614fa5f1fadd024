"""The ``wan2_2_diffusers`` model plugin: Wan2.2 from a local diffusers-layout folder, on diffusers' classes.

``model_paths`` names the folder a diffusers ``save_pretrained`` (or a download of
``Wan-AI/Wan2.2-I2V-A14B-Diffusers``) wrote::

    model_index.json      pipeline class, components, boundary_ratio, expand_timesteps
    transformer/          WanTransformer3DModel   high-noise expert ("dit")
    transformer_2/        WanTransformer3DModel   low-noise expert ("dit2"; null in model_index for one expert)
    vae/                  AutoencoderKLWan        Wan2.1 VAE (stride 4x8x8, z 16)
    text_encoder/         UMT5EncoderModel        (transformers)
    tokenizer/            its tokenizer (``tokenizer_path`` overrides it)

Everything the ``wan2_2`` plugin does around the networks is the same code (``Wan22Model``): the
prompt cache, the I2V conditioning (``encode``: a 4-channel mask, 1 on latent frame 0, and the VAE
latent of [first frame, zeros], concatenated to the noisy latent, as diffusers'
``WanImageToVideoPipeline.prepare_latents`` builds it for Wan2.2-I2V-A14B: no CLIP image
embedding, ``expand_timesteps`` false), LoRA through peft with ``base=True`` = adapters disabled,
frozen copies for full fine-tuning, idle-expert offload, the time-chunked checkpointed decode
with gradient (``vae_decode.decode_latents``, here driving diffusers' decoder), per-block
gradient checkpointing (with ``use_gradient_checkpointing_offload``: block inputs parked in host
memory). Only the networks are diffusers': ``WanTransformer3DModel``'s own forward computes the
velocity.

Checkpoints (``trainable_state_dict``) and exported LoRA files (``save_trainable``) name tensors in
the Wan (DiffSynth) layout (``diffusers_keys``), so they are interchangeable with ``wan2_2``'s;
``lora_target_modules`` takes the same Wan names (``q,k,v,o,ffn.0,ffn.2``).

Not supported here (``wan2_2`` with original-layout files covers them): Wan2.2-TI2V-5B
(``expand_timesteps``, Wan2.2 VAE) and Wan2.1-I2V (CLIP image embedding, ``image_dim``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from typing import ClassVar, Optional

import torch

from . import architectures as arch
from .diffusers_keys import diffusers_to_wan_key
from .dit_forward import Float32Linear
from .lora import diffsynth_lora_key
from .merge_loras import describe_merges, merge_plan
from .model import EXPERT_ROLES, Wan22Model, Wan22Options, WanParts
from .offload import offloaded_checkpoint

__all__ = ["Wan22DiffusersModel", "Wan22DiffusersOptions", "DiffusersFolder", "find_diffusers_folder"]

log = logging.getLogger(__name__)

#: model_index.json component -> rewardfl role (high noise first)
EXPERT_COMPONENTS = {"dit": "transformer", "dit2": "transformer_2"}
#: Wan2.2-I2V-A14B's boundary_ratio: what ``expert_boundary`` plans with when ``model.boundary`` is
#: unset and no config is at hand (see ``Wan22DiffusersOptions.boundary``)
DEFAULT_BOUNDARY = 0.9
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "spiece.model")


@dataclasses.dataclass
class Wan22DiffusersOptions(Wan22Options):
    """The ``model:`` section for ``wan2_2_diffusers``: ``wan2_2``'s options; ``boundary`` defaults to
    the folder's ``model_index.json``."""

    #: null (default): model_index.json's ``boundary_ratio`` (read without loading, so ``run --check``
    #: plans with it too); a number overrides it (warned when they differ)
    boundary: Optional[float] = None

    MODEL: ClassVar[str] = "wan2_2_diffusers"

    def __post_init__(self):
        if self.boundary is None:  # the other checks, on a copy with a boundary in range
            dataclasses.replace(self, boundary=DEFAULT_BOUNDARY)
        else:
            super().__post_init__()


@dataclasses.dataclass
class DiffusersFolder:
    """A checked diffusers Wan folder: ``components`` role -> subfolder (``dit``, ``dit2``, ``vae``,
    ``text_encoder``, ``tokenizer``); ``index`` the parsed model_index.json."""

    root: str
    index: dict
    components: dict

    @property
    def boundary_ratio(self) -> Optional[float]:
        value = self.index.get("boundary_ratio")
        return None if value is None else float(value)

    @property
    def experts(self) -> tuple[str, ...]:
        return tuple(r for r in EXPERT_ROLES if r in self.components)


def _has_weights(folder: str) -> bool:
    return any(f.endswith(_WEIGHT_SUFFIXES) for f in os.listdir(folder))


def find_diffusers_folder(config, options) -> DiffusersFolder:
    """The diffusers folder ``model_paths`` names, its components found and checked (nothing loaded).

    Raises FileNotFoundError/ValueError naming ``model_paths`` (or ``tokenizer_path``) and the path.
    """
    if options.model_id_with_origin_paths:
        raise ValueError("model_id_with_origin_paths: wan2_2_diffusers reads one local diffusers folder; set "
                         "model_paths to it and leave model_id_with_origin_paths empty (or use model_name: wan2_2)")
    if not options.model_paths:
        raise ValueError("model_paths: not set; for wan2_2_diffusers give the local diffusers folder holding "
                         "model_index.json (e.g. a download of Wan-AI/Wan2.2-I2V-A14B-Diffusers)")
    path = config.resolve_path(options.model_paths)
    if os.path.isfile(path) and os.path.basename(path) == "model_index.json":
        path = os.path.dirname(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model_paths: folder not found: {path} (wan2_2_diffusers needs the diffusers "
                                "folder holding model_index.json)")
    if not os.path.isdir(path):
        raise ValueError(f"model_paths: {path} is a file; wan2_2_diffusers needs the diffusers folder holding "
                         "model_index.json (for a model_paths JSON of original-layout files use model_name: wan2_2)")
    index_path = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_path):
        raise FileNotFoundError(f"model_paths: {path} has no model_index.json; point model_paths at the diffusers "
                                "folder (the one with transformer/, vae/, text_encoder/, tokenizer/)")
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except ValueError as e:
        raise ValueError(f"model_paths: {index_path} is not valid JSON: {e}") from e
    if not isinstance(index, dict) or not str(index.get("_class_name", "")).startswith("Wan"):
        raise ValueError(f"model_paths: {index_path} is not a Wan pipeline's model_index.json (_class_name "
                         f"{index.get('_class_name') if isinstance(index, dict) else index!r})")
    if index.get("expand_timesteps"):
        raise ValueError(f"model_paths: {index_path} has expand_timesteps (Wan2.2-TI2V-5B); wan2_2_diffusers "
                         "supports Wan2.2 A14B folders; use model_name: wan2_2 with the original-layout files")

    components = {}
    wanted = [("dit", "transformer", True), ("dit2", "transformer_2", False), ("vae", "vae", True),
              ("text_encoder", "text_encoder", True), ("tokenizer", "tokenizer", True)]
    for role, name, required in wanted:
        entry = index.get(name)
        if entry is None or (isinstance(entry, list) and None in entry):
            if required:
                raise ValueError(f"model_paths: {index_path} lists no '{name}' component")
            continue
        folder = os.path.join(path, name)
        if role == "tokenizer" and options.tokenizer_path:
            folder = config.resolve_path(options.tokenizer_path)
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"tokenizer_path: tokenizer folder not found: {folder}")
            components[role] = folder
            continue
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"model_paths: {index_path} lists '{name}' but {folder} is missing (an "
                                    "incomplete download? fetch that folder too)")
        if role == "tokenizer":
            if not any(os.path.isfile(os.path.join(folder, f)) for f in _TOKENIZER_FILES):
                raise FileNotFoundError(f"model_paths: {folder} holds no tokenizer files "
                                        f"({', '.join(_TOKENIZER_FILES)})")
        elif not os.path.isfile(os.path.join(folder, "config.json")) or not _has_weights(folder):
            raise FileNotFoundError(f"model_paths: {folder} needs config.json and its weights "
                                    "(*.safetensors or a sharded *.safetensors.index.json)")
        components[role] = folder
    return DiffusersFolder(path, index, components)


def _read_config(folder: str) -> dict:
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def _dit_arch(cfg: dict, where: str) -> arch.DiTArch:
    """The diffusers transformer config as ``wan2_2``'s architecture record (WanModel's kwarg names)."""
    if cfg.get("image_dim") is not None:
        raise ValueError(f"{where}: this transformer takes CLIP image features (image_dim {cfg['image_dim']}: "
                         "Wan2.1-I2V); wan2_2_diffusers supports Wan2.2 A14B")
    heads, head_dim = cfg.get("num_attention_heads", 40), cfg.get("attention_head_dim", 128)
    kwargs = dict(dim=heads * head_dim, in_dim=cfg.get("in_channels", 16), ffn_dim=cfg.get("ffn_dim", 13824),
                  out_dim=cfg.get("out_channels") or cfg.get("in_channels", 16), text_dim=cfg.get("text_dim", 4096),
                  freq_dim=cfg.get("freq_dim", 256), eps=cfg.get("eps", 1e-6),
                  patch_size=tuple(cfg.get("patch_size", (1, 2, 2))), num_heads=heads,
                  num_layers=cfg.get("num_layers", 40), has_image_input=False)
    conditioning = arch.conditioning_of(kwargs)
    if conditioning is None:
        raise ValueError(f"{where}: a transformer with {kwargs['in_dim']} input channels for {kwargs['out_dim']} "
                         "latent channels needs inputs rewardfl does not provide")
    return arch.DiTArch(f"diffusers:{cfg.get('_class_name', 'WanTransformer3DModel')}", kwargs, conditioning)


def _resolve_boundary(options, folder: DiffusersFolder) -> Optional[float]:
    """``model.boundary`` when set, else model_index.json's ``boundary_ratio`` (None: one expert)."""
    ratio = folder.boundary_ratio
    if len(folder.experts) < 2:
        return None
    if options.boundary is not None:
        if ratio is not None and abs(ratio - options.boundary) > 1e-9:
            log.warning("model.boundary %.4g overrides boundary_ratio %.4g of %s/model_index.json",
                        options.boundary, ratio, folder.root)
        return options.boundary
    if ratio is None:
        raise ValueError(f"model.boundary: {folder.root}/model_index.json has two transformers and no "
                         "boundary_ratio; set model.boundary (Wan2.2-I2V-A14B: 0.9, T2V-A14B: 0.875)")
    return ratio


# --------------------------------------------------------------------------- adapters

class _UMT5Context(torch.nn.Module):
    """transformers' ``UMT5EncoderModel`` called as ``wan2_2`` calls diffsynth's text encoder:
    ``(ids, mask) -> (B, L, dim)`` last hidden state."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state


class _DecoderSteps(torch.nn.Module):
    """diffusers' ``WanDecoder3d`` with diffsynth's decoder signature, for ``vae_decode._decode_tile``:
    ``(x, feat_cache, feat_idx) -> (out, feat_cache, feat_idx)``.

    ``_decode_tile`` sizes the causal-conv cache with diffsynth's ``count_conv3d``, which does not
    count diffusers' ``WanCausalConv3d`` (it starts empty): the list is filled up to this decoder's
    count on the first call and carried from then on.
    """

    def __init__(self, decoder: torch.nn.Module, num_convs: int):
        super().__init__()
        self.decoder = decoder
        self.num_convs = num_convs

    def forward(self, x, feat_cache=None, feat_idx=(0,), first_chunk=False):
        feat_cache.extend([None] * (self.num_convs - len(feat_cache)))
        feat_idx = list(feat_idx)
        out = self.decoder(x, feat_cache=feat_cache, feat_idx=feat_idx, first_chunk=first_chunk)
        return out, feat_cache, feat_idx


class _VAEModel(torch.nn.Module):
    """``AutoencoderKLWan`` as diffsynth's ``VideoVAE_`` looks to ``vae_decode``: ``conv1`` (dtype),
    ``conv2`` (before the decoder), ``decoder`` (per-frame steps), ``encode(video, scale)``."""

    def __init__(self, autoencoder: torch.nn.Module):
        super().__init__()
        self.autoencoder = autoencoder
        self.decoder = _DecoderSteps(autoencoder.decoder, autoencoder._cached_conv_counts["decoder"])

    @property
    def conv1(self):
        return self.autoencoder.quant_conv

    @property
    def conv2(self):
        return self.autoencoder.post_quant_conv

    def encode(self, video: torch.Tensor, scale) -> torch.Tensor:
        """Normalised latent mean ``(mu - mean) / std`` (B, z, T, h, w) of videos (B, 3, F, H, W) in [-1, 1]."""
        mu = self.autoencoder.encode(video).latent_dist.mode()
        mean, inv_std = (s.to(mu.device, mu.dtype).view(1, -1, 1, 1, 1) for s in scale)
        return (mu - mean) * inv_std


class _DiffusersVAE(torch.nn.Module):
    """``AutoencoderKLWan`` behind the interface of diffsynth's ``WanVideoVAE`` that
    ``vae_decode.encode_video``/``decode_latents`` use: ``model``, ``mean``, ``std``, ``scale``,
    ``upsampling_factor`` (the latent statistics from the VAE's config, fp32)."""

    def __init__(self, autoencoder: torch.nn.Module):
        super().__init__()
        cfg = autoencoder.config
        if cfg.get("is_residual") or cfg.get("patch_size") is not None or cfg.z_dim != 16:
            raise ValueError("model_paths: the VAE is the Wan2.2 VAE (TI2V-5B); wan2_2_diffusers supports the "
                             "Wan2.1 VAE of the A14B models")
        self.model = _VAEModel(autoencoder)
        self.register_buffer("mean", torch.tensor(cfg.latents_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.latents_std, dtype=torch.float32), persistent=False)
        self.z_dim = cfg.z_dim
        self.upsampling_factor = 2 ** (len(cfg.dim_mult) - 1)

    @property
    def scale(self):
        return [self.mean, 1.0 / self.std]


def _checkpoint_function(mode: str):
    """What diffusers' transformer calls per block under gradient checkpointing, for ``_checkpoint_mode``."""
    if mode == "offload":  # only the block input (the large one) waits in host memory
        def offloaded(block, *args):
            return offloaded_checkpoint(block, *args, offload=(True,) + (False,) * (len(args) - 1))
        return offloaded
    return functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)


def _fp32_time_projection(dit) -> None:
    """diffusers keeps ``time_embedder`` in fp32 (``_keep_in_fp32_modules``); its ``time_proj`` is made
    to compute in fp32 too, as official Wan and ``wan2_2`` do (``dit_forward.Float32Linear``)."""
    m = dit.condition_embedder.time_proj
    if type(m) is torch.nn.Linear:
        m.__class__ = Float32Linear


# --------------------------------------------------------------------------- the plugin

class Wan22DiffusersModel(Wan22Model):
    """Wan2.2 A14B (I2V, or T2V) from a diffusers folder: ``model_paths`` is the folder with
    model_index.json. See the module docstring for what is shared with ``wan2_2``."""

    Options = Wan22DiffusersOptions

    @classmethod
    def expert_boundary(cls, options, config=None) -> float:
        """``model.boundary``; unset: model_index.json's ``boundary_ratio`` when ``config`` is given, else
        0.9 (Wan2.2-I2V-A14B's)."""
        if options.boundary is not None:
            return options.boundary
        if config is not None:
            folder = find_diffusers_folder(config, options)
            boundary = _resolve_boundary(options, folder)
            return DEFAULT_BOUNDARY if boundary is None else boundary
        return DEFAULT_BOUNDARY

    @classmethod
    def check(cls, config, options) -> list[str]:
        """``run --check``: the folder's components and the boundary, from model_index.json and config.json
        files only."""
        folder = find_diffusers_folder(config, options if options is not None else cls.Options())
        lines = [f"model_index.json: {folder.root} ({folder.index.get('_class_name')})"]
        for role, path in folder.components.items():
            name = EXPERT_COMPONENTS.get(role, role)
            label = {"dit": " (high noise)", "dit2": " (low noise)"}.get(role, "")
            lines.append(f"{name}{label}: {path}")
        for role in folder.experts:
            _dit_arch(_read_config(folder.components[role]), f"model_paths: {folder.components[role]}")
        boundary = _resolve_boundary(options, folder)
        if boundary is not None:
            source = "model.boundary" if options.boundary is not None else "model_index.json boundary_ratio"
            lines.append(f"boundary: {boundary:g} ({source})")
        merges = options.merge_loras if options is not None else []  # no options: the defaults, nothing to merge
        return lines + describe_merges(merge_plan(config, merges, tuple(folder.experts)))

    @classmethod
    def planned_experts(cls, config, options) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The folder's experts (model_index.json) and the ones ``trainable_models`` trains among them."""
        o = options if options is not None else cls.Options()
        experts = tuple(find_diffusers_folder(config, o).experts)
        lora, full = cls.plan_training(o, experts)
        return experts, tuple(r for r in experts if r in lora or r in full)

    def _load_parts(self) -> WanParts:
        """The networks of the diffusers folder ``model_paths`` names: model_index.json and the
        components' config.json first (every user error surfaces there), then diffusers' and
        transformers' own loaders."""
        config, options = self.config, self.options
        folder = find_diffusers_folder(config, options)
        self.folder = folder
        self.boundary = _resolve_boundary(self.options, folder)
        experts = folder.experts
        archs = {r: _dit_arch(_read_config(folder.components[r]), f"model_paths: {folder.components[r]}")
                 for r in experts}
        first = archs[experts[0]]
        for r in experts[1:]:
            if archs[r].kwargs != first.kwargs:
                raise ValueError(f"model_paths: {folder.components['dit']} and {folder.components[r]} differ "
                                 "in architecture; both experts must be the same")
        vae_cfg = _read_config(folder.components["vae"])
        if vae_cfg.get("z_dim", 16) != first.z_dim:
            raise ValueError(f"model_paths: the VAE ({folder.components['vae']}) has {vae_cfg.get('z_dim')} latent "
                             f"channels, the transformer expects {first.z_dim}")
        te_cfg = _read_config(folder.components["text_encoder"])
        if te_cfg.get("d_model") != first.kwargs["text_dim"]:
            raise ValueError(f"model_paths: the text encoder ({folder.components['text_encoder']}) is "
                             f"{te_cfg.get('d_model')}-d, the transformer expects {first.kwargs['text_dim']}-d")
        self._check_training(options, experts, first)  # the same names and messages as wan2_2

        try:
            from diffusers import AutoencoderKLWan, WanTransformer3DModel
        except ImportError:
            raise ValueError("model_name: wan2_2_diffusers needs diffusers; install it with "
                             'pip install --no-build-isolation -e ".[diffusers]" (or pip install diffusers==0.42.1)') from None
        from transformers import UMT5EncoderModel

        tokenizer = self._load_tokenizer(folder.components["tokenizer"])
        dits = {r: self._load(WanTransformer3DModel, folder.components[r]) for r in experts}
        text_encoder = _UMT5Context(self._load(UMT5EncoderModel, folder.components["text_encoder"])).eval()
        vae = _DiffusersVAE(self._load(AutoencoderKLWan, folder.components["vae"])).eval()
        return WanParts(first, dits, vae, arch.vae_stride({"kind": "wan2.1"}), text_encoder, tokenizer)

    def _load(self, cls, folder: str) -> torch.nn.Module:
        try:
            module = cls.from_pretrained(folder, torch_dtype=self.dtype, local_files_only=True)
        except (OSError, ValueError, RuntimeError) as e:  # missing shards, shape mismatches, bad configs
            raise ValueError(f"model_paths: cannot load {cls.__name__} from {folder}: {e}") from e
        return module.requires_grad_(False).eval()

    def _wan_lora_targets(self, dit, targets: list[str]) -> list[str]:
        """The full names of ``dit``'s Linear layers whose Wan-layout name matches a target (peft's rule)."""
        names = []
        for name, module in dit.named_modules():
            if isinstance(module, torch.nn.Linear):
                wan = diffusers_to_wan_key(name)
                if any(wan == t or wan.endswith("." + t) for t in targets):
                    names.append(name)
        return names

    def _prepare_dit(self, dit) -> None:
        _fp32_time_projection(dit)

    def _lora_targets(self, dit, targets: list[str]) -> list[str]:
        return self._wan_lora_targets(dit, targets)

    def _enable_checkpointing(self) -> None:
        """Gradient checkpointing through diffusers' per-block hook."""
        if self._checkpoint_mode != "none":
            for r in self.trainable_experts():
                self.dits[r].enable_gradient_checkpointing(_checkpoint_function(self._checkpoint_mode))

    @classmethod
    def with_random_weights(cls, *args, **kwargs):
        raise NotImplementedError("wan2_2_diffusers loads a diffusers folder; with_random_weights builds wan2_2")

    # ------------------------------------------------------------------ VideoModel interface

    @staticmethod
    def _velocity(dit, x: torch.Tensor, timestep: torch.Tensor, cond) -> torch.Tensor:
        """``WanTransformer3DModel``'s own forward on ``[x | y]`` (I2V: y = mask + first-frame latent)."""
        dtype = dit.patch_embedding.weight.dtype
        if cond.y is not None:
            x = torch.cat([x, cond.y.to(x.dtype)], dim=1)
        return dit(x.to(dtype), timestep=timestep, encoder_hidden_states=cond.context.to(dtype),
                   return_dict=False)[0]

    def _checkpoint_key(self, name: str) -> str:
        """``<expert>.<diffusers/peft name>`` -> ``<expert>.<Wan-layout name>``: the keys ``wan2_2`` uses, so
        checkpoints and LoRA files move between the two plugins."""
        expert, rest = name.split(".", 1)
        return f"{expert}.{diffusers_to_wan_key(diffsynth_lora_key(rest))}"

    def _wan_name(self, name: str) -> str:
        return diffusers_to_wan_key(name)
