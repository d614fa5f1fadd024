"""The CLIP-family reward plugins: ``clip_score``, ``pickscore``, ``hps`` and ``aesthetic``.

Each scores every frame it receives (which frames is the core's choice) and averages per video:
for videos ``(B, 3, F, H, W)`` in [-1, 1] the ``B*F`` frames go through :func:`clip_pixels` (shared
through the step cache with any other CLIP reward whose processor agrees), the CLIP image encoder,
and the reward's frame score; ``score = mean over frames``.

* ``clip_score``: ``cos(image, text(prompt))``, or ``logit_scale.exp() * cos`` with
  ``times_logit_scale``;
* ``pickscore``: PickScore_v1, ``logit_scale.exp() * cos(image, text)`` (about 20 for a good match);
* ``hps``: HPS v2.1 in transformers format, ``cos(image, text)`` as HPSv2's own ``score`` computes it,
  on frames letterboxed as HPSv2 preprocesses them (longest side to 224, zero padding);
* ``aesthetic``: LAION aesthetic predictor v2, a linear head on the normalised image embedding
  (about 1..10).

The prompt rewards mark samples with an empty prompt invalid (no signal); text embeddings are
computed once per unique prompt.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional, Sequence

import torch

from rewardfl.config import ConfigError
from rewardfl.interfaces import Reward, RewardOutput, SampleContext

from .aesthetic_head import AestheticHead, HeadActivation, head_file, load_aesthetic_head
from .backbone import ClipBackbone, ClipFiles, ModelDtype, PixelSpec, clip_pixels, find_clip_files

__all__ = ["ClipOptions", "ClipScoreReward", "PickScoreReward", "HpsReward", "AestheticReward"]


@dataclasses.dataclass
class ClipOptions:
    """Options every CLIP reward takes."""

    #: the transformers-format CLIP directory (config.json + weights); required
    model_path: Optional[str] = None
    #: where the image processor config and the tokenizer are; default: model_path
    processor_path: Optional[str] = None
    #: dtype of the CLIP weights (preprocessing runs in float32, scores are float32)
    dtype: ModelDtype = "float32"


class _ClipReward(Reward):
    """Loading, preprocessing and per-video averaging; a subclass gives ``frame_scores``."""

    differentiable = True
    Options: ClassVar[type] = ClipOptions
    #: the plugin name, prefix of its metrics
    name: ClassVar[str] = "clip"
    #: a published checkpoint for ``model_path``, named in messages
    example: ClassVar[str] = "openai/clip-vit-large-patch14"
    #: scores need ``context.prompt``
    uses_prompt: ClassVar[bool] = True

    @classmethod
    def _files(cls, config, options) -> ClipFiles:
        return find_clip_files(config, options.model_path, options.processor_path, example=cls.example)

    @classmethod
    def check(cls, config, options) -> list[str]:
        """The CLIP directory's files, found without loading them (``run --check``)."""
        return cls._files(config, options).describe("clip model")

    def __init__(self, config, options=None, *, device=None, **_runtime):
        self.options = options if options is not None else self.Options()
        self.files = self._files(config, self.options)
        self.device = torch.device(device) if device not in (None, "auto") else torch.device("cpu")
        self._backbone: Optional[ClipBackbone] = None

    @property
    def backbone(self) -> ClipBackbone:
        """The CLIP model, loaded on first use (``--check`` and construction stay cheap)."""
        if self._backbone is None:
            self._backbone = ClipBackbone(self.files, device=self.device, dtype=self.options.dtype)
        return self._backbone

    @property
    def pixels(self) -> PixelSpec:
        """How frames become this reward's ``pixel_values``: the CLIP image processor's resize, crop and
        normalisation (``hps`` letterboxes instead)."""
        return self.backbone.pixels

    def _valid(self, contexts: Sequence[SampleContext]) -> torch.Tensor:
        return torch.tensor([bool(c.prompt.strip()) or not self.uses_prompt for c in contexts], dtype=torch.bool)

    def prepare(self, contexts: Sequence[SampleContext]) -> torch.Tensor:
        """Samples without a prompt cannot be scored by a prompt reward; the others' prompts are encoded now."""
        valid = self._valid(contexts)
        if self.uses_prompt and bool(valid.any()):
            self.backbone.text_embeddings([c.prompt for c, v in zip(contexts, valid) if v])
        return valid

    def frame_scores(self, images: torch.Tensor, contexts: Sequence[SampleContext]) -> torch.Tensor:
        """``(B, F)`` scores of normalised image embeddings ``(B, F, D)``."""
        raise NotImplementedError

    def __call__(self, videos: torch.Tensor, contexts: Sequence[SampleContext]) -> RewardOutput:
        """Scores ``(B,)`` of videos ``(B, 3, F, H, W)`` in [-1, 1]: the mean over frames, differentiable
        in ``videos``; float32 (float64 for float64 videos and model)."""
        if videos.dim() != 5 or videos.shape[1] != 3:
            raise ValueError(f"{self.name} reward: videos must be (B, 3, F, H, W), got {tuple(videos.shape)}")
        if len(contexts) != videos.shape[0]:
            raise ValueError(f"{self.name} reward: {videos.shape[0]} videos but {len(contexts)} contexts")
        batch, _, num_frames, height, width = videos.shape
        spec = self.pixels
        grad = torch.is_grad_enabled() and videos.requires_grad  # a no-gradient copy must not serve a weighted reward
        pixels = self.cache.get(videos, f"{spec.cache_name}/grad={grad}", lambda: clip_pixels(
            videos.transpose(1, 2).reshape(batch * num_frames, 3, height, width), spec))
        images = self.backbone.image_embeddings(pixels.to(self.device)).view(batch, num_frames, -1)
        scores = self.frame_scores(images, contexts).mean(1)
        scores = scores.to(device=videos.device, dtype=torch.promote_types(videos.dtype, torch.float32))
        valid = self._valid(contexts)
        metrics = {}
        if bool(valid.any()):
            metrics[f"{self.name}_mean"] = float(scores.detach()[valid.to(scores.device)].mean())
        if self.uses_prompt:
            metrics["samples_without_prompt"] = float((~valid).sum())
        return RewardOutput(scores=scores, valid=valid, metrics=metrics)


class _PromptSimilarity(_ClipReward):
    """``scale * cos(image, text(prompt))`` per frame."""

    #: multiply the cosine by the checkpoint's ``logit_scale.exp()``
    times_logit_scale: ClassVar[bool] = False

    def frame_scores(self, images: torch.Tensor, contexts: Sequence[SampleContext]) -> torch.Tensor:
        text = self.backbone.text_embeddings([c.prompt for c in contexts]).to(images.dtype)
        cosine = (images * text[:, None, :]).sum(-1)
        if self._times_logit_scale():
            return cosine * self.backbone.logit_scale().to(cosine.dtype)
        return cosine

    def _times_logit_scale(self) -> bool:
        return self.times_logit_scale


class ClipScoreReward(_PromptSimilarity):
    """CLIP score: cosine between each frame's CLIP image embedding and the prompt's text embedding."""

    name = "clip_score"
    example = "openai/clip-vit-large-patch14"

    @dataclasses.dataclass
    class Options(ClipOptions):
        #: score = logit_scale.exp() * cosine (100 * cosine for OpenAI's CLIP) instead of the cosine
        times_logit_scale: bool = False

    def _times_logit_scale(self) -> bool:
        return self.options.times_logit_scale


class PickScoreReward(_PromptSimilarity):
    """PickScore_v1: ``logit_scale.exp() * cos(image, text)`` with its CLIP-H."""

    name = "pickscore"
    example = ("yuvalkirstain/PickScore_v1 (with reward.processor_path: a download of "
               "laion/CLIP-ViT-H-14-laion2B-s32B-b79K)")
    times_logit_scale = True

    @dataclasses.dataclass
    class Options(ClipOptions):
        pass


class HpsReward(_PromptSimilarity):
    """HPS v2.1: ``cos(image, text)`` (HPSv2's ``score``) with HPS v2.1's ViT-H-14 weights converted to
    a transformers ``CLIPModel`` directory (the open_clip checkpoint itself does not load here), on
    letterboxed frames as HPSv2's own scorer preprocesses them (:attr:`pixels`)."""

    name = "hps"
    example = ("HPS v2.1 (HPS_v2.1_compressed.pt, an open_clip ViT-H-14 checkpoint) converted to a transformers "
               "CLIPModel directory, with reward.processor_path: laion/CLIP-ViT-H-14-laion2B-s32B-b79K")

    @dataclasses.dataclass
    class Options(ClipOptions):
        pass

    @property
    def pixels(self) -> PixelSpec:
        """HPSv2's own preprocessing: the whole frame, longest side to the image size (224) and zero
        padding to the square (open_clip's ``ResizeMaxSize``), not CLIP's shortest side and centre crop,
        which would leave the sides of a wide frame unscored (42% of an 832x480 frame's width)."""
        spec = self.backbone.pixels
        return spec.letterboxed(spec.crop[0] if spec.crop else spec.shortest_edge or spec.height)


class AestheticReward(_ClipReward):
    """LAION aesthetic predictor v2: a linear head on the L2-normalised CLIP image embedding."""

    name = "aesthetic"
    example = "openai/clip-vit-large-patch14 (the CLIP of sac+logos+ava1-l14-linearMSE.pth)"
    uses_prompt = False

    @dataclasses.dataclass
    class Options(ClipOptions):
        #: the head's weights: sac+logos+ava1-l14-linearMSE.pth (.pth via weights_only, or .safetensors); required
        head_path: Optional[str] = None
        #: between the head's linear layers: none for the published linearMSE heads, relu for reluMSE ones
        head_activation: HeadActivation = "none"

    @classmethod
    def _head_path(cls, config, options) -> str:
        if not options.head_path:
            raise ConfigError("reward.head_path: not set; give the aesthetic head's weights, e.g. "
                              "sac+logos+ava1-l14-linearMSE.pth (LAION aesthetic predictor v2)")
        return head_file(config.resolve_path(options.head_path) if config is not None else options.head_path)

    @classmethod
    def check(cls, config, options) -> list[str]:
        return super().check(config, options) + [f"aesthetic head {cls._head_path(config, options)}"]

    def __init__(self, config, options=None, *, device=None, **runtime):
        super().__init__(config, options, device=device, **runtime)
        self.head_path = self._head_path(config, self.options)
        self._head: Optional[AestheticHead] = None

    @property
    def head(self) -> AestheticHead:
        if self._head is None:
            head = load_aesthetic_head(self.head_path, self.options.head_activation)
            if head.in_features != self.backbone.embed_dim:
                raise ValueError(f"reward.head_path: {self.head_path} takes {head.in_features}-d embeddings but the "
                                 f"CLIP of reward.model_path gives {self.backbone.embed_dim}-d; the published head "
                                 f"needs openai/clip-vit-large-patch14 (768-d)")
            self._head = head.to(self.device)
        return self._head

    def frame_scores(self, images: torch.Tensor, contexts: Sequence[SampleContext]) -> torch.Tensor:
        return self.head(images)
