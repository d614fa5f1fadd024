"""CLIP-family reward plugins: ``clip_score``, ``pickscore``, ``hps`` and ``aesthetic``.

Modules, in the order data flows through them:

* ``backbone``: a transformers-format CLIP directory's files (found without loading them for
  ``run --check``), the frozen ``CLIPModel`` with its tokenizer, the image processor's
  preprocessing redone in torch with gradient (``clip_pixels``), text embeddings per prompt;
* ``aesthetic_head``: the LAION aesthetic predictor v2 head (stacked linear layers);
* ``rewards``: the four plugin classes (frame scores, mean per video, metrics).
"""

from .aesthetic_head import AestheticHead, load_aesthetic_head
from .backbone import ClipBackbone, ClipFiles, PixelSpec, clip_pixels, find_clip_files
from .rewards import AestheticReward, ClipOptions, ClipScoreReward, HpsReward, PickScoreReward

__all__ = ["AestheticHead", "load_aesthetic_head", "ClipBackbone", "ClipFiles", "PixelSpec", "clip_pixels",
           "find_clip_files", "AestheticReward", "ClipOptions", "ClipScoreReward", "HpsReward", "PickScoreReward"]
