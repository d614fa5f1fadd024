"""What ``rewardfl.plan`` knows of the plugins it plans: the ``wan2_2`` model family (its
architecture from presets or weight-file headers, its skeleton with fake weights built through the
plugin's own setup code) and the ``face_identity`` reward (its memory-relevant parts).

A :class:`ModelSpec` holds the architecture of every part of a Wan2.2 checkpoint set: the DiT
(``architectures.DiTArch``) and its experts, the umT5 text encoder, the VAE. It comes from
the files ``model_paths`` names (safetensors headers: names and shapes only, as ``wan2_2`` reads
them before loading) or, before anything is downloaded, from a preset (:data:`PRESETS`).

:func:`build_skeleton` builds the ``wan2_2`` model from a spec inside the planner's fake-tensor
mode: its networks are constructed with fake weights (no memory) and handed to the model's own
constructor (``parts``), which adds LoRA, makes frozen copies and places every module as it would
on the target device (``target``: the device and its memory, which the plugin's rules consult).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import os
from typing import Optional

import torch
from torch.utils._python_dispatch import _disable_current_modes

from rewardfl.interfaces import DeviceTarget
from rewardfl.models.wan import architectures as arch
from rewardfl.models.wan.model import WanParts, default_dtype, new_vae, read_model_files
from rewardfl.ops import align
from rewardfl.rewards.face_identity import FaceIdentityReward
from rewardfl.rewards.face_identity.scoring import pooled_identity_score


__all__ = ["ModelSpec", "PRESETS", "spec_from_preset", "spec_from_checkpoints", "resolve_spec", "build_skeleton",
           "FacePlan", "dtype_name"]


def dtype_name(t: torch.Tensor) -> str:
    """``bf16``, ``fp32``, ... for category names."""
    return {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16", torch.float64: "fp64",
            torch.complex128: "complex128", torch.complex64: "complex64"}.get(t.dtype, str(t.dtype))


#: umT5-xxl encoder (Wan's text encoder, ``models_t5_umt5-xxl-enc-bf16.pth``): 5.7B parameters
UMT5_XXL = dict(vocab=256384, dim=4096, dim_attn=4096, dim_ffn=10240, num_heads=64, num_layers=24,
                num_buckets=32, shared_pos=False)

#: name -> (DiT key of ``architectures.known_dits``, expert roles, text encoder kwargs, VAE arch)
PRESETS = {
    # two 14B experts (high noise ``dit``, low noise ``dit2``), Wan2.1 VAE: docs/design.md section 4
    "wan2.2-i2v-a14b": ("diffsynth:5b013604280dd715f8457c6ed6d6a626", ("dit", "dit2"), UMT5_XXL,
                        {"kind": "wan2.1", "dim": 96, "z_dim": 16}),
    # one 5B expert with first-frame injection, Wan2.2 VAE (stride 4x16x16, z 48)
    "wan2.2-ti2v-5b": ("diffsynth:1f5ab7703c6fc803fdded85ff040c316", ("dit",), UMT5_XXL,
                       {"kind": "wan2.2", "dim": 160, "z_dim": 48}),
    # the tiny twins of ``python -m rewardfl.demo.make_tiny`` (same code path, CPU sizes)
    "tiny-i2v": ("tiny-i2v", ("dit", "dit2"), "tiny", {"kind": "wan2.1", "dim": 8, "z_dim": 16}),
    "tiny-ti2v": ("tiny-ti2v", ("dit",), "tiny", {"kind": "wan2.1", "dim": 8, "z_dim": 16}),
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A checkpoint set's architecture. ``dit``: the recognised DiT (``kwargs`` build ``WanModel``);
    ``experts``: roles from high to low noise; ``text_encoder``: ``WanTextEncoder`` kwargs; ``vae``:
    ``{"kind", "dim", "z_dim"}`` (``architectures.vae_architecture``); ``source``: where it was read
    (a preset or the files)."""

    name: str
    dit: "arch.DiTArch"
    experts: tuple
    text_encoder: dict
    vae: dict
    source: str

    def with_layers(self, layers: int) -> "ModelSpec":
        """The same spec with ``layers`` DiT blocks (the planner's fast, extrapolated mode)."""
        return dataclasses.replace(self, dit=dataclasses.replace(self.dit, kwargs=dict(self.dit.kwargs,
                                                                                   num_layers=layers)))


def spec_from_preset(name: str) -> ModelSpec:
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"--preset: unknown preset '{name}'{hint}; known: {', '.join(PRESETS)}")
    dit_key, experts, te, vae = PRESETS[name]
    if te == "tiny":
        te = arch.TINY_TEXT_ENCODER
    from diffsynth.models.wan_video_dit import WanModel

    kw = dict(arch.known_dits())[dit_key]
    with torch.device("meta"):  # shapes only, as Wan22Model.with_random_weights recognises a DiT
        dit = WanModel(**dict(kw, patch_size=tuple(kw["patch_size"])))
        shapes = {k: tuple(v.shape) for k, v in dit.state_dict().items()}
    return ModelSpec(name, arch.dit_architecture(shapes, f"--preset {name}"), experts, dict(te), dict(vae),
                     f"preset {name}")


def spec_from_checkpoints(cfg) -> ModelSpec:
    """The architecture of the files ``model_paths`` names, from their headers (no weights read),
    as ``Wan22Model`` reads and checks them (``model.read_model_files``)."""
    found = read_model_files(cfg, cfg.model)
    return ModelSpec(os.path.basename(cfg.model.model_paths or "model_id_with_origin_paths"), found.dit, found.experts,
                     found.text_encoder, found.vae,
                     f"checkpoint headers ({cfg.model.model_paths or cfg.model.model_id_with_origin_paths})")


def resolve_spec(cfg, preset: Optional[str]) -> ModelSpec:
    """``--preset`` when given; else the files of ``model_paths`` (headers only)."""
    if preset:
        return spec_from_preset(preset)
    if cfg.model.model_paths is None and not cfg.model.model_id_with_origin_paths:
        raise ValueError(f"model_paths: not set; name the checkpoint files, or plan before downloading with "
                         f"--preset NAME ({', '.join(PRESETS)})")
    try:
        return spec_from_checkpoints(cfg)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}; to plan before downloading use --preset NAME ({', '.join(PRESETS)})") from None


# --------------------------------------------------------------------------- skeletons


def build_skeleton(model_cls, cfg, options, spec: ModelSpec, *, device: torch.device, target: str,
                   gpu_bytes: int, build_device: Optional[torch.device] = None):
    """The ``wan2_2`` model of ``spec`` with fake weights (call inside the planner's fake mode).

    Weights are born on the CPU in the model dtype, as ``Wan22Model._build`` leaves them after
    loading; the model's own constructor then adds LoRA, frozen copies and places the modules on
    ``device`` (the planner's stand-in for the GPU) or the CPU. ``target`` ("cuda"/"cpu", with
    ``gpu_bytes`` of memory) is the device the plan is for: the model's ``DeviceTarget``, which
    decides the dtype (``mixed_precision: auto``) and the offloads by the model's own rules.
    ``build_device``: where modules are constructed (default the CPU); outside fake mode (the GPU
    check) the weights are then real and random, made directly on the GPU.
    """
    from diffsynth.models.wan_video_dit import WanModel
    from diffsynth.models.wan_video_text_encoder import WanTextEncoder

    with default_dtype(model_cls.choose_dtype(cfg.mixed_precision, target)), torch.device(build_device or "cpu"):
        dits = {r: WanModel(**spec.dit.kwargs).requires_grad_(False) for r in spec.experts}
        text_encoder = WanTextEncoder(**spec.text_encoder).requires_grad_(False).eval()
        vae = new_vae(spec.vae).requires_grad_(False).eval()
    parts = WanParts(spec.dit, dits, vae, arch.vae_stride(spec.vae), text_encoder)
    return model_cls(cfg, options, device=device, parts=parts,
                     target=DeviceTarget(target, gpu_bytes if target == "cuda" else None))


# --------------------------------------------------------------------------- the face reward


class FacePlan:
    """The ``face_identity`` reward's memory-relevant parts, for the planner.

    The recognizer is loaded and converted to its torch twin for real (small, on the CPU);
    :meth:`place` copies the twin onto the accelerator as fake tensors; :meth:`loss` runs the
    differentiable part, ``recognizer.align`` + ``recognizer.embed`` + ``pooled_identity_score``,
    for one face per generated frame (the reward's worst case with ``face_select: largest``).
    The detector is not run: it runs without gradient in onnxruntime (``backend: auto``), whose
    memory is its own arena, outside torch's allocator and outside this plan.
    """

    def __init__(self, reward):
        self.reward = reward

    @classmethod
    def load(cls, cfg, reward_cls, notes: list) -> Optional["FacePlan"]:
        """The reward's models, or None (with a note) for another reward plugin or missing files."""
        if not (isinstance(reward_cls, type) and issubclass(reward_cls, FaceIdentityReward)):
            notes.append(f"reward {cfg.reward.name}: not planned (the planner knows face_identity); a stand-in "
                         "-mean(video) carries the graph")
            return None
        try:
            reward = reward_cls(cfg, cfg.reward.options, device="cpu")
            reward.recognizer.model.twin("cpu")
        except (ValueError, FileNotFoundError) as e:
            reason = " ".join(str(e).split()).split(";")[0]
            notes.append(f"reward not planned ({reason}); a stand-in -mean(video) carries the graph: set "
                         "reward_model_path to the face models to include them")
            return None
        notes.append("reward: one face per generated frame; the face detector (no gradient, onnxruntime) is not "
                     "counted: its memory is onnxruntime's own")
        return cls(reward)

    @staticmethod
    @contextlib.contextmanager
    def emulation(target: Optional[str]):
        """``face_align`` on the accelerator as on ``target``: the compiled op (its fake kernel gives
        the shapes) where the target has it, and no landmark *value* checks (fake tensors have no
        values; the checks allocate nothing). ``None``: real tensors, nothing changed."""
        if target is None:
            yield
            return

        saved = align._extension_op, align._check_values
        compiled = align._EXTENSION and (target == "cpu" or align._C.cuda_compiled() or not torch.cuda.is_available())

        def extension_op(device):
            if device.type == "meta" and compiled:
                return torch.ops.rewardfl.face_align.default
            return saved[0](device)

        align._extension_op, align._check_values = extension_op, (lambda *a, **k: None)
        try:
            yield
        finally:
            align._extension_op, align._check_values = saved

    def place(self, tracker, device, *, fake: bool = True) -> None:
        """The recognizer's twin on ``device`` (as fake tensors when ``fake``), counted as its weights."""
        if not fake:
            twin = self.reward.recognizer.model.twin(device, torch.float32)
            for t in list(twin.parameters()) + list(twin.buffers()):
                tracker.retag(t, "face recognizer (torch twin)")
            return

        mode = torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE)
        for name, model in (("face recognizer", self.reward.recognizer.model),):
            with _disable_current_modes():
                twin = copy.deepcopy(model.twin("cpu"))  # the real converted module (small)
            for module in twin.modules():
                for key, p in module._parameters.items():
                    if p is not None:
                        module._parameters[key] = torch.nn.Parameter(p.to(device), requires_grad=p.requires_grad)
                        tracker.retag(module._parameters[key], f"{name} (torch twin), {dtype_name(p)}")
                for key, b in module._buffers.items():
                    if b is None:
                        continue
                    if b.dim() == 0 or (not b.is_floating_point() and b.numel() <= 64):
                        # graph constants the code reads by value (a dropout ratio, a shape): fake
                        # CPU tensors that carry it (a 0-dim CPU tensor mixes with any device)
                        with _disable_current_modes():
                            value = b.clone()  # a real copy (inside the fake mode clone() makes a fake)
                        module._buffers[key] = mode.fake_tensor_converter.from_real_tensor(mode, value,
                                                                                           make_constant=True)
                    else:
                        module._buffers[key] = b.to(device)
                        tracker.retag(module._buffers[key], f"{name} (torch twin), {dtype_name(b)}")
            model._twins[(device.type, device.index, torch.float32)] = twin  # what model.twin(device) returns

    def loss(self, videos, tracker, device):
        """The shaped reward loss of ``videos`` (B, 3, F, H, W) in [-1, 1], 0-dim, differentiable."""
        reward, o = self.reward, self.reward.options
        batch, _, num_frames, height, width = videos.shape
        frames = videos.transpose(1, 2).reshape(batch * num_frames, 3, height, width)  # as reward.__call__
        with tracker.phase("reward: align + embed + score (grad)"):
            first = 1 if o.exclude_generated_frame0 and num_frames > 1 else 0
            index = torch.arange(batch * num_frames, device=device).view(batch, num_frames)[:, first:].reshape(-1)
            face = torch.tensor([[0.35, 0.4], [0.65, 0.4], [0.5, 0.55], [0.38, 0.7], [0.62, 0.7]])
            landmarks = (face * torch.tensor([width, height])).to(device).expand(index.shape[0], 5, 2)
            crops = reward.recognizer.align(frames, landmarks, index)
            embeddings = reward.recognizer.embed(crops, grad=True)
            ref_mean = torch.zeros(batch, embeddings.shape[1], device=device)
            scores, _, _ = pooled_identity_score(embeddings, index // num_frames, index % num_frames, ref_mean,
                                                 num_frames)
            # shaped_reward_loss over every sample (its validity test needs values fake tensors lack)
            return (-(scores.float() - o.score_mean) / o.score_std * o.loss_scale).mean()
