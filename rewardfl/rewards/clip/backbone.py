"""A CLIP model for the CLIP-family rewards: its files, loading, differentiable image preprocessing
and text embeddings.

A CLIP directory is in transformers format: ``config.json`` (``model_type: clip``) and the weights
(``model.safetensors``, ``pytorch_model.bin`` or a sharded index), as ``CLIPModel.save_pretrained``
writes them or a Hugging Face snapshot holds them. The image processor config
(``preprocessor_config.json``, or ``processor_config.json`` as transformers 5 writes it) and the
tokenizer (``tokenizer.json``, or ``vocab.json`` + ``merges.txt``) sit in the same directory or in
``processor_path``. Nothing is downloaded.

Preprocessing (:func:`clip_pixels`) is the image processor's, in torch and with gradient: frames in
[-1, 1] -> [0, 1] -> resize (shortest side to ``size.shortest_edge``, the long side
``int(size * long / short)`` as transformers computes it; bicubic with antialias) -> centre crop
-> ``(x - image_mean) / image_std``; or, for a reward whose scorer letterboxes (``hps``), longest side
to the crop size and zero padding to the square instead of the resize and crop (:meth:`PixelSpec.letterboxed`). The resize runs width first, then height, each pass clamped
to [0, 1]: transformers' processors resize uint8 images in two such passes (PIL, and torchvision's
uint8 kernel, which matches PIL), so bicubic overshoot at hard edges is cut at 0 and 255 after
each; the model was trained on such pixels. The clamp zeroes the gradient only where overshoot is
cut. What remains is the processors' uint8 rounding after each pass: at most about 1/255 at a
pixel, 0.3/255 on average (measured in tests/test_clip_rewards.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F

from rewardfl.config import ConfigError

__all__ = ["ClipFiles", "find_clip_files", "PixelSpec", "clip_pixels", "ClipBackbone", "ModelDtype"]

ModelDtype = Literal["float32", "bfloat16", "float16"]

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
PROCESSOR_CONFIGS = ("preprocessor_config.json", "processor_config.json")
#: PIL resample codes in a processor config -> ``F.interpolate`` modes
RESAMPLE_MODES = {2: "bilinear", 3: "bicubic"}


@dataclasses.dataclass(frozen=True)
class ClipFiles:
    """Where one CLIP model's files are (absolute paths); found by :func:`find_clip_files`."""

    model_dir: str
    weights: str
    processor_dir: str
    processor_config: str
    tokenizer: str

    def describe(self, label: str) -> list[str]:
        """``run --check`` lines."""
        lines = [f"{label} {self.model_dir} ({os.path.basename(self.weights)})"]
        if self.processor_dir != self.model_dir:
            lines.append(f"{' ' * len(label)} processor {self.processor_dir}")
        return lines


def find_clip_files(config, model_path: Optional[str], processor_path: Optional[str], *,
                    example: str) -> ClipFiles:
    """The files of the CLIP directory ``reward.model_path`` (and ``reward.processor_path``), found
    without loading them. ``example`` names a published checkpoint for the messages.

    Raises ``ConfigError`` (a ``ValueError``) when ``model_path`` is unset or is not a CLIP directory,
    ``FileNotFoundError`` naming the key and the path for a missing file.
    """
    if not model_path:
        raise ConfigError(f"reward.model_path: not set; give the local directory of a transformers-format "
                          f"CLIP model (config.json + model.safetensors), e.g. a download of {example}")
    model_dir = _resolve(config, model_path)
    if os.path.isfile(model_dir):
        raise ConfigError(f"reward.model_path: {model_dir} is a file; give the directory that holds config.json "
                          f"and the weights of a transformers-format CLIP model (e.g. {example})")
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"reward.model_path: no such directory: {model_dir}")
    config_json = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_json):
        hint = (" (open_clip_config.json is there: an open_clip checkpoint, which needs converting to transformers "
                "format first)" if os.path.exists(os.path.join(model_dir, "open_clip_config.json")) else "")
        raise FileNotFoundError(f"reward.model_path: no config.json in {model_dir}{hint}; it must be a "
                                f"transformers-format CLIP directory (CLIPModel.save_pretrained, e.g. {example})")
    try:
        with open(config_json, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError) as e:
        raise ConfigError(f"reward.model_path: cannot read {config_json}: {e}") from e
    if model_type != "clip":
        raise ConfigError(f"reward.model_path: {config_json} has model_type {model_type!r}, not 'clip'; "
                          f"give a CLIPModel directory (e.g. {example})")
    weights = next((os.path.join(model_dir, n) for n in WEIGHT_FILES if os.path.isfile(os.path.join(model_dir, n))),
                   None)
    if weights is None:
        raise FileNotFoundError(f"reward.model_path: no weights in {model_dir} (looked for {', '.join(WEIGHT_FILES)})")

    key = "reward.processor_path" if processor_path else "reward.model_path"
    processor_dir = _resolve(config, processor_path) if processor_path else model_dir
    if not os.path.isdir(processor_dir):
        raise FileNotFoundError(f"{key}: no such directory: {processor_dir}")
    fix = ("" if processor_path else
           "; set reward.processor_path to the directory of the CLIP processor this model was trained with")
    processor_config = next((os.path.join(processor_dir, n) for n in PROCESSOR_CONFIGS
                             if os.path.isfile(os.path.join(processor_dir, n))), None)
    if processor_config is None:
        raise FileNotFoundError(f"{key}: no image processor config ({' or '.join(PROCESSOR_CONFIGS)}) in "
                                f"{processor_dir}{fix}")
    tokenizer = os.path.join(processor_dir, "tokenizer.json")
    if not os.path.isfile(tokenizer):
        vocab, merges = (os.path.join(processor_dir, n) for n in ("vocab.json", "merges.txt"))
        if not (os.path.isfile(vocab) and os.path.isfile(merges)):
            raise FileNotFoundError(f"{key}: no tokenizer (tokenizer.json, or vocab.json + merges.txt) in "
                                    f"{processor_dir}{fix}")
        tokenizer = vocab
    return ClipFiles(model_dir, weights, processor_dir, processor_config, tokenizer)


def _resolve(config, path: str) -> str:
    if config is not None:
        return config.resolve_path(path)
    return os.path.abspath(os.path.expanduser(path))


# --------------------------------------------------------------------------- preprocessing


@dataclasses.dataclass(frozen=True)
class PixelSpec:
    """What a CLIP image processor does to an image, read from its config.

    ``shortest_edge`` (resize the short side to it) or ``height``/``width`` (resize to exactly that),
    or neither when the processor does not resize; ``crop`` ``(h, w)`` or None; ``mean``/``std`` per
    channel in [0, 1] units, or None when it does not normalise; ``mode`` the interpolation.
    ``letterbox``: instead of all that, resize the *longest* side to it and pad with zeros (black, before
    normalisation) to a ``letterbox`` square, the whole frame kept (:meth:`letterboxed`).
    """

    shortest_edge: Optional[int]
    height: Optional[int]
    width: Optional[int]
    crop: Optional[tuple[int, int]]
    mean: Optional[tuple[float, float, float]]
    std: Optional[tuple[float, float, float]]
    mode: str = "bicubic"
    letterbox: Optional[int] = None

    def letterboxed(self, size: int) -> "PixelSpec":
        """This spec with its resize and crop replaced by a letterbox to ``size``: HPSv2's eval transform,
        open_clip's ``ResizeMaxSize(size, fill=0)``: scale ``size / max(h, w)``, the new sides
        ``round(side * scale)`` (Python's round), zero padding ``pad // 2`` before and the rest after,
        then ``ToTensor`` and ``Normalize``. One difference: ``ResizeMaxSize`` neither resizes nor pads
        an image whose longest side already is ``size``, so a non-square one would reach the model
        unpadded (which a ViT with a fixed grid cannot take); here it is padded."""
        return dataclasses.replace(self, shortest_edge=None, height=None, width=None, crop=None, letterbox=size)

    @classmethod
    def from_processor(cls, processor, path: str) -> "PixelSpec":
        """From a loaded ``CLIPImageProcessor``; ``path`` (its config file) names it in errors."""
        if not getattr(processor, "do_rescale", True) or abs(processor.rescale_factor - 1 / 255) > 1e-9:
            raise ValueError(f"{path}: expected do_rescale with rescale_factor 1/255 (pixels in [0, 1]), got "
                             f"do_rescale={processor.do_rescale}, rescale_factor={processor.rescale_factor}")
        shortest = height = width = None
        mode = "bicubic"
        if processor.do_resize:
            size = processor.size
            if size.get("shortest_edge") and not size.get("longest_edge"):
                shortest = int(size["shortest_edge"])
            elif size.get("height") and size.get("width"):
                height, width = int(size["height"]), int(size["width"])
            else:
                raise ValueError(f"{path}: size {dict((k, v) for k, v in size.items() if v)} is not supported; "
                                 "expected shortest_edge or height and width")
            resample = int(processor.resample)
            if resample not in RESAMPLE_MODES:
                raise ValueError(f"{path}: resample {resample} is not supported; expected 3 (bicubic) or 2 (bilinear)")
            mode = RESAMPLE_MODES[resample]
        crop = None
        if processor.do_center_crop:
            crop = (int(processor.crop_size["height"]), int(processor.crop_size["width"]))
        mean = std = None
        if processor.do_normalize:
            mean, std = _three(processor.image_mean), _three(processor.image_std)
            if any(s == 0 for s in std):
                raise ValueError(f"{path}: image_std has a zero: {std}")
        return cls(shortest, height, width, crop, mean, std, mode)

    @property
    def cache_name(self) -> str:
        """The :class:`~rewardfl.interfaces.StepCache` name of these pixels: rewards whose processors
        agree on every field share them."""
        digest = hashlib.sha1(repr(dataclasses.astuple(self)).encode()).hexdigest()[:10]
        side = self.crop[0] if self.crop else (self.shortest_edge or self.height or self.letterbox or "full")
        if self.letterbox is not None:
            side = f"letterbox{side}"
        return f"clip_pixels_{side}_{digest}"

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """``(h, w)`` after the resize, as transformers' ``get_resize_output_image_size`` computes it (or,
        with ``letterbox``, open_clip's ``ResizeMaxSize``)."""
        if self.letterbox is not None:
            scale = self.letterbox / float(max(height, width))
            return round(height * scale), round(width * scale)
        if self.shortest_edge is not None:
            short, long = (width, height) if width <= height else (height, width)
            new_long = int(self.shortest_edge * long / short)
            return (new_long, self.shortest_edge) if width <= height else (self.shortest_edge, new_long)
        if self.height is not None:
            return self.height, self.width
        return height, width


def _three(values) -> tuple[float, float, float]:
    values = [float(v) for v in (values if isinstance(values, (list, tuple)) else [values] * 3)]
    return tuple(values) if len(values) == 3 else tuple(values[:1] * 3)


def clip_pixels(frames: torch.Tensor, spec: PixelSpec) -> torch.Tensor:
    """The CLIP model's ``pixel_values`` of ``frames`` ``(N, 3, H, W)`` in [-1, 1], differentiable.

    Returns ``(N, 3, h, w)`` float32 (float64 for float64 frames), normalised with the processor's
    mean and std. Matches ``CLIPImageProcessor`` on the same image up to the processor's own uint8
    rounding (see ``tests/test_clip_rewards.py`` for the measured tolerance).
    """
    x = (frames.to(torch.promote_types(frames.dtype, torch.float32)) + 1.0) * 0.5
    height, width = x.shape[-2:]
    new_size = spec.resized_size(height, width)
    # one axis at a time, width first, clamping after each pass: what PIL (and torchvision's uint8
    # kernel, which matches PIL) do, with uint8 storage between the passes
    if new_size[1] != width:
        x = F.interpolate(x, size=(height, new_size[1]), mode=spec.mode, antialias=True,
                          align_corners=False).clamp(0.0, 1.0)
    if new_size[0] != height:
        x = F.interpolate(x, size=new_size, mode=spec.mode, antialias=True, align_corners=False).clamp(0.0, 1.0)
    if spec.letterbox is not None:  # zero padding to the square, in [0, 1] pixels (black)
        pad_h, pad_w = spec.letterbox - new_size[0], spec.letterbox - new_size[1]
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    if spec.crop is not None:
        x = _center_crop(x, *spec.crop)
    if spec.mean is not None:
        mean = torch.tensor(spec.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
    return x


def _center_crop(x: torch.Tensor, crop_h: int, crop_w: int) -> torch.Tensor:
    """transformers' centre crop: zero padding first when the crop is larger than the image."""
    height, width = x.shape[-2:]
    if crop_h > height or crop_w > width:
        pad_w, pad_h = max(crop_w - width, 0), max(crop_h - height, 0)
        x = F.pad(x, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2))
        height, width = x.shape[-2:]
    top, left = int((height - crop_h) / 2.0), int((width - crop_w) / 2.0)
    return x[..., top:top + crop_h, left:left + crop_w]


# --------------------------------------------------------------------------- the model


class ClipBackbone:
    """A frozen ``CLIPModel`` with its tokenizer and pixel spec, loaded from :class:`ClipFiles`.

    ``image_embeddings`` carries gradient to the pixels; text embeddings are computed without
    gradient once per unique prompt and kept.
    """

    def __init__(self, files: ClipFiles, *, device: torch.device, dtype: ModelDtype = "float32"):
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        self.files = files
        try:
            self.model = CLIPModel.from_pretrained(files.model_dir, dtype=getattr(torch, dtype), local_files_only=True)
        except Exception as e:  # a damaged or foreign checkpoint: safetensors, torch, transformers raise many types
            raise ValueError(f"reward.model_path: cannot load {files.model_dir} as a CLIPModel: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from e
        self.model.to(device).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(files.processor_dir, local_files_only=True)
        processor = CLIPImageProcessor.from_pretrained(files.processor_dir, local_files_only=True)
        self.pixels = PixelSpec.from_processor(processor, files.processor_config)
        self.max_text_length = int(self.model.config.text_config.max_position_embeddings)
        self._text: dict[str, torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.projection_dim)

    def logit_scale(self) -> torch.Tensor:
        """0-dim ``logit_scale.exp()`` of the checkpoint (100 for OpenAI's CLIP)."""
        return self.model.logit_scale.detach().exp()

    def image_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings ``(N, D)`` of ``pixel_values`` ``(N, 3, h, w)``; float32
        (float64 for a float64 model), differentiable in ``pixels``."""
        out = self.model.get_image_features(pixel_values=pixels.to(self.model.dtype))
        return _normalized(_pooled(out))

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings ``(B, D)``, computed once per unique prompt."""
        new = [p for p in dict.fromkeys(prompts) if p not in self._text]
        if new:
            tokens = self.tokenizer(new, padding=True, truncation=True, max_length=self.max_text_length,
                                    return_tensors="pt").to(self.device)
            out = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            for prompt, embedding in zip(new, _normalized(_pooled(out))):
                self._text[prompt] = embedding
        return torch.stack([self._text[p] for p in prompts])


def _pooled(out) -> torch.Tensor:
    # transformers >= 5 returns the projected embeddings as ``pooler_output``; 4.x a tensor
    return out if torch.is_tensor(out) else out.pooler_output


def _normalized(x: torch.Tensor) -> torch.Tensor:
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    return x / x.norm(dim=-1, keepdim=True)
