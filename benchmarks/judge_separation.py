"""How well the judges tell the right person from the others on the demo's own clips (ceilings, no
training): ``python benchmarks/judge_separation.py`` after ``python -m rewardfl.demo``.

For each judge (``face_dlib`` with the HOG and with the CNN detector, and the demo's ``yunet_strict``:
YuNet + SFace, the training reward's recognizer) and each set of videos, every video is scored
against every clip's reference with the judge's ``evaluate`` (as ``rewardfl.evaluate`` does):

* ``held-out, the clip itself``: each held-out reference clip as the video (the upper bound);
* ``held-out, tiny VAE round trip``: each held-out clip encoded and decoded by the demo's tiny Wan
  VAE (the best a generated video of this model can look);
* ``training, other clip``: each training clip as the video, its own reference being the same
  photo's *other* clip (another camera motion), the other people's clips as the others.

Per judge: the mean score against the own reference and against the others, specificity (own minus
the mean of the others; mean and smallest over videos), how many videos score their own reference
above every other, frames with a face; for ``face_dlib`` also the mean Euclidean descriptor distance
(dlib's own metric) to the own reference and to the nearest other. CPU only; a few minutes.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rewardfl.evaluation.evaluation import build_judges, judge_scores  # noqa: E402
from rewardfl.evaluation.split import eval_dataset  # noqa: E402
from rewardfl.interfaces import SampleContext  # noqa: E402
from rewardfl.registry import load_resolved  # noqa: E402

JUDGES = ("eval.judges=[{name: face_dlib, label: dlib_hog}, {name: face_dlib, label: dlib_cnn, detector: cnn, "
          "upsample: 0}, {name: face_identity, label: yunet_strict, "
          "detector: ../judge_models/face_detection_yunet_2023mar.onnx, "
          "recognizer: ../judge_models/face_recognition_sface_2021dec.onnx, det_size: 256, reference_cache_dir: none}]")


def separation(judge, items, videos, own, others) -> dict:
    """``own[i]``: the reference clip of video i's person; ``others[i]``: the other people's clips."""
    contexts = [SampleContext(it["sample_id"], it["video"], it["path"], it["prompt"]) for it in items]
    judge.prepare(contexts)
    s = np.full((len(videos), len(items)), np.nan)
    dist = np.full((len(videos), len(items)), np.nan)
    faces = frames = 0
    start = time.perf_counter()
    for i, video in enumerate(videos):
        scores, details = judge_scores(judge, video, contexts)
        s[i] = [np.nan if x is None else x for x in scores]
        dist[i] = [np.nan if d.get("distance") is None else d["distance"] for d in details]
        faces, frames = faces + details[own[i]].get("frames_with_face", 0), frames + details[own[i]].get("frames", 0)
    seconds = (time.perf_counter() - start) / len(videos)
    rows = [i for i in range(len(videos)) if np.isfinite(s[i, own[i]]) and np.isfinite(s[i, others[i]]).any()]
    spec = np.array([s[i, own[i]] - np.nanmean(s[i, others[i]]) for i in rows])
    return {
        "videos": f"{len(rows)}/{len(videos)}",
        "own": np.mean([s[i, own[i]] for i in rows]), "others": np.mean([np.nanmean(s[i, others[i]]) for i in rows]),
        "specificity": spec.mean(), "min_specificity": spec.min(),
        "own_highest": f"{sum(s[i, own[i]] > np.nanmax(s[i, others[i]]) for i in rows)}/{len(rows)}",
        "frames_with_face": f"{faces}/{frames}",
        "distance_own": np.mean([dist[i, own[i]] for i in rows]) if np.isfinite(dist).any() else None,
        "distance_nearest_other": np.mean([np.nanmin(dist[i, others[i]]) for i in rows]) if np.isfinite(dist).any()
        else None,
        "seconds_per_video": seconds,
    }


def main() -> int:
    cfg, plugins = load_resolved("examples/demo.yaml", [JUDGES])
    judges = build_judges(cfg, "cpu")
    held_set = eval_dataset(cfg)
    held = [held_set[i] for i in range(len(held_set))]
    train_set = eval_dataset(cfg, cfg.resolve_path(cfg.data.metadata_path))
    train = [train_set[i] for i in range(len(train_set))]
    model = plugins["model"](cfg, cfg.model, device="cpu")
    with torch.no_grad():
        round_trip = [model.decode(model.vae.encode([it["video"].transpose(0, 1)], device="cpu").to(model.dtype))[0]
                      .float().clamp(-1, 1) for it in held]
    n = len(held)
    person = [i // 2 for i in range(len(train))]  # the demo's training set: two clips per photo, in order
    cases = [
        ("held-out, the clip itself", held, [it["video"].transpose(0, 1) for it in held], list(range(n)),
         [[j for j in range(n) if j != i] for i in range(n)]),
        ("held-out, tiny VAE round trip", held, round_trip, list(range(n)),
         [[j for j in range(n) if j != i] for i in range(n)]),
        ("training, other clip", train, [it["video"].transpose(0, 1) for it in train],
         [next(j for j in range(len(train)) if person[j] == person[i] and j != i) for i in range(len(train))],
         [[j for j in range(len(train)) if person[j] != person[i]] for i in range(len(train))]),
    ]
    print(f"held-out clips {n}, training clips {len(train)}, frames {tuple(held[0]['video'].shape)}")
    print("| videos | judge | n | own | others | specificity (min) | own highest | frames with face | "
          "distance own / nearest other | s/video |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for title, items, videos, own, others in cases:
        for label, judge in judges:
            r = separation(judge, items, videos, own, others)
            dist = (f"{r['distance_own']:.3f} / {r['distance_nearest_other']:.3f}" if r["distance_own"] is not None
                    else "")
            print(f"| {title} | {label} | {r['videos']} | {r['own']:.3f} | {r['others']:.3f} | "
                  f"{r['specificity']:.3f} ({r['min_specificity']:.3f}) | {r['own_highest']} | {r['frames_with_face']} | "
                  f"{dist} | {r['seconds_per_video']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
