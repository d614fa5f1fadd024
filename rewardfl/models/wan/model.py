"""The ``wan2_2`` model plugin (Wan2.2 image-to-video on diffsynth 2.1.12) and its tiny twin.

Data flow for one batch::

    prompts ──tokenizer──umT5──> context (B, L, text_dim)       cached per unique prompt
    first frames (B,3,H,W) ──VAE──> y = [mask(4) | latent of frame 0 then zeros(z)]   (I2V, A14B)
                                or  first-frame latent injected into latent frame 0    (TI2V-5B)
    x (B, z, T, h, w) ──dit / dit2 (sampler picks per step)──> velocity (B, z, T, h, w)
    latents ──VAE decode (time-chunked, checkpointed, tiled)──> videos (B, 3, F, H, W) in [-1, 1]

Shapes: ``T = (F - 1) // 4 + 1`` and ``h, w = H / 8, W / 8`` for the Wan2.1 VAE (A14B, tiny);
``H`` and ``W`` must be multiples of 16 (VAE stride 8 x DiT patch 2).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
from typing import ClassVar, Iterator, Literal, Optional, Sequence, Union

import torch
from safetensors import safe_open

from rewardfl.config import ConfigError, top_level_option
from rewardfl.fileio import write_safetensors
from rewardfl.interfaces import DeviceTarget, VideoModel

from . import architectures as arch
from .dit_forward import dit_forward, use_fp32_time_embedding
from .export import run_export
from .lora import (add_lora, adapters_disabled, check_lora_targets, diffsynth_lora_key, lora_layers,
                   lora_named_parameters)
from .lora_formats import FORMATS, expert_file, read_lora, write_lora
from .merge_loras import describe_merges, files_experts, merge_loras, merge_plan, validate_merge_loras
from .offload import move_frozen_
from .vae_decode import DecodeClamp, decode_latents, encode_video
from .weights import WeightFile, assign_roles, find_hub_files, load_state_dict, read_shapes, resolve_model_paths

__all__ = ["Wan22Model", "Wan22TinyModel", "WanCondition", "WanParts", "WanFiles", "read_model_files", "new_vae",
           "default_dtype"]

log = logging.getLogger(__name__)

EXPERT_ROLES = ("dit", "dit2")  # high noise, low noise
TRAINABLE_CHOICES = EXPERT_ROLES


def as_list(value: Union[str, Sequence[str], None]) -> list[str]:
    """``"a, b"`` or ``["a", "b"]`` -> ``["a", "b"]``."""
    if value is None:
        return []
    if isinstance(value, str):
        return [s.strip() for s in value.split(",") if s.strip()]
    return [str(s).strip() for s in value if str(s).strip()]


@dataclasses.dataclass
class WanCondition:
    """What ``encode`` returns: prompt embeddings and first-frame conditioning for B samples.

    ``context`` (B, L, text_dim); ``y`` (B, 4 + z, T, h, w) for I2V DiTs, else None;
    ``inject_mask`` (B, 1, T, h, w) 1 on latent frame 0 and ``inject_latent`` (B, z, T, h, w) for
    TI2V DiTs, else None. ``size`` is (F, H, W).
    """

    context: torch.Tensor
    y: Optional[torch.Tensor]
    inject_mask: Optional[torch.Tensor]
    inject_latent: Optional[torch.Tensor]
    size: tuple[int, int, int]


#: values of ``extra_inputs`` rewardfl feeds to models (DiffSynth-Studio's names)
EXTRA_INPUTS = ("input_image",)


def parse_extra_inputs(value: Optional[str]) -> list[str]:
    """``"input_image, end_image"`` -> ``["input_image", "end_image"]``; None -> []."""
    return [v.strip() for v in (value or "").split(",") if v.strip()]


@dataclasses.dataclass
class Wan22Options:
    """The ``model:`` section of the config for ``wan2_2``. The seed's keys (``model_paths``,
    ``lora_rank``, ...) may also be written at the top level of the YAML, as the seed recipe
    (examples/reward_fl_wan22.yaml) does."""

    #: the model plugin these options are for, as its errors name it
    MODEL: ClassVar[str] = "wan2_2"

    # --- the seed recipe's and the reference implementation's keys (also at the top level)
    #: DiffSynth-Studio's model_paths: a JSON list of weight files (or groups), or a file of one
    model_paths: Optional[str] = top_level_option(None, path=True)
    #: the umT5 tokenizer folder (empty: the one model_paths lists, else DiffSynth-Studio's default)
    tokenizer_path: Optional[str] = top_level_option(None, path=True)
    #: hub ids and file patterns instead of model_paths ("Wan-AI/Wan2.2-I2V-A14B:high_noise_model/*.safetensors,...")
    model_id_with_origin_paths: Optional[str] = top_level_option(None)
    #: the experts that train: dit (high noise), dit2 (low noise), comma-separated
    trainable_models: str = top_level_option("dit2")
    #: with gradient checkpointing, park the checkpointed inputs in host memory
    use_gradient_checkpointing_offload: bool = top_level_option(False)
    #: the inputs fed to the model besides the prompt (image-to-video: input_image); unset: what it needs
    extra_inputs: Optional[str] = top_level_option(None)
    #: the trained experts that get a LoRA (the others of trainable_models train in full); null: none
    lora_base_model: Optional[str] = top_level_option("dit2")
    #: the DiT modules that get a LoRA, comma-separated names or suffixes (q,k,v,o: attention; ffn.0, ffn.2: MLP)
    lora_target_modules: str = top_level_option("q,k,v,o,ffn.0,ffn.2")
    #: LoRA rank (> 0)
    lora_rank: int = top_level_option(32)
    #: LoRA scale alpha / rank; null: alpha = rank
    lora_alpha: Optional[float] = top_level_option(None)

    # --- rewardfl's

    #: recompute each DiT block in backward (``use_gradient_checkpointing_offload`` also parks
    #: the block inputs on the CPU)
    gradient_checkpointing: bool = True
    #: tokens per prompt (umT5: 512; shorter prompts are zero-padded, as Wan was trained)
    text_len: int = 512
    #: keep only the running expert's frozen weights on the GPU: "auto" (when both experts do not fit
    #: in half the GPU), yes/true or no/false. Trainable weights (LoRA, a fully trained expert) never
    #: move, so DeepSpeed ZeRO's views into them stay valid.
    offload_idle_expert: Literal["auto", "yes", "no", True, False] = "auto"
    #: move the text encoder to the CPU once the prompts are encoded (CUDA only)
    offload_text_encoder: bool = True
    #: recompute the VAE decoder per latent frame in backward when decoding with gradient (with
    #: ``use_gradient_checkpointing_offload`` its carried caches also wait in host memory)
    vae_checkpointing: bool = True
    #: spatial VAE decode tile and stride in latent pixels, e.g. [34, 34] / [18, 16]; null: whole frame
    vae_tile: Optional[list] = None
    vae_tile_stride: Optional[list] = None
    #: clamp of the decoded pixels to [-1, 1] (``vae_decode.clamp_decoded``): "straight_through"
    #: (clamped values, gradient passed unchanged), "hard" (the true derivative: zero gradient
    #: outside [-1, 1]) or "none" (no clamp)
    decode_clamp: DecodeClamp = "straight_through"
    #: the low-noise expert (dit2) runs while timestep < boundary * 1000, the high-noise one (dit)
    #: above: Wan2.2 I2V-A14B 0.9, T2V-A14B 0.875 (ignored by single-expert TI2V-5B)
    boundary: float = 0.9
    #: key layout of the exported LoRA files (``save_trainable``, OUTPUT_DIR/final): "comfyui"
    #: (``diffusion_model.<module>.lora_A/B.weight`` + ``.alpha``: loads in ComfyUI, diffusers'
    #: WanPipeline.load_lora_weights and DiffSynth-Studio), "diffsynth" (``<module>.lora_A/B.weight``,
    #: scale in B) or "diffusers" (``transformer.blocks.N.attn1.to_q.lora_A/B.weight``); see lora_formats.py
    lora_format: Literal["comfyui", "diffsynth", "diffusers"] = "comfyui"
    #: LoRA files merged into the frozen experts at load, before the trainable LoRA is added (e.g.
    #: the distilled few-step pair): [{path, strength, expert}]; see merge_loras.py
    merge_loras: Optional[list] = None

    def __post_init__(self):  # checked where the config enters (run --check too), before any weights load
        inputs = parse_extra_inputs(self.extra_inputs)
        unsupported = [i for i in inputs if i not in EXTRA_INPUTS]
        missing = [i for i in EXTRA_INPUTS if i not in inputs]  # every Wan model here is image-to-video
        for bad, message in (
                (not self.trainable_models.strip(), "trainable_models: must name at least one model (e.g. dit2)"),
                (self.lora_rank <= 0, f"lora_rank: must be > 0, got {self.lora_rank}"),
                (not self.lora_target_modules.strip() and self.lora_base_model is not None,
                 "lora_target_modules: empty; list module names such as q,k,v,o,ffn.0,ffn.2 or set "
                 "lora_base_model: null"),
                (unsupported, f"extra_inputs: {', '.join(unsupported)} not supported; rewardfl supports "
                              f"{', '.join(EXTRA_INPUTS)} (the first frame of each clip conditions generation)"),
                (self.extra_inputs is not None and missing,  # unset means "what the model needs"
                 f"extra_inputs: {self.MODEL} is an image-to-video model and needs {', '.join(missing)}; "
                 f"set extra_inputs: {', '.join(inputs + missing)}")):
            if bad:
                raise ConfigError(message)
        validate_merge_loras(self.merge_loras)
        if self.text_len <= 0:
            raise ConfigError(f"model.text_len: must be > 0, got {self.text_len}")
        for key in ("vae_tile", "vae_tile_stride"):
            v = getattr(self, key)
            if v is not None and (len(v) != 2 or any(not isinstance(i, int) or i <= 0 for i in v)):
                raise ConfigError(f"model.{key}: expected [height, width] in latent pixels, got {v!r}")
        if not 0.0 <= self.boundary <= 1.0:
            raise ConfigError(f"model.boundary: must be in [0, 1] (a fraction of 1000 timesteps), got {self.boundary}")


@dataclasses.dataclass
class WanParts:
    """The networks of a Wan model before training is set up: what ``Wan22Model.__init__`` is made
    from, whether loaded from files, random (``with_random_weights``) or fake (the memory planner).

    ``dits``: expert role -> DiT, high noise first; ``vae_stride``: (time, height, width) of the VAE
    (:func:`architectures.vae_stride`); no ``text_encoder``/``tokenizer``: the caller encodes prompts.
    """

    arch: arch.DiTArch
    dits: dict[str, torch.nn.Module]
    vae: torch.nn.Module
    vae_stride: tuple[int, int, int]
    text_encoder: Optional[torch.nn.Module] = None
    tokenizer: object = None


@dataclasses.dataclass
class WanFiles:
    """The weight files ``model_paths`` names and the architectures their headers give (no weight
    read): ``roles`` role -> file; ``dit`` and its ``experts`` (high noise first); ``vae``
    (``architectures.vae_architecture``) and ``text_encoder`` (``WanTextEncoder`` kwargs)."""

    roles: dict[str, WeightFile]
    dit: arch.DiTArch
    experts: tuple[str, ...]
    vae: dict
    text_encoder: dict


def read_model_files(config, options: Wan22Options, *, allow_download: bool = False) -> WanFiles:
    """The files of ``model_paths`` / ``model_id_with_origin_paths`` and what they hold, from their
    headers, checked to fit together (two experts of one architecture, the VAE's latent channels and
    the text encoder's width as the DiT expects): what the model loads, and what the planner plans."""
    files = resolve_model_paths(config.resolve_path(options.model_paths), options.model_id_with_origin_paths,
                                config.resolve_path("."), allow_download=allow_download)
    roles = assign_roles(files)
    shapes = {role: read_shapes(wf) if role != "tokenizer" else None for role, wf in roles.items()}
    dit_shapes = {r: {k2: v for k, v in shapes[r].items() if (k2 := arch.dit_key(k)) is not None}
                  for r in roles if r in EXPERT_ROLES}
    archs = {r: arch.dit_architecture(s, roles[r].where) for r, s in dit_shapes.items()}
    experts = tuple(r for r in EXPERT_ROLES if r in archs)
    first = archs[experts[0]]
    for r in experts[1:]:
        if archs[r].kwargs != first.kwargs:
            raise ValueError(f"model_paths: the two DiTs differ ({roles['dit'].where} is {archs['dit'].name}, "
                             f"{roles[r].where} is {archs[r].name}); both experts must be the same architecture")
    vae_arch = arch.vae_architecture({arch.vae_key(k): v for k, v in shapes["vae"].items()}, roles["vae"].where)
    if vae_arch["z_dim"] != first.z_dim:
        raise ValueError(f"model_paths: the VAE ({roles['vae'].where}) has {vae_arch['z_dim']} latent channels, "
                         f"the DiT expects {first.z_dim}")
    te_arch = arch.text_encoder_architecture(shapes["text_encoder"], roles["text_encoder"].where)
    if te_arch["dim"] != first.kwargs["text_dim"]:
        raise ValueError(f"model_paths: the text encoder ({roles['text_encoder'].where}) is {te_arch['dim']}-d, "
                         f"the DiT expects {first.kwargs['text_dim']}-d prompt embeddings")
    return WanFiles(roles, first, experts, vae_arch, te_arch)


def new_vae(vae_arch: dict) -> torch.nn.Module:
    """diffsynth's VAE for ``vae_arch`` (``architectures.vae_architecture``), its weights as the
    surrounding context makes them (skipped, random, fake)."""
    from diffsynth.models.wan_video_vae import VideoVAE_, WanVideoVAE, WanVideoVAE38

    if vae_arch["kind"] == "wan2.2":
        return WanVideoVAE38()
    vae = WanVideoVAE(z_dim=vae_arch["z_dim"])
    if vae_arch["dim"] != 96:
        vae.model = VideoVAE_(dim=vae_arch["dim"], z_dim=vae_arch["z_dim"])
    return vae


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Modules built inside are born in ``dtype`` (no fp32 copy that loading never makes)."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


class Wan22Model(VideoModel):
    """Wan2.2 I2V-A14B (two experts) / TI2V-5B (one) with LoRA or full fine-tuning of chosen experts.

    Built as ``Wan22Model(config, options, device=torch.device)``; ``options`` hold ``model_paths``,
    ``tokenizer_path``, ``trainable_models``, ``lora_*``, ``use_gradient_checkpointing_offload``, ...;
    ``config`` is the TrainConfig (``mixed_precision``, ``allow_download``). Every way of making one (the
    files, :meth:`with_random_weights`, the memory planner's fake weights) goes through ``__init__``.
    """

    #: the expert roles a set of weight files can fill (high noise, low noise); an instance keeps the
    #: ones it loaded (one for TI2V-5B). `run --check` plans the gradient window with these.
    experts = EXPERT_ROLES

    Options = Wan22Options

    #: the tokenizer when ``tokenizer_path`` is empty and model_paths lists none: DiffSynth-Studio's
    #: default for the Wan pipelines (``WanVideoPipeline.from_pretrained``'s ``tokenizer_config``)
    DEFAULT_TOKENIZER = ("Wan-AI/Wan2.1-T2V-1.3B", "google/umt5-xxl/")

    @classmethod
    def expert_boundary(cls, options, config=None) -> float:
        return options.boundary

    @classmethod
    def check(cls, config, options) -> list[str]:
        """``run --check``: where each weights file and the tokenizer are (a path, a local folder or
        cache, or what ``allow_download`` would download), without reading or downloading them."""
        o = options if options is not None else cls.Options()
        files = resolve_model_paths(config.resolve_path(o.model_paths), o.model_id_with_origin_paths,
                                    config.resolve_path("."), allow_download=config.allow_download, dry_run=True)
        lines = [wf.describe() for wf in files if wf.role != "tokenizer"]
        listed = next((wf for wf in files if wf.role == "tokenizer"), None)
        path, source = cls._tokenizer_dir(config, o, listed, dry_run=True)
        lines.append(f"tokenizer: {source}" + (f"; {path}" if path else ""))
        merges = options.merge_loras if options is not None else []  # no options: the defaults, nothing to merge
        return lines + describe_merges(merge_plan(config, merges, files_experts(files, cls.experts)))

    @classmethod
    def planned_experts(cls, config, options) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The experts the weight files hold (one for TI2V-5B or a model_paths without a low-noise
        model; headers only, both while a file is still to be downloaded) and the ones
        ``trainable_models`` trains among them (checked as the constructor checks them)."""
        o = options if options is not None else cls.Options()
        files = resolve_model_paths(config.resolve_path(o.model_paths), o.model_id_with_origin_paths,
                                    config.resolve_path("."), allow_download=config.allow_download, dry_run=True)
        experts = files_experts(files, cls.experts)
        lora, full = cls.plan_training(o, experts)
        return experts, tuple(r for r in experts if r in lora or r in full)

    def __init__(self, config, options: Optional[Wan22Options] = None, *, device=None,
                 parts: Optional[WanParts] = None, target: Optional[DeviceTarget] = None, **runtime):
        """The one way a Wan model is made: its networks (``parts``, by default read from the files
        ``model_paths`` names, see :meth:`_load_parts`), then what trains and where each module
        lives (:meth:`_setup`). ``parts`` built elsewhere: random weights (:meth:`with_random_weights`)
        or fake ones (the memory planner, which also gives the ``target`` it plans for)."""
        self.config, self.options = config, options or self.Options()
        self.device = torch.device(device if device is not None else "cpu")
        self.target = target or DeviceTarget(self.device.type)
        self.dtype = self.choose_dtype(config.mixed_precision, self.target.type)
        if parts is None:
            parts = self._load_parts()
        self.arch, self.vae_stride, self.tokenizer = parts.arch, parts.vae_stride, parts.tokenizer
        self.experts = tuple(parts.dits)
        self.dits: dict[str, torch.nn.Module] = dict(parts.dits)
        self.text_encoder, self.vae = parts.text_encoder, parts.vae
        self._setup(*self.plan_training(self.options, self.experts), as_list(self.options.lora_target_modules))

    def _load_parts(self) -> WanParts:
        """The networks of the files ``model_paths`` names, in ``self.dtype``: headers first (cheap:
        every user error surfaces before a weight is read), then the weights."""
        config, options = self.config, self.options
        found = read_model_files(config, options, allow_download=config.allow_download)
        roles, first = found.roles, found.dit
        self._check_training(options, found.experts, first)
        tokenizer_dir, _ = self._tokenizer_dir(config, options, roles.get("tokenizer"))

        from diffsynth.models.wan_video_dit import WanModel
        from diffsynth.models.wan_video_text_encoder import WanTextEncoder

        tokenizer = self._load_tokenizer(tokenizer_dir)
        dits = {r: self._build(WanModel, first.kwargs, roles[r], arch.dit_key) for r in found.experts}
        text_encoder = self._build(WanTextEncoder, found.text_encoder, roles["text_encoder"], lambda k: k).eval()
        vae = self._build_vae(found.vae, roles["vae"])
        return WanParts(first, dits, vae, arch.vae_stride(found.vae), text_encoder, tokenizer)

    @classmethod
    def _check_training(cls, options: Wan22Options, experts: tuple[str, ...], dit: arch.DiTArch) -> None:
        """``trainable_models``/``lora_base_model`` against ``experts`` and ``lora_target_modules``
        against the DiT's module names (a weightless one), before any weight is read."""
        lora_experts, _ = cls.plan_training(options, experts)
        if lora_experts:
            from diffsynth.models.wan_video_dit import WanModel

            with torch.device("meta"):  # the module names, no weights allocated
                check_lora_targets(WanModel(**dit.kwargs), as_list(options.lora_target_modules))

    def _setup(self, lora_experts: list[str], full_experts: list[str], targets: list[str]) -> None:
        """What trains (LoRA or full, frozen copies) and where each module lives."""
        config, options = self.config, self.options
        # distilled/style LoRAs become part of the frozen base: before the trainable LoRA and frozen copies
        for line in merge_loras(self.dits, merge_plan(config, options.merge_loras, self.experts),
                                wan_name=self._wan_name):
            log.info("model.merge_loras: %s", line)
        for dit in self.dits.values():  # before LoRA, copies and DeepSpeed: they keep the layer class
            self._prepare_dit(dit)
        self.lora_experts, self.full_experts = lora_experts, full_experts
        self.lora_scale = self.lora_alpha = None
        if lora_experts:
            alpha = float(options.lora_alpha) if options.lora_alpha is not None else float(options.lora_rank)
            self.lora_alpha = alpha
            self.lora_scale = alpha / options.lora_rank
            for r in lora_experts:
                add_lora(self.dits[r], self._lora_targets(self.dits[r], targets), options.lora_rank, alpha)
        #: fully trained expert -> its frozen copy (the regulariser's base velocity)
        self.frozen_copies: dict[str, torch.nn.Module] = {}
        for r in full_experts:
            self.dits[r].requires_grad_(True)
            log.warning("trainable_models: full fine-tuning of %s keeps a frozen copy for the regulariser's "
                        "reference velocity (twice the expert's memory); LoRA (lora_base_model) needs none", r)
            self.frozen_copies[r] = copy.deepcopy(self.dits[r]).requires_grad_(False).eval()
        self._enable_checkpointing()

        self.offload_experts = self._want_expert_offload(options.offload_idle_expert)
        for r in self.experts:
            for module in (self.dits[r], self.frozen_copies.get(r)):
                if module is None:
                    continue
                if not self.offload_experts:
                    module.to(self.device)
                    continue
                # offloading: trainable weights live on the device for good (moved here, before any
                # optimizer holds them); _place moves only the frozen ones
                for p in module.parameters():
                    if p.requires_grad:
                        p.data = p.data.to(self.device)
        if self.offload_experts:
            self._place(self.experts[0])
        self.vae.to(self.device)
        if self.text_encoder is not None:
            self.text_encoder.to(self.device if not self._offload_text else "cpu")
        self._prompt_cache: dict[str, torch.Tensor] = {}
        self.training = True
        self.train(True)

    # hooks a DiT of another layout (wan2_2_diffusers) overrides; the rest of the model is shared

    def _prepare_dit(self, dit) -> None:
        """Before LoRA and copies: the time embedding computes in fp32 (as official Wan does)."""
        use_fp32_time_embedding(dit)

    def _lora_targets(self, dit, targets: list[str]) -> list[str]:
        """The module names LoRA goes on, for ``lora_target_modules`` (Wan names)."""
        return targets

    def _enable_checkpointing(self) -> None:
        """Gradient checkpointing that lives in the module (this layout checkpoints in ``dit_forward``)."""

    def _velocity(self, dit, x: torch.Tensor, timestep: torch.Tensor, cond) -> torch.Tensor:
        """One DiT forward: the velocity at ``x`` (on the device) and ``timestep`` ``(B,)``."""
        clean_first = self.arch.conditioning == "ti2v" and bool(self.arch.kwargs.get("seperated_timestep"))
        return dit_forward(dit, x, timestep, cond.context, cond.y, clean_first_frame=clean_first,
                           checkpoint=self._checkpoint_mode)

    def _checkpoint_key(self, name: str) -> str:
        """A ``trainable_parameters`` name (``<expert>.<module>...``) as checkpoints and exports key it."""
        return diffsynth_lora_key(name)

    def _wan_name(self, name: str) -> str:
        """A DiT module/parameter name in the Wan layout the export files use."""
        return name

    @classmethod
    def with_random_weights(cls, config, options=None, *, dit: str, experts: Sequence[str] = EXPERT_ROLES,
                            vae_dim: int = 96, device=None, seed: int = 0) -> "Wan22Model":
        """A model of a known architecture with random weights and no files, for benchmarks.

        ``dit`` names a known DiT (a key of ``architectures.TINY_DITS`` or a diffsynth model hash,
        e.g. ``5b013604280dd715f8457c6ed6d6a626`` = Wan2.2-I2V-A14B); the weights are built
        directly on ``device`` in the model dtype. There is no text encoder: build ``WanCondition``
        yourself (``context`` (B, L, text_dim)).
        """
        from diffsynth.models.wan_video_dit import WanModel
        from diffsynth.core.vram.initialization import skip_model_initialization
        from diffsynth.models.wan_video_vae import VideoVAE_, WanVideoVAE

        device = torch.device(device if device is not None else "cpu")
        known = dict(arch.known_dits())
        key = dit if dit in known else f"diffsynth:{dit}"
        if key not in known:
            raise ValueError(f"with_random_weights: unknown DiT '{dit}'")
        kw = dict(known[key], patch_size=tuple(known[key]["patch_size"]))
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in WanModel(**kw).state_dict().items()}
        dit_arch = arch.dit_architecture(shapes, dit)
        with skip_model_initialization():  # the wrapper: fp32 latent statistics, no weights of its own
            vae = WanVideoVAE(z_dim=dit_arch.z_dim)
        # weights born in the model dtype, on the device (the constructor parks the idle ones when memory is short)
        with default_dtype(cls.choose_dtype(config.mixed_precision, device.type)), \
                torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.device(device):
            torch.manual_seed(seed)
            dits = {r: WanModel(**dit_arch.kwargs).requires_grad_(False) for r in experts}
            vae.model = VideoVAE_(dim=vae_dim, z_dim=dit_arch.z_dim)
        parts = WanParts(dit_arch, dits, vae.requires_grad_(False).eval(), arch.vae_stride({"kind": "wan2.1"}))
        return cls(config, options, device=device, parts=parts)

    # ------------------------------------------------------------------ construction helpers

    @staticmethod
    def choose_dtype(mixed_precision: str, device_type: str) -> torch.dtype:
        """The weights' and latents' dtype for ``mixed_precision`` on a ``device_type`` ("cuda", "cpu")."""
        if mixed_precision in ("no", "fp32"):
            return torch.float32
        if mixed_precision == "fp16":
            raise ValueError("mixed_precision: fp16 is not supported by the Wan models (overflows); use bf16 or auto")
        if mixed_precision == "bf16":
            return torch.bfloat16
        return torch.bfloat16 if device_type == "cuda" else torch.float32

    @staticmethod
    def plan_training(options: Wan22Options, experts: tuple[str, ...]) -> tuple[list[str], list[str]]:
        """(LoRA experts, fully trained experts) among ``experts`` by ``trainable_models`` and
        ``lora_base_model``; ValueError naming the key for an expert that cannot train."""
        trainable = as_list(options.trainable_models)
        for name in trainable:
            if name not in TRAINABLE_CHOICES:
                raise ValueError(f"trainable_models: '{name}' cannot be trained; choose among the experts "
                                 f"{', '.join(experts)} (dit = high noise, dit2 = low noise)")
            if name not in experts:
                raise ValueError(f"trainable_models: '{name}' does not exist in these model_paths (its experts: "
                                 f"{', '.join(experts)})")
        lora = as_list(options.lora_base_model)
        for name in lora:
            if name not in trainable:
                raise ValueError(f"lora_base_model: '{name}' is not in trainable_models ({options.trainable_models}); "
                                 "add it there or set lora_base_model to a trained expert")
        return [r for r in experts if r in lora], [r for r in experts if r in trainable and r not in lora]

    @classmethod
    def _tokenizer_dir(cls, config, options: Wan22Options, listed: Optional[WeightFile], *,
                       dry_run: bool = False) -> tuple[Optional[str], str]:
        """The tokenizer folder and how it was found: ``tokenizer_path``, else the model_paths entry
        (``listed``), else :attr:`DEFAULT_TOKENIZER` in the local caches (downloaded with
        ``allow_download``; in a ``dry_run`` the folder is None when it would be)."""
        if options.tokenizer_path:
            path, where, source = config.resolve_path(options.tokenizer_path), "tokenizer_path", "tokenizer_path"
        elif listed is not None:
            path, where, source = listed.files[0], listed.where, listed.source or listed.where
        else:
            model_id, pattern = cls.DEFAULT_TOKENIZER
            hub = find_hub_files(model_id, pattern, where="tokenizer_path: not set",
                                 config_dir=config.resolve_path("."), allow_download=config.allow_download,
                                 dry_run=dry_run)
            if not hub.files:
                return None, hub.label
            path, where, source = hub.files[0], f"tokenizer_path (not set: {model_id}:{pattern})", hub.label
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{where}: tokenizer folder not found: {path}")
        return path, source

    def _load_tokenizer(self, path: str):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:  # transformers raises OSError/ValueError/... for a broken folder
            raise ValueError(f"tokenizer_path: cannot load a tokenizer from {path}: {e}") from e

    def _build(self, cls, kwargs: dict, wf: WeightFile, rename) -> torch.nn.Module:
        from diffsynth.core.vram.initialization import skip_model_initialization

        with skip_model_initialization():
            module = cls(**kwargs)
        state = load_state_dict(wf, self.dtype, rename)
        try:
            module.load_state_dict(state, assign=True, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{wf.where}: weights do not fit {cls.__name__}({kwargs}): {e}") from e
        return module.to(self.dtype).requires_grad_(False)

    def _build_vae(self, vae_arch: dict, wf: WeightFile) -> torch.nn.Module:
        from diffsynth.core.vram.initialization import skip_model_initialization

        with skip_model_initialization():
            vae = new_vae(vae_arch)
        state = load_state_dict(wf, self.dtype, arch.vae_key)
        try:
            vae.model.load_state_dict(state, assign=True, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{wf.where}: VAE weights do not fit the {vae_arch['kind']} VAE: {e}") from e
        return vae.to(self.dtype).requires_grad_(False).eval()

    def _want_expert_offload(self, choice) -> bool:
        if choice != "auto":  # YAML reads yes/no as true/false
            return choice in (True, "yes")
        if self.target.type != "cuda" or len(self.experts) < 2:
            return False
        expert_bytes = sum(p.numel() * p.element_size() for d in self.dits.values() for p in d.parameters())
        total = self.target.total_memory
        if total is None:
            total = torch.cuda.get_device_properties(self.device).total_memory
        return expert_bytes > 0.5 * total

    @property
    def _offload_text(self) -> bool:
        return self.options.offload_text_encoder and self.target.type == "cuda"

    @property
    def _checkpoint_mode(self) -> str:
        if self.options.use_gradient_checkpointing_offload:
            return "offload"
        return "block" if self.options.gradient_checkpointing else "none"

    # ------------------------------------------------------------------ VideoModel interface

    def trainable_experts(self) -> tuple[str, ...]:
        return tuple(r for r in self.experts if r in self.lora_experts or r in self.full_experts)

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        st, sh, sw = self.vae_stride
        mult_h, mult_w = sh * self.arch.kwargs["patch_size"][1], sw * self.arch.kwargs["patch_size"][2]
        if (num_frames - 1) % st or height % mult_h or width % mult_w or min(num_frames, height, width) <= 0:
            raise ValueError(f"data: video size {num_frames}x{height}x{width} (frames x H x W) needs frames = 4k+1 "
                             f"and H, W multiples of {mult_h}")
        return (self.arch.z_dim, (num_frames - 1) // st + 1, height // sh, width // sw)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, text_len, text_dim) umT5 embeddings (zero past each prompt's length), cached per prompt.

        The cache lives in host memory; the text encoder goes back to the CPU after use on CUDA
        (``offload_text_encoder``), so after the first epoch it never runs again.
        """
        missing = sorted({p for p in prompts if p not in self._prompt_cache})
        if missing and self.text_encoder is None:
            raise ValueError("encode: this model has no text encoder (built by with_random_weights)")
        if missing:
            from diffsynth.models.wan_video_text_encoder import basic_clean, whitespace_clean

            # Wan's preprocessing (diffsynth's HuggingfaceTokenizer with clean="whitespace")
            texts = [whitespace_clean(basic_clean(p)) for p in missing]
            tok = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.options.text_len,
                                 return_tensors="pt", add_special_tokens=True)
            self._encode_tokens(missing, tok.input_ids, tok.attention_mask, tok.attention_mask.gt(0).sum(dim=1))
        return torch.cat([self._prompt_cache[p] for p in prompts], dim=0).to(self.device)

    @torch.no_grad()
    def plan_prompts(self, prompts: Sequence[str]) -> None:
        """For the memory planner: the prompt cache filled as :meth:`encode_prompts` fills it, from
        token ids of the full ``text_len`` (the memory depends on the length, not on the tokens, so
        no tokenizer is needed and fake tensors do)."""
        ids = torch.zeros(len(prompts), self.options.text_len, dtype=torch.long, device=self.device)
        self._encode_tokens(prompts, ids, torch.ones_like(ids))

    def _encode_tokens(self, prompts: Sequence[str], ids: torch.Tensor, mask: torch.Tensor,
                       lengths: Optional[torch.Tensor] = None) -> None:
        """The text encoder on ``ids``/``mask`` (B, text_len); each prompt's embedding cached in host
        memory (4 MB per prompt at 512x4096), zero past its length when ``lengths`` are given. The
        encoder comes to the device for it and goes back to the CPU after (``offload_text_encoder``)."""
        self.text_encoder.to(self.device)
        emb = self.text_encoder(ids.to(self.device), mask.to(self.device))
        for i, p in enumerate(prompts):
            e = emb[i:i + 1].clone()
            if lengths is not None:
                e[:, int(lengths[i]):] = 0
            self._prompt_cache[p] = e.to("cpu", self.dtype)
        del emb
        if self._offload_text:
            self.text_encoder.to("cpu")

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], first_frames: torch.Tensor, num_frames: int) -> WanCondition:
        if first_frames.dim() != 4 or first_frames.shape[1] != 3 or first_frames.shape[0] != len(prompts):
            raise ValueError(f"encode: first_frames must be (B, 3, H, W) with B = {len(prompts)} prompts, got "
                             f"{tuple(first_frames.shape)}")
        B, _, H, W = first_frames.shape
        C, T, h, w = self.latent_shape(num_frames, H, W)
        context = self.encode_prompts(list(prompts))
        frames = first_frames.to(self.device, torch.float32).clamp(-1, 1)
        y = inject_mask = inject_latent = None
        if self.arch.conditioning == "i2v":
            # Wan2.2-I2V-A14B: VAE latent of [first frame, zeros...], 4-channel mask (1 on frame 0)
            video = torch.zeros(B, 3, num_frames, H, W, device=self.device)
            video[:, :, 0] = frames
            latent = encode_video(self.vae, video)
            mask = torch.zeros(B, 4, T, h, w, device=self.device)
            mask[:, :, 0] = 1
            y = torch.cat([mask, latent], dim=1).to(self.dtype)
        elif self.arch.conditioning == "ti2v":
            z0 = encode_video(self.vae, frames[:, :, None])
            inject_latent = torch.zeros(B, C, T, h, w, device=self.device)
            inject_latent[:, :, :1] = z0
            inject_mask = torch.zeros(B, 1, T, h, w, device=self.device)
            inject_mask[:, :, 0] = 1
        return WanCondition(context, y, inject_mask, inject_latent, (num_frames, H, W))

    def injection(self, cond: WanCondition):
        if cond.inject_mask is None:
            return None
        return cond.inject_mask, cond.inject_latent

    def _place(self, expert: str) -> None:
        """With ``offload_idle_expert``: ``expert``'s frozen weights on the device, the others' on the CPU.

        Only frozen weights move (``offload.move_frozen_``): an optimizer holds the trainable ones,
        and DeepSpeed ZeRO-1/2 makes them views into its flat buffers, a link that ``Module.to``
        (which rebinds ``param.data``) would cut. Checked on every call, at the cost of a device
        comparison per parameter when nothing moves, so that whatever else placed a module
        (DeepSpeed moves the whole trained expert to the device at start) is put right.
        """
        if not self.offload_experts:
            return
        for r in self.experts:
            target = self.device if r == expert else torch.device("cpu")
            move_frozen_(self.dits[r], target)
            if r in self.frozen_copies:
                move_frozen_(self.frozen_copies[r], target)

    def denoise(self, expert: str, x: torch.Tensor, timestep: torch.Tensor, cond: WanCondition, *,
                base: bool = False) -> torch.Tensor:
        if expert not in self.dits:
            raise ValueError(f"denoise: unknown expert '{expert}'; this model has {self.experts}")
        self._place(expert)
        timestep = timestep.to(self.device, torch.float32).reshape(-1)
        if timestep.numel() == 1 and x.shape[0] > 1:
            timestep = timestep.expand(x.shape[0])
        x_in = x.to(self.device)
        if base:
            with torch.no_grad():
                if expert in self.lora_experts:
                    with adapters_disabled(self.dits[expert]):
                        v = self._velocity(self.dits[expert], x_in, timestep, cond)
                else:
                    v = self._velocity(self.frozen_copies.get(expert, self.dits[expert]), x_in, timestep, cond)
        else:
            v = self._velocity(self.dits[expert], x_in, timestep, cond)
        return v.to(x.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        o = self.options
        checkpoint = o.vae_checkpointing and ("offload" if self.options.use_gradient_checkpointing_offload else True)
        return decode_latents(self.vae, latents.to(self.device), checkpoint=checkpoint,
                              tile=tuple(o.vae_tile) if o.vae_tile else None,
                              tile_stride=tuple(o.vae_tile_stride) if o.vae_tile_stride else None,
                              clamp=o.decode_clamp)

    def trainable_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        for r in self.lora_experts:
            for name, p in lora_named_parameters(self.dits[r]):
                yield f"{r}.{name}", p
        for r in self.full_experts:
            for name, p in self.dits[r].named_parameters():
                yield f"{r}.{name}", p

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """``{"<expert>.<diffsynth LoRA key or parameter name>": tensor}``, detached, as trained (B unscaled)."""
        return {self._checkpoint_key(n): p.detach() for n, p in self.trainable_parameters()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = {self._checkpoint_key(n): p for n, p in self.trainable_parameters()}
        missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        if missing or unexpected:
            raise ValueError(f"load_trainable_state_dict: keys do not match this model's trainable weights "
                             f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected "
                             f"{unexpected[:3]}{'...' if len(unexpected) > 3 else ''}); was it saved with the same "
                             "trainable_models / lora_base_model / lora_target_modules / lora_rank?")
        with torch.no_grad():
            for k, p in params.items():
                if tuple(state[k].shape) != tuple(p.shape):
                    raise ValueError(f"load_trainable_state_dict: {k} is {tuple(state[k].shape)}, model has "
                                     f"{tuple(p.shape)}")
                p.copy_(state[k].to(p.device, p.dtype))

    def save_trainable(self, path: str, lora_format: Optional[str] = None) -> list[str]:
        """Write each trained expert's weights as safetensors; returns the files written.

        LoRA experts: a LoRA file in ``lora_format`` (default ``model.lora_format``; the layouts are
        in ``lora_formats.py``), metadata ``expert``, ``lora_rank``, ``lora_alpha``, ``format``.
        Full fine-tuning: the expert's whole state dict (``format: wan-dit``). A one-expert model
        (TI2V-5B) writes ``path``; a two-expert model (A14B) names the expert in each file:
        ``<stem>_high_noise.safetensors`` (dit) and/or ``<stem>_low_noise.safetensors`` (dit2), one
        file per trained expert, the names ComfyUI's and diffusers' Wan2.2 loaders take.
        """
        fmt = lora_format or self.options.lora_format
        if fmt not in FORMATS:
            raise ValueError(f"model.lora_format: '{fmt}' is not one of {', '.join(FORMATS)}")
        experts = self.trainable_experts()
        out = []
        for r in experts:
            target = expert_file(path, r, self.experts)
            os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
            if r in self.lora_experts:
                layers = {self._wan_name(k): v for k, v in lora_layers(self.dits[r], self.lora_alpha).items()}
                state = write_lora(layers, fmt)
                meta = {"format": f"{fmt}-lora", "expert": r, "lora_rank": str(self.options.lora_rank),
                        "lora_alpha": str(self.lora_alpha), "lora_target_modules": self.options.lora_target_modules}
            else:
                state = {self._wan_name(k): v.detach().cpu().contiguous() for k, v in self.dits[r].state_dict().items()}
                meta = {"format": "wan-dit", "expert": r}
            write_safetensors(target, state, {**meta, **self._boundary_metadata()})
            out.append(target)
        return out

    def _boundary_metadata(self) -> dict[str, str]:
        """``expert_boundary`` of the exported files: the timestep fraction below which the low-noise
        expert ran while these weights trained (loaders default to other values: DiffSynth's pipeline
        0.875, the I2V-A14B model card 0.9); none for a one-expert model."""
        if len(self.experts) < 2:
            return {}
        return {"expert_boundary": repr(float(type(self).expert_boundary(self.options, self.config)))}

    def _check_boundary(self, meta: dict, path: str) -> None:
        """A warning when an exported file was trained with another expert boundary than this model samples with."""
        mine = self._boundary_metadata().get("expert_boundary")
        theirs = meta.get("expert_boundary")
        if mine is not None and theirs is not None and float(theirs) != float(mine):
            log.warning("%s was trained with the experts switching at timestep %g x 1000 (its metadata "
                        "expert_boundary), this config samples with %g; set model.boundary: %s to sample as it trained",
                        path, float(theirs), float(mine), theirs)

    def read_exported(self, files: Sequence[str]) -> dict[str, torch.Tensor]:
        """``save_trainable``'s files (LoRA in any layout, or a fully fine-tuned expert; each names its
        ``expert`` in its metadata) in :meth:`trainable_state_dict` keys. LoRA B as trained: the
        file's scale divided by this model's ``lora_alpha / lora_rank``, so that the model then adds
        what the file's loaders add."""
        state: dict[str, torch.Tensor] = {}
        for path in files:
            with safe_open(path, "pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            self._check_boundary(meta, path)
            expert = meta.get("expert")
            if expert in self.full_experts and meta.get("format") == "wan-dit":  # a fully fine-tuned expert
                state.update({f"{expert}.{k}": v for k, v in tensors.items()})
                continue
            if expert not in self.lora_experts:
                raise ValueError(f"{path}: its metadata names expert {expert!r}, this model trains LoRA on "
                                 f"{list(self.lora_experts)} (lora_base_model); give a LoRA file rewardfl exported")
            _, layers = read_lora(tensors, path)
            for module, layer in layers.items():
                state[f"{expert}.{module}.lora_A.weight"] = layer.down
                up = layer.up
                if layer.scale != self.lora_scale:
                    up = (up.float() * layer.scale / self.lora_scale).to(up.dtype)
                state[f"{expert}.{module}.lora_B.weight"] = up
        return state

    @classmethod
    def export_main(cls, argv=None, prog: str = "python -m rewardfl.export") -> int:
        """``python -m rewardfl.export`` for this model: convert LoRA formats or merge (``export.py``)."""
        return run_export(argv, prog)

    def train(self, mode: bool = True) -> "Wan22Model":
        self.training = mode
        for r, dit in self.dits.items():
            dit.train(mode and r in self.trainable_experts())
        if self.text_encoder is not None:
            self.text_encoder.eval()
        self.vae.eval()
        return self


@dataclasses.dataclass
class Wan22TinyOptions(Wan22Options):
    """``wan2_2_tiny``: the same options, with defaults sized for the CPU."""

    MODEL: ClassVar[str] = "wan2_2_tiny"
    text_len: int = 128  # byte-level tokens: about 127 characters of prompt
    vae_checkpointing: bool = False


class Wan22TinyModel(Wan22Model):
    """The tiny twin: same code path, weights written by ``python -m rewardfl.demo.make_tiny OUT_DIR``.

    Its DiT (dim 64, 2 layers, 2 heads, ffn 128, text dim 32) takes the same 36-channel I2V input
    as Wan2.2-I2V-A14B (16 noisy latent + 4 mask + 16 first-frame latent); its VAE is the Wan2.1
    VAE with base width 8 (stride 4x8x8, 16 latent channels); its tokenizer is byte-level.
    """

    Options = Wan22TinyOptions
