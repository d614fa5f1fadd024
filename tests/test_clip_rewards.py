"""The CLIP-family rewards (``rewardfl.rewards.clip``) against transformers' own CLIP.

A tiny random ``CLIPModel`` (hidden 32, 2 layers, 32 px images, 8 px patches) with a byte-level
tokenizer and a 32 px image processor is written with ``save_pretrained`` and loaded through the
plugins. References: the transformers model's ``get_image_features``/``get_text_features`` and
``logits_per_image`` (float64) on the processor's own ``pixel_values``; ``CLIPImageProcessor``
(torchvision) and ``CLIPImageProcessorPil`` for the preprocessing; numpy float64 for the aesthetic head.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from rewardfl.config import ConfigError, config_from_dict
from rewardfl.interfaces import SampleContext, StepCache
from rewardfl.registry import build_options
from rewardfl.rewards.clip import (AestheticReward, ClipScoreReward, HpsReward, PickScoreReward, PixelSpec,
                                   clip_pixels)

transformers = pytest.importorskip("transformers")

PROMPTS = ["a cat on a red sofa", "two dogs running!", "a cat on a red sofa"]

# The processors resize uint8 images (PIL, or torchvision's uint8 kernel, which matches PIL) and
# round to uint8 after each of the two passes; clip_pixels resizes in float. Measured over noise
# and photos, downscaling and upscaling: at most 1.07/255, on average 0.25-0.32/255 in [0, 1] units.
UINT8_MAX_TOL = 1.25 / 255
UINT8_MEAN_TOL = 0.4 / 255


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table, which CLIP's byte-level BPE vocabulary uses."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _write_clip(path, *, mean=None, projection_dim=16, seed=0):
    """A tiny random CLIPModel with a byte-level tokenizer and a 32 px processor, saved to ``path``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _bytes_to_unicode():
        vocab[ch] = len(vocab)
    for ch in _bytes_to_unicode():
        vocab[ch + "</w>"] = len(vocab)
    merges = [("c", "a"), ("ca", "t</w>")]
    vocab["ca"], vocab["cat</w>"] = len(vocab), len(vocab) + 1
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    layers = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(
        text_config=dict(**layers, vocab_size=len(vocab), max_position_embeddings=16, bos_token_id=0,
                         eos_token_id=1, pad_token_id=1),
        vision_config=dict(**layers, image_size=32, patch_size=8),
        projection_dim=projection_dim, logit_scale_init_value=2.3,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    processor_kwargs = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    if mean is not None:
        processor_kwargs["image_mean"] = mean
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(**processor_kwargs), tokenizer=tokenizer)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return _write_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def reference(clip_dir):
    """transformers' own model (float64), processor and tokenizer from the same directory."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(clip_dir).double().eval()
    return model, CLIPImageProcessor.from_pretrained(clip_dir), AutoTokenizer.from_pretrained(clip_dir)


def _config():
    return config_from_dict({})


def _smooth_uint8(shape, seed, low=40, high=215):
    """uint8 images ``(*lead, 3, H, W)`` for ``shape = (*lead, H, W)``: smooth random content in
    [low, high], so that no bicubic overshoot reaches 0 or 255 (the processor's float path, a
    reference below, does not clamp)."""
    *lead, h, w = shape
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(int(np.prod(lead or [1])), 3, max(h // 6, 2), max(w // 6, 2), generator=g, dtype=torch.float64)
    fine = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True)
    u = (low + (high - low) * fine).round().to(torch.uint8)
    return u.view(*lead, 3, h, w) if lead else u[0]


def _videos(batch=2, frames=3, height=40, width=56, seed=1):
    """uint8 frames ``(B, F, 3, H, W)`` and the same videos ``(B, 3, F, H, W)`` float64 in [-1, 1]."""
    u = _smooth_uint8((batch, frames, height, width), seed)
    return u, (u.double() / 127.5 - 1.0).transpose(1, 2).contiguous()


def _reference_embeddings(reference, frames_u8, prompts):
    """Normalised float64 image ``(B, F, D)`` and text ``(B, D)`` embeddings, and ``logits_per_image``
    ``(B, F)`` from the transformers model's own forward, on the processor's outputs."""
    model, processor, tokenizer = reference
    b, f = frames_u8.shape[:2]
    # the processor's float path ([0, 1] images, do_rescale off): the same resize without uint8 rounding
    images = [x.double() / 255.0 for x in frames_u8.flatten(0, 1)]
    pixels = processor(images=images, do_rescale=False, return_tensors="pt")["pixel_values"].double()
    tokens = tokenizer(prompts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels).pooler_output
        text = model.get_text_features(**tokens).pooler_output
        out = model(input_ids=tokens["input_ids"].repeat_interleave(f, 0),
                    attention_mask=tokens["attention_mask"].repeat_interleave(f, 0), pixel_values=pixels)
    image = image / image.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    logits = out.logits_per_image.diagonal().view(b, f)  # each frame against its own sample's prompt
    return image.view(b, f, -1), text, logits


def _double(reward):
    reward.backbone.model.double()
    return reward


def _contexts(prompts):
    return [SampleContext(sample_id=f"s{i}", prompt=p) for i, p in enumerate(prompts)]


# --------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("height,width", [(70, 90), (90, 70), (20, 26), (32, 48)])
def test_clip_pixels_equal_processor_float_path(clip_dir, reference, height, width):
    """Geometry and normalisation: the processor's own float path (no uint8 rounding) on the same
    [0, 1] image, downscaled, portrait, upscaled and with only a crop; float32 rounding apart."""
    _, processor, _ = reference
    u = _smooth_uint8((height, width), seed=height)
    expected = processor(images=u.double() / 255.0, do_rescale=False, return_tensors="pt")["pixel_values"]
    spec = PixelSpec.from_processor(processor, "processor")
    got = clip_pixels(u[None].double() / 127.5 - 1.0, spec)
    assert got.shape == expected.shape == (1, 3, 32, 32)
    torch.testing.assert_close(got, expected.double(), atol=2e-6, rtol=0)


@pytest.mark.parametrize("processor_size,height,width", [(32, 70, 90), (32, 90, 70), (32, 20, 26),
                                                         (224, 480, 832), (224, 120, 208)])
@pytest.mark.parametrize("content", ["noise", "photo"])
def test_clip_pixels_match_uint8_processors(processor_size, height, width, content):
    """The real path: a uint8 image through CLIPImageProcessor (torchvision) and CLIPImageProcessorPil
    vs the same image as [-1, 1] floats through clip_pixels, within the uint8 rounding (module top)."""
    from transformers import CLIPImageProcessor, CLIPImageProcessorPil

    kwargs = dict(size={"shortest_edge": processor_size}, crop_size={"height": processor_size, "width": processor_size})
    if content == "noise":  # worst case: overshoot everywhere, clamped at 0 and 255
        u = torch.from_numpy(np.random.RandomState(height * width).randint(0, 256, (3, height, width), dtype=np.uint8))
    else:
        import skimage.data
        from PIL import Image

        photo = Image.fromarray(skimage.data.astronaut()).resize((width, height), Image.BILINEAR)
        u = torch.from_numpy(np.array(photo)).permute(2, 0, 1).contiguous()
    processor = CLIPImageProcessor(**kwargs)
    spec = PixelSpec.from_processor(processor, "processor")
    got = clip_pixels(u[None].double() / 127.5 - 1.0, spec)
    std = torch.tensor(spec.std, dtype=torch.float64).view(1, 3, 1, 1)
    for ref in (processor, CLIPImageProcessorPil(**kwargs)):
        expected = ref(images=u.permute(1, 2, 0).numpy(), return_tensors="pt")["pixel_values"].double()
        assert got.shape == expected.shape
        error = ((got - expected) * std).abs()  # in [0, 1] pixel units
        assert float(error.max()) <= UINT8_MAX_TOL, (type(ref).__name__, float(error.max()) * 255)
        assert float(error.mean()) <= UINT8_MEAN_TOL, (type(ref).__name__, float(error.mean()) * 255)


def test_clip_pixels_crop_larger_than_image_pads_like_processor(reference):
    """A crop larger than the resized image: zero padding placed as transformers places it."""
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 33, "width": 36})
    u = _smooth_uint8((30, 33), seed=3)
    expected = processor(images=u.double() / 255.0, do_rescale=False, return_tensors="pt")["pixel_values"]
    got = clip_pixels(u[None].double() / 127.5 - 1.0, PixelSpec.from_processor(processor, "processor"))
    torch.testing.assert_close(got, expected.double(), atol=2e-6, rtol=0)


def _resize_max_size(img, max_size: int, fill: int = 0):
    """open_clip's ``ResizeMaxSize`` (``src/open_clip/transform.py``, the eval transform HPSv2's scorer
    builds with ``resize_longest_max=True``), reproduced from its source: a PIL image, or a tensor
    ``(..., H, W)`` (the size read from the last two dims, as later open_clip versions read it)."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    if isinstance(img, torch.Tensor):
        height, width = img.shape[-2:]
    else:
        width, height = img.size
    scale = max_size / float(max(height, width))
    if scale != 1.0:
        new_size = tuple(round(dim * scale) for dim in (height, width))
        img = TF.resize(img, new_size, InterpolationMode.BICUBIC)
        pad_h = max_size - new_size[0]
        pad_w = max_size - new_size[1]
        img = TF.pad(img, padding=[pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=fill)
    return img


def _hps_reference_pixels(images, spec):
    """HPSv2's eval transform on [0, 1] float images ``(3, H, W)``: ResizeMaxSize(fill=0), Normalize."""
    import torchvision.transforms.functional as TF

    size = spec.crop[0]
    return torch.stack([TF.normalize(_resize_max_size(x, size), list(spec.mean), list(spec.std)) for x in images])


@pytest.mark.parametrize("size,height,width", [(224, 480, 832), (224, 120, 208), (32, 90, 70), (32, 20, 26)])
@pytest.mark.parametrize("content", ["noise", "photo"])
def test_hps_letterboxes_as_open_clips_resize_max_size(size, height, width, content):
    """hps preprocesses as HPSv2 does: the uint8 image through the reproduced ResizeMaxSize (PIL bicubic,
    zero padding), ToTensor and Normalize vs clip_pixels of the same image, within the uint8 rounding.
    The whole frame is kept: at 832x480 the CLIP crop would drop 42% of the width."""
    import torchvision.transforms.functional as TF
    from PIL import Image
    from transformers import CLIPImageProcessor

    if content == "noise":
        u = torch.from_numpy(np.random.RandomState(height * width).randint(0, 256, (3, height, width), dtype=np.uint8))
    else:
        import skimage.data

        photo = Image.fromarray(skimage.data.astronaut()).resize((width, height), Image.BILINEAR)
        u = torch.from_numpy(np.array(photo)).permute(2, 0, 1).contiguous()
    spec = PixelSpec.from_processor(CLIPImageProcessor(size={"shortest_edge": size},
                                                       crop_size={"height": size, "width": size}), "processor")
    hps = spec.letterboxed(size)
    got = clip_pixels(u[None].double() / 127.5 - 1.0, hps)
    letterboxed = _resize_max_size(Image.fromarray(u.permute(1, 2, 0).numpy()), size)
    expected = TF.normalize(TF.to_tensor(letterboxed).double(), list(spec.mean), list(spec.std))[None]
    assert got.shape == expected.shape == (1, 3, size, size)
    std = torch.tensor(spec.std, dtype=torch.float64).view(1, 3, 1, 1)
    error = ((got - expected) * std).abs()
    assert float(error.max()) <= UINT8_MAX_TOL and float(error.mean()) <= UINT8_MEAN_TOL, float(error.max()) * 255
    # the padding is black in pixel space, and the image spans the whole long side
    scale = size / max(height, width)
    rows, cols = round(height * scale), round(width * scale)
    black = (-torch.tensor(spec.mean, dtype=torch.float64) / torch.tensor(spec.std, dtype=torch.float64)).view(3, 1, 1)
    top, left = (size - rows) // 2, (size - cols) // 2
    if top:
        torch.testing.assert_close(got[0, :, :top], black.expand(3, top, size), atol=1e-12, rtol=0)
    if left:
        torch.testing.assert_close(got[0, :, :, :left], black.expand(3, size, left), atol=1e-12, rtol=0)
    assert hps.resized_size(height, width) == (rows, cols) and hps.cache_name != spec.cache_name


def test_hps_scores_equal_transformers_forward_on_letterboxed_pixels(clip_dir, reference):
    """hps = mean over frames of cos(image, text) with the image embedded from HPSv2's letterboxed
    pixels (the reproduced ResizeMaxSize on float images, no uint8 rounding), float64."""
    model, processor, tokenizer = reference
    frames_u8, videos = _videos(batch=3)  # 40x56 frames: longest side to 32, 9 rows of padding
    spec = PixelSpec.from_processor(processor, "processor")
    pixels = _hps_reference_pixels([x.double() / 255.0 for x in frames_u8.flatten(0, 1)], spec)
    tokens = tokenizer(PROMPTS, padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels).pooler_output
        text = model.get_text_features(**tokens).pooler_output
    image = (image / image.norm(dim=-1, keepdim=True)).view(3, 3, -1)
    text = text / text.norm(dim=-1, keepdim=True)
    expected = (image * text[:, None]).sum(-1).mean(1)
    reward = _double(HpsReward(_config(), HpsReward.Options(model_path=clip_dir)))
    out = reward(videos, _contexts(PROMPTS))
    torch.testing.assert_close(out.scores, expected, atol=1e-6 * (1 + expected.abs().max()), rtol=0)
    cropped, _, _ = _reference_embeddings(reference, frames_u8, PROMPTS)  # CLIP's crop scores differently
    assert not torch.allclose((cropped * text[:, None]).sum(-1).mean(1), expected, atol=1e-4)


# --------------------------------------------------------------------------- scores


@pytest.mark.parametrize("cls,scaled", [(ClipScoreReward, False), (PickScoreReward, True)])
def test_prompt_scores_equal_transformers_forward(clip_dir, reference, cls, scaled):
    """Score per video = mean over frames of cos(image, text) (clip_score) or of the model's own
    logits_per_image = logit_scale.exp() * cos (pickscore)."""
    frames_u8, videos = _videos(batch=3)
    image, text, logits = _reference_embeddings(reference, frames_u8, PROMPTS)
    cosine = (image * text[:, None]).sum(-1)
    expected = (logits if scaled else cosine).mean(1)

    reward = _double(cls(_config(), cls.Options(model_path=clip_dir)))
    out = reward(videos, _contexts(PROMPTS))
    assert out.scores.dtype == torch.float64 and out.valid.all()
    torch.testing.assert_close(out.scores, expected, atol=1e-6 * (1 + expected.abs().max()), rtol=0)
    assert out.metrics[f"{reward.name}_mean"] == pytest.approx(float(expected.mean()), abs=1e-5)
    # the logit scale matters: the two conventions differ by the checkpoint's exp(2.3)
    assert torch.allclose(logits, cosine * np.exp(2.3))


def test_clip_score_times_logit_scale(clip_dir, reference):
    frames_u8, videos = _videos(batch=3)
    _, _, logits = _reference_embeddings(reference, frames_u8, PROMPTS)
    options = build_options("reward", "clip_score", ClipScoreReward,
                            {"model_path": clip_dir, "times_logit_scale": True})
    out = _double(ClipScoreReward(_config(), options))(videos, _contexts(PROMPTS))
    torch.testing.assert_close(out.scores, logits.mean(1), atol=1e-5, rtol=0)


def test_float32_model_close_to_float64(clip_dir, reference):
    """The default (float32 weights, float32 videos) path agrees with the float64 reference."""
    frames_u8, videos = _videos(batch=3)
    image, text, _ = _reference_embeddings(reference, frames_u8, PROMPTS)
    out = ClipScoreReward(_config(), ClipScoreReward.Options(model_path=clip_dir))(videos.float(), _contexts(PROMPTS))
    assert out.scores.dtype == torch.float32
    torch.testing.assert_close(out.scores.double(), (image * text[:, None]).sum(-1).mean(1), atol=1e-5, rtol=0)


def test_gradient_matches_finite_differences(clip_dir):
    """d score / d video against central finite differences (gradcheck, float64), through the
    resize, clamp, crop, normalisation and the image encoder."""
    reward = _double(HpsReward(_config(), HpsReward.Options(model_path=clip_dir)))
    contexts = _contexts(PROMPTS[:1])
    u, _ = _videos(batch=1, frames=2, height=14, width=11, seed=5)
    videos = (u.double() / 127.5 - 1.0).transpose(1, 2).contiguous().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: reward(v, contexts).scores, (videos,), eps=1e-6, atol=1e-6,
                                    fast_mode=True)
    grad, = torch.autograd.grad(reward(videos, contexts).scores.sum(), videos)
    assert grad.abs().sum() > 0


def test_prompts_encoded_once_per_unique_prompt(clip_dir):
    reward = ClipScoreReward(_config(), ClipScoreReward.Options(model_path=clip_dir))
    model = reward.backbone.model
    encoded = []
    original = model.get_text_features

    def counting(**kwargs):
        encoded.append(kwargs["input_ids"].shape[0])
        return original(**kwargs)

    model.get_text_features = counting
    _, videos = _videos(batch=3)
    assert reward.prepare(_contexts(PROMPTS)).all()
    reward(videos.float(), _contexts(PROMPTS))
    reward(videos.float(), _contexts(PROMPTS[::-1]))
    assert sum(encoded) == 2  # "a cat on a red sofa" and "two dogs running!", once


def test_empty_prompt_is_invalid(clip_dir):
    reward = PickScoreReward(_config(), PickScoreReward.Options(model_path=clip_dir))
    contexts = _contexts(["a cat", "  "])
    assert reward.prepare(contexts).tolist() == [True, False]
    _, videos = _videos(batch=2)
    out = reward(videos.float(), contexts)
    assert out.valid.tolist() == [True, False]
    assert out.metrics["samples_without_prompt"] == 1.0
    assert out.metrics["pickscore_mean"] == pytest.approx(float(out.scores[0]))


# --------------------------------------------------------------------------- aesthetic


def _head_state(in_dim, seed, relu=False):
    """The LAION aesthetic predictor v2 layout (1024-128-64-16-1, dropout in between) with random weights;
    with ``relu`` the reluMSE variant's indices (Linear, ReLU, Dropout, ...)."""
    g = torch.Generator().manual_seed(seed)
    dims = [in_dim, 1024, 128, 64, 16, 1]
    indices = [0, 3, 6, 9, 11] if relu else [0, 2, 4, 6, 7]
    state = {}
    for index, (a, b) in zip(indices, zip(dims[:-1], dims[1:])):
        state[f"layers.{index}.weight"] = torch.randn(b, a, generator=g) / np.sqrt(a)
        state[f"layers.{index}.bias"] = torch.randn(b, generator=g) * 0.1
    return state


@pytest.mark.parametrize("fmt,relu", [("pth", False), ("safetensors", False), ("pth", True)])
def test_aesthetic_equals_hand_computation(clip_dir, reference, tmp_path, fmt, relu):
    state = _head_state(16, seed=7, relu=relu)
    path = tmp_path / f"head.{fmt}"
    if fmt == "pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file(state, str(path))
    frames_u8, videos = _videos(batch=2)
    image, _, _ = _reference_embeddings(reference, frames_u8, PROMPTS[:2])
    x = image.numpy()
    names = sorted({k.rsplit(".", 1)[0] for k in state}, key=lambda k: int(k.split(".")[1]))
    for i, name in enumerate(names):
        if i and relu:
            x = np.maximum(x, 0.0)
        x = x @ state[f"{name}.weight"].double().numpy().T + state[f"{name}.bias"].double().numpy()
    expected = torch.from_numpy(x[..., 0].mean(1))

    options = build_options("reward", "aesthetic", AestheticReward,
                            {"model_path": clip_dir, "head_path": str(path),
                             "head_activation": "relu" if relu else "none"})
    reward = _double(AestheticReward(_config(), options))
    reward.head.double()
    out = reward(videos, _contexts(["", ""]))  # the aesthetic score needs no prompt
    assert out.valid.all() and "samples_without_prompt" not in out.metrics
    # the reference's pixels are the processor's float32 ones; the rest is float64
    torch.testing.assert_close(out.scores, expected, atol=1e-6, rtol=0)


def test_aesthetic_gradient_matches_finite_differences(clip_dir, tmp_path):
    torch.save(_head_state(16, seed=8), tmp_path / "head.pth")
    reward = _double(AestheticReward(_config(), AestheticReward.Options(model_path=clip_dir,
                                                                         head_path=str(tmp_path / "head.pth"))))
    reward.head.double()
    u, _ = _videos(batch=1, frames=2, height=12, width=13, seed=6)
    videos = (u.double() / 127.5 - 1.0).transpose(1, 2).contiguous().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: reward(v, _contexts([""])).scores, (videos,), eps=1e-6, atol=1e-6,
                                    fast_mode=True)


@pytest.mark.parametrize("state,message", [
    ({"layers.0.weight": torch.zeros(1, 16), "layers.0.bias": torch.zeros(1), "other": torch.zeros(1)},
     "unexpected key 'other'"),
    ({"layers.0.weight": torch.zeros(4, 16), "layers.0.bias": torch.zeros(4)}, "gives 4 values, not 1 score"),
    ({"layers.0.weight": torch.zeros(8, 16), "layers.0.bias": torch.zeros(8), "layers.2.weight": torch.zeros(1, 9),
      "layers.2.bias": torch.zeros(1)}, "layer 1 takes 9 features but layer 0 gives 8"),
    ({"weight": torch.zeros(1, 768), "bias": torch.zeros(1)}, "takes 768-d embeddings but the CLIP"),
])
def test_aesthetic_rejects_other_heads(clip_dir, tmp_path, state, message):
    torch.save(state, tmp_path / "head.pth")
    reward = AestheticReward(_config(), AestheticReward.Options(model_path=clip_dir,
                                                                head_path=str(tmp_path / "head.pth")))
    with pytest.raises(ValueError, match="reward.head_path") as info:
        reward.head
    assert message in str(info.value)


# --------------------------------------------------------------------------- the step cache


def test_two_rewards_share_preprocessed_pixels(clip_dir, tmp_path):
    """clip_score and aesthetic on one micro-batch: the pixels are computed once; the scores are those
    each reward gives alone. A processor with another mean gets its own pixels."""
    torch.save(_head_state(16, seed=9), tmp_path / "head.pth")
    other_dir = _write_clip(tmp_path / "other", mean=[0.5, 0.5, 0.5], seed=1)
    rewards = [ClipScoreReward(_config(), ClipScoreReward.Options(model_path=clip_dir)),
               AestheticReward(_config(), AestheticReward.Options(model_path=clip_dir,
                                                                  head_path=str(tmp_path / "head.pth"))),
               HpsReward(_config(), HpsReward.Options(model_path=other_dir))]
    _, videos = _videos(batch=2)
    videos = videos.float()
    contexts = _contexts(PROMPTS[:2])
    alone = [r(videos, contexts).scores for r in rewards]  # each with a fresh cache

    cache = StepCache()
    for r in rewards:
        r.cache = cache
    shared = [r(videos, contexts).scores for r in rewards]
    name = rewards[0].backbone.pixels.cache_name + "/grad=False"
    assert name.startswith("clip_pixels_32_")
    assert cache.computed[name] == 1 and cache.hits[name] == 1
    other = rewards[2].pixels.cache_name + "/grad=False"
    assert other != name and cache.computed[other] == 1 and other not in cache.hits
    for a, b in zip(alone, shared):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_pixels_computed_without_gradient_never_serve_a_reward_that_trains(clip_dir, tmp_path):
    """A logged-only reward (scored under no_grad) first, a weighted one second, one shared cache: the
    second still gets its gradient, equal to its gradient alone."""
    torch.save(_head_state(16, seed=9), tmp_path / "head.pth")
    logged = AestheticReward(_config(), AestheticReward.Options(model_path=clip_dir, head_path=str(tmp_path / "head.pth")))
    trained = ClipScoreReward(_config(), ClipScoreReward.Options(model_path=clip_dir))
    _, videos = _videos(batch=2)
    contexts = _contexts(PROMPTS[:2])
    alone = videos.float().clone().requires_grad_(True)
    (want,) = torch.autograd.grad(trained(alone, contexts).scores.sum(), alone)
    shared = videos.float().clone().requires_grad_(True)
    cache = StepCache()
    logged.cache = trained.cache = cache
    with torch.no_grad():
        logged(shared, contexts)
    (got,) = torch.autograd.grad(trained(shared, contexts).scores.sum(), shared)
    torch.testing.assert_close(got, want)
    assert float(got.abs().sum()) > 0


# --------------------------------------------------------------------------- user errors and --check


@pytest.mark.parametrize("cls", [ClipScoreReward, AestheticReward, PickScoreReward, HpsReward])
def test_missing_model_path_is_one_line_naming_the_key(cls):
    for call in (lambda: cls(_config(), cls.Options()), lambda: cls.check(_config(), cls.Options())):
        with pytest.raises(ConfigError) as info:
            call()
        text = str(info.value)
        assert text.startswith("reward.model_path: not set") and "\n" not in text


def test_missing_files_name_key_and_path(clip_dir, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(f"reward.model_path: no such directory: {missing}")):
        ClipScoreReward(_config(), ClipScoreReward.Options(model_path=str(missing)))
    checkpoint = tmp_path / "HPS_v2.1_compressed.pt"
    checkpoint.write_bytes(b"not read")
    with pytest.raises(ConfigError, match="reward.model_path: .*is a file.*open_clip ViT-H-14 checkpoint"):
        HpsReward(_config(), HpsReward.Options(model_path=str(checkpoint)))
    open_clip_dir = tmp_path / "open_clip"
    open_clip_dir.mkdir()
    (open_clip_dir / "open_clip_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no config.json .*open_clip checkpoint"):
        HpsReward(_config(), HpsReward.Options(model_path=str(open_clip_dir)))
    with pytest.raises(FileNotFoundError, match="reward.head_path: no such file"):
        AestheticReward(_config(), AestheticReward.Options(model_path=clip_dir, head_path=str(tmp_path / "x.pth")))
    with pytest.raises(ConfigError, match="reward.head_path: not set"):
        AestheticReward(_config(), AestheticReward.Options(model_path=clip_dir))
    with pytest.raises(ConfigError, match=r"reward.dtype: must be one of"):
        build_options("reward", "pickscore", PickScoreReward, {"model_path": clip_dir, "dtype": "float64"})


def test_pickscore_processor_from_another_directory(clip_dir, reference, tmp_path):
    """PickScore_v1 ships the model; its processor is CLIP-ViT-H-14's: without processor_path the
    error says so, with it the score is the model's own logits."""
    import shutil

    model_only = tmp_path / "pickscore"
    model_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(f"{clip_dir}/{name}", model_only / name)
    with pytest.raises(FileNotFoundError,
                       match="reward.model_path: no image processor config .*set reward.processor_path"):
        PickScoreReward(_config(), PickScoreReward.Options(model_path=str(model_only)))
    reward = _double(PickScoreReward(_config(), PickScoreReward.Options(model_path=str(model_only),
                                                                        processor_path=clip_dir)))
    frames_u8, videos = _videos(batch=3)
    _, _, logits = _reference_embeddings(reference, frames_u8, PROMPTS)
    torch.testing.assert_close(reward(videos, _contexts(PROMPTS)).scores, logits.mean(1), atol=1e-5, rtol=0)


def test_published_layout_loads(clip_dir, tmp_path):
    """The layout of the published checkpoints (openai/clip-vit-large-patch14, laion's CLIP-H):
    preprocessor_config.json with integer sizes, the tokenizer as vocab.json + merges.txt; scores
    equal those of the same model saved by transformers 5."""
    import json
    import shutil

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        shutil.copy(f"{clip_dir}/{name}", legacy / name)
    processor = json.loads(open(f"{clip_dir}/processor_config.json").read())["image_processor"]
    processor.update(size=32, crop_size=32, feature_extractor_type="CLIPFeatureExtractor")
    (legacy / "preprocessor_config.json").write_text(json.dumps(processor))
    model = json.loads(open(f"{clip_dir}/tokenizer.json").read())["model"]
    (legacy / "vocab.json").write_text(json.dumps(model["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (legacy / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")

    _, videos = _videos(batch=3)
    expected = ClipScoreReward(_config(), ClipScoreReward.Options(model_path=clip_dir))(videos.float(),
                                                                                        _contexts(PROMPTS))
    reward = ClipScoreReward(_config(), ClipScoreReward.Options(model_path=str(legacy)))
    assert reward.files.tokenizer.endswith("vocab.json")
    assert reward.backbone.pixels == PixelSpec(32, None, None, (32, 32), tuple(processor["image_mean"]),
                                               tuple(processor["image_std"]), "bicubic")
    assert reward.backbone.tokenizer("a cat")["input_ids"] == [0, model["vocab"]["a</w>"], model["vocab"]["cat</w>"], 1]
    torch.testing.assert_close(reward(videos.float(), _contexts(PROMPTS)).scores, expected.scores, atol=0, rtol=0)


def test_check_finds_files_without_loading(clip_dir, tmp_path):
    """``run --check`` reads no weights: a directory whose weights file is garbage passes it (and
    relative paths resolve against the config's base directory)."""
    import shutil

    fake = tmp_path / "fake"
    shutil.copytree(clip_dir, fake)
    (fake / "model.safetensors").write_bytes(b"garbage")
    (tmp_path / "head.safetensors").write_bytes(b"garbage")
    config = config_from_dict({}, base_dir=str(tmp_path))
    lines = AestheticReward.check(config, AestheticReward.Options(model_path="fake", head_path="head.safetensors"))
    assert lines == [f"clip model {fake} (model.safetensors)", f"aesthetic head {tmp_path / 'head.safetensors'}"]
