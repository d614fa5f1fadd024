"""face_align (rewardfl.ops.align) against OpenCV, scikit-image, float64 gradcheck
and its own two paths.

References: ``cv2.warpAffine`` with ``M`` from ``skimage.transform.SimilarityTransform`` (what
insightface's ``norm_crop`` does), hand-built similarity transforms, and the pure-torch path
(``grid_sample``) as a second oracle for the compiled kernels.
"""

import numpy as np
import pytest
import torch

from rewardfl.ops import align, cuda_compiled, face_align

cv2 = pytest.importorskip("cv2")
skimage_data = pytest.importorskip("skimage.data")
skimage_transform = pytest.importorskip("skimage.transform")

HAS_EXTENSION = align._EXTENSION
needs_extension = pytest.mark.skipif(not HAS_EXTENSION, reason="rewardfl._C has no face_align op (not built)")
needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and HAS_EXTENSION and cuda_compiled()),
    reason="needs a CUDA device and rewardfl._C built with CUDA",
)
BACKENDS = ["torch", pytest.param("extension", marks=needs_extension)]

# insightface.utils.face_align.arcface_dst, written out here independently of the align module.
ARCFACE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)
# skimage.data.astronaut(), 512x512: eye centres, nose tip, mouth corners, measured once by eye
# on an 8x enlarged crop of the face (pixel centres at integers).
ASTRONAUT_LANDMARKS = np.array([[203.0, 101.5], [246.0, 103.0], [223.0, 127.0], [204.0, 140.5], [243.0, 141.0]])


def insightface_template(size):
    """insightface estimate_norm's rule, for the reference side of the tests."""
    if size % 112 == 0:
        return ARCFACE_112 * (size / 112.0)
    ratio = size / 128.0
    return ARCFACE_112 * ratio + np.array([8.0 * ratio, 0.0])


def skimage_matrix(landmarks, template):
    return skimage_transform.SimilarityTransform.from_estimate(np.asarray(landmarks, np.float64), template).params[:2]


@pytest.fixture(scope="module")
def astronaut():
    return skimage_data.astronaut()  # (512, 512, 3) uint8 RGB


def to_frames(image_uint8):
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(image_uint8).permute(2, 0, 1)[None].float() / 127.5 - 1


def small_template(size):
    return torch.tensor(ARCFACE_112 * (size / 112.0))


def random_faces(num_frames, num_faces, height, width, size, seed, dtype=torch.float64):
    """Landmarks: the scaled template, rotated, scaled and moved so that crops fall inside,
    across and outside the frame edges."""
    g = torch.Generator().manual_seed(seed)
    template = small_template(size)
    angle = (torch.rand(num_faces, generator=g, dtype=torch.float64) - 0.5) * 1.2
    scale = 0.6 + 1.2 * torch.rand(num_faces, generator=g, dtype=torch.float64)
    rot = torch.stack(
        [torch.stack([angle.cos(), -angle.sin()], -1), torch.stack([angle.sin(), angle.cos()], -1)], dim=1
    )
    centre = torch.stack(
        [
            torch.rand(num_faces, generator=g, dtype=torch.float64) * (width + size) - size / 2,
            torch.rand(num_faces, generator=g, dtype=torch.float64) * (height + size) - size / 2,
        ],
        dim=-1,
    )
    pts = (template - template.mean(0)) @ rot.transpose(1, 2) * scale[:, None, None] + centre[:, None, :]
    pts = pts + 0.3 * torch.randn(pts.shape, generator=g, dtype=torch.float64)
    frame_index = torch.randint(0, num_frames, (num_faces,), generator=g)
    return pts.to(dtype), frame_index


# --------------------------------------------------------------------------- real photo vs OpenCV


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [112, 128])
def test_astronaut_crop_matches_opencv_warp_affine(astronaut, backend, size):
    template = insightface_template(size)
    matrix = skimage_matrix(ASTRONAUT_LANDMARKS, template)
    expected = cv2.warpAffine(astronaut, matrix, (size, size)).astype(np.float32)

    landmarks = torch.tensor(ASTRONAUT_LANDMARKS, dtype=torch.float32)[None]
    crops, transforms = face_align(
        to_frames(astronaut), landmarks, torch.tensor([0]), size=size, mean=0, std=1, backend=backend
    )
    assert crops.shape == (1, 3, size, size) and crops.dtype == torch.float32
    got = crops[0].permute(1, 2, 0).numpy()
    diff = np.abs(got - expected)[2:-2, 2:-2]
    assert diff.mean() < 0.5 and diff.max() < 2, (diff.mean(), diff.max())
    np.testing.assert_allclose(transforms[0].numpy(), matrix, atol=1e-5)

    _, transforms64 = face_align(
        to_frames(astronaut), landmarks.double(), torch.tensor([0]), size=size, backend=backend
    )
    assert transforms64.dtype == torch.float64
    np.testing.assert_allclose(transforms64[0].numpy(), matrix, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_normalisation_range_and_channel_order(astronaut, backend):
    landmarks = torch.tensor(ASTRONAUT_LANDMARKS)[None]
    matrix = skimage_matrix(ASTRONAUT_LANDMARKS, insightface_template(112))
    expected = cv2.warpAffine(astronaut.astype(np.float32), matrix, (112, 112))  # float: no rounding
    expected = torch.from_numpy(expected).permute(2, 0, 1)

    arcface, _ = face_align(to_frames(astronaut), landmarks, torch.tensor([0]), backend=backend)
    torch.testing.assert_close(arcface[0], (expected - 127.5) / 127.5, atol=1e-4, rtol=0)

    frames_255 = torch.from_numpy(astronaut).permute(2, 0, 1)[None].float()
    mean, std = (10.0, 20.0, 30.0), (2.0, 4.0, 8.0)
    bgr, _ = face_align(
        frames_255, landmarks, torch.tensor([0]), input_range=(0, 255), channel_order="bgr", mean=mean, std=std,
        backend=backend,
    )
    flipped = expected.flip(0)
    want = (flipped - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    torch.testing.assert_close(bgr[0], want, atol=2e-3, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_border_is_black_like_opencv(backend):
    # A face near the top-left corner: part of the crop lies outside the frame.
    image = np.full((64, 80, 3), 200, np.uint8)
    image[:, :, 1] = 90
    landmarks = ARCFACE_112 * 0.4 - 5.0
    matrix = skimage_matrix(landmarks, insightface_template(112))
    expected = cv2.warpAffine(image.astype(np.float32), matrix, (112, 112))
    crops, _ = face_align(
        to_frames(image), torch.tensor(landmarks)[None], torch.tensor([0]), mean=0, std=1, backend=backend
    )
    got = crops[0].permute(1, 2, 0).numpy()
    assert (expected == 0).all(axis=-1).sum() > 1000  # the check covers a real border
    np.testing.assert_allclose(got, expected, atol=2e-3)


# --------------------------------------------------------------------------- transforms


def test_transforms_recover_a_known_similarity():
    # Landmarks = template pushed through the inverse of a hand-made similarity: the estimate
    # must be that similarity exactly (a least-squares fit with zero residual).
    angle, scale, shift = 0.3, 0.25, np.array([321.5, 87.25])
    c, s = np.cos(angle), np.sin(angle)
    forward = np.array([[scale * c, -scale * s, 0.0], [scale * s, scale * c, 0.0]])
    forward[:, 2] = -forward[:, :2] @ shift  # frame pixel shift -> crop origin
    template = insightface_template(112)
    inverse_linear = np.linalg.inv(forward[:, :2])
    landmarks = (template - forward[:, 2]) @ inverse_linear.T
    frames = torch.zeros(1, 3, 500, 600)
    _, transforms = face_align(frames, torch.tensor(landmarks)[None], torch.tensor([0]), backend="torch")
    np.testing.assert_allclose(transforms[0].numpy(), forward, atol=1e-10)


def test_arcface_template_sizes():
    for size in (112, 128, 224, 256):
        np.testing.assert_allclose(align.arcface_template(size).numpy(), insightface_template(size), atol=1e-12)
    # At 128 the 112 template is moved 8 pixels right, not rescaled (insightface's estimate_norm).
    np.testing.assert_allclose(align.arcface_template(128).numpy(), ARCFACE_112 + [8.0, 0.0], atol=1e-12)


def test_similarity_transforms_match_skimage_batched():
    landmarks, _ = random_faces(1, 20, 300, 400, 112, seed=3)
    template = insightface_template(112)
    got = align.similarity_transforms(landmarks, torch.tensor(template))
    for i in range(landmarks.shape[0]):
        np.testing.assert_allclose(got[i].numpy(), skimage_matrix(landmarks[i].numpy(), template), atol=1e-9)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    torch.manual_seed(0)
    frames = (torch.rand(2, 3, 12, 14, dtype=torch.float64) * 2 - 1).requires_grad_()
    landmarks, frame_index = random_faces(2, 3, 12, 14, 8, seed=1)

    def fn(x):
        return face_align(
            x, landmarks, frame_index, size=8, template=small_template(8), channel_order="bgr", mean=(1, 2, 3),
            std=(40, 50, 60), backend=backend,
        )[0]

    assert torch.autograd.gradcheck(fn, (frames,), eps=1e-6, atol=1e-7)


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_extension_matches_torch_many_faces(dtype):
    num_frames, height, width, size = 6, 45, 61, 16
    torch.manual_seed(1)
    frames = torch.rand(num_frames, 3, height, width, dtype=dtype) * 2 - 1
    landmarks, frame_index = random_faces(num_frames, 40, height, width, size, seed=2)
    frame_index[frame_index == 4] = 3  # frame 4 has no face; frame 3 has many
    kwargs = dict(size=size, template=small_template(size), channel_order="bgr", mean=(5, 6, 7), std=(30, 40, 50))
    results = {}
    for backend in ("extension", "torch"):
        x = frames.clone().requires_grad_()
        crops, transforms = face_align(x, landmarks, frame_index, backend=backend, **kwargs)
        weights = torch.linspace(-1, 1, crops.numel(), dtype=crops.dtype).view_as(crops)
        (crops * weights).sum().backward()
        results[backend] = crops.detach(), transforms, x.grad
    (c_ext, t_ext, g_ext), (c_ref, t_ref, g_ref) = results["extension"], results["torch"]
    tol = dict(atol=1e-9, rtol=1e-9) if dtype == torch.float64 else dict(atol=2e-3, rtol=1e-5)
    assert torch.isfinite(c_ext).all()
    torch.testing.assert_close(t_ext, t_ref, atol=0, rtol=0)
    torch.testing.assert_close(c_ext, c_ref, **tol)
    torch.testing.assert_close(g_ext, g_ref, **tol)
    assert (g_ext[4] == 0).all() and g_ext[3].abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_video_view_gives_the_same_crops_and_gradient(backend):
    # Frames as a (T, C, H, W) view of a (B, C, T, H, W) video, as the face reward passes them.
    video = torch.rand(2, 3, 4, 24, 28) * 2 - 1
    landmarks, frame_index = random_faces(4, 6, 24, 28, 16, seed=9, dtype=torch.float32)
    results = []
    for contiguous in (False, True):
        v = video.clone().requires_grad_()
        frames = v[1].permute(1, 0, 2, 3)
        frames = frames.contiguous() if contiguous else frames
        crops, _ = face_align(frames, landmarks, frame_index, size=16, template=small_template(16), backend=backend)
        crops.square().sum().backward()
        results.append((crops.detach(), v.grad))
    assert not video[1].permute(1, 0, 2, 3).is_contiguous()
    torch.testing.assert_close(results[0][0], results[1][0], atol=0, rtol=0)
    torch.testing.assert_close(results[0][1], results[1][1], atol=0, rtol=0)
    assert (results[0][1][0] == 0).all() and results[0][1][1].abs().sum() > 0


@needs_extension
def test_extension_bfloat16_frames_match_torch():
    num_frames, height, width, size = 3, 40, 50, 16
    torch.manual_seed(2)
    frames = (torch.rand(num_frames, 3, height, width) * 2 - 1).bfloat16()
    landmarks, frame_index = random_faces(num_frames, 9, height, width, size, seed=4, dtype=torch.float32)
    results = {}
    for backend in ("extension", "torch"):
        x = frames.clone().requires_grad_()
        crops, _ = face_align(x, landmarks, frame_index, size=size, template=small_template(size), backend=backend)
        crops.square().sum().backward()
        assert crops.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
        results[backend] = crops.detach(), x.grad.float()
    torch.testing.assert_close(results["extension"][0], results["torch"][0], atol=1e-4, rtol=1e-5)
    # gradients are rounded to bfloat16 (8 bits of mantissa)
    torch.testing.assert_close(results["extension"][1], results["torch"][1], atol=1e-2, rtol=1e-2)


@needs_extension
def test_cpu_backward_is_deterministic_across_thread_counts():
    frames = torch.rand(2, 3, 30, 30)
    landmarks, _ = random_faces(1, 12, 30, 30, 16, seed=5)
    frame_index = torch.zeros(12, dtype=torch.int64)  # many overlapping faces in one frame
    grads = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            x = frames.clone().requires_grad_()
            crops, _ = face_align(x, landmarks, frame_index, size=16, template=small_template(16), backend="extension")
            crops.sum().backward()
            grads.append(x.grad)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_faces_and_crops_outside_the_frame(backend):
    frames = torch.rand(3, 3, 20, 20, requires_grad=True)
    crops, transforms = face_align(
        frames, torch.zeros(0, 5, 2), torch.zeros(0, dtype=torch.int64), size=16, template=small_template(16),
        backend=backend,
    )
    assert crops.shape == (0, 3, 16, 16) and transforms.shape == (0, 2, 3)
    crops.sum().backward()
    assert frames.grad is not None and (frames.grad == 0).all()

    far = small_template(16)[None].float() + torch.tensor([500.0, -400.0])  # face far outside the frame
    x = frames.detach().clone().requires_grad_()
    crops, _ = face_align(
        x, far, torch.tensor([1]), size=16, template=small_template(16), mean=3, std=2, backend=backend
    )
    torch.testing.assert_close(crops, torch.full_like(crops, -1.5))  # p = 0 -> (0 - 3) / 2
    crops.sum().backward()
    assert (x.grad == 0).all()


# --------------------------------------------------------------------------- dispatcher, compile


def test_without_the_extension_auto_falls_back_to_torch(monkeypatch, astronaut):
    frames = to_frames(astronaut)
    landmarks = torch.tensor(ASTRONAUT_LANDMARKS, dtype=torch.float32)[None]
    expected, _ = face_align(frames, landmarks, torch.tensor([0]), backend="torch")
    monkeypatch.setattr(align, "_EXTENSION", False)
    got, _ = face_align(frames, landmarks, torch.tensor([0]))
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match="backend='extension' but rewardfl._C has no face_align kernel"):
        face_align(frames, landmarks, torch.tensor([0]), backend="extension")


@needs_extension
def test_opcheck_schema_fake_autograd_and_aot():
    landmarks, frame_index = random_faces(2, 3, 12, 14, 8, seed=6)
    transforms = align.similarity_transforms(landmarks, small_template(8))
    inverse = align._invert_similarity(transforms)
    frames = torch.rand(2, 3, 12, 14, dtype=torch.float64, requires_grad=True)
    args = (frames, inverse, frame_index, 8, [2, 1, 0], -1.0, [127.5, 127.5, 127.5], [-1.0, -1.0, -1.0])
    result = torch.library.opcheck(torch.ops.rewardfl.face_align.default, args)
    assert all(v == "SUCCESS" for v in result.values()), result


@needs_extension
def test_torch_compile_fullgraph_matches_eager():
    landmarks, frame_index = random_faces(2, 4, 20, 24, 16, seed=7)
    inverse = align._invert_similarity(align.similarity_transforms(landmarks, small_template(16)))

    def loss(frames):
        crops = torch.ops.rewardfl.face_align(frames, inverse, frame_index, 16, [0, 1, 2], -1.0, [1.0] * 3, [0.0] * 3)
        return (crops * crops).mean()

    frames = torch.rand(2, 3, 20, 24)
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    x_eager, x_compiled = frames.clone().requires_grad_(), frames.clone().requires_grad_()
    eager_value, compiled_value = loss(x_eager), compiled(x_compiled)
    eager_value.backward()
    compiled_value.backward()
    torch.testing.assert_close(compiled_value, eager_value)
    torch.testing.assert_close(x_compiled.grad, x_eager.grad)


# --------------------------------------------------------------------------- bad input


def _good():
    frames = torch.zeros(2, 3, 64, 64)
    landmarks = torch.tensor(ARCFACE_112 * 0.4 + 5, dtype=torch.float32)[None].repeat(2, 1, 1)
    return frames, landmarks, torch.tensor([0, 1])


def _with(**change):
    frames, landmarks, frame_index = _good()
    args = dict(frames=frames, landmarks=landmarks, frame_index=frame_index)
    kwargs = {k: v for k, v in change.items() if k not in args}
    args.update({k: v for k, v in change.items() if k in args})
    return args, kwargs


def _landmarks_with(fn):
    _, landmarks, _ = _good()
    landmarks = landmarks.clone()
    fn(landmarks)
    return landmarks


BAD_INPUTS = {
    "frames rank": (_with(frames=torch.zeros(3, 64, 64)), "frames must have shape"),
    "frames channels": (_with(frames=torch.zeros(2, 4, 64, 64)), "frames must have shape"),
    "frames dtype": (_with(frames=torch.zeros(2, 3, 64, 64, dtype=torch.uint8)), "frames must be float32"),
    "frames not a tensor": (_with(frames=np.zeros((2, 3, 64, 64), np.float32)), "frames must be a torch.Tensor"),
    "landmarks shape": (_with(landmarks=torch.zeros(2, 68, 2)), r"landmarks must have shape \(N, 5, 2\)"),
    "landmarks dtype": (_with(landmarks=torch.zeros(2, 5, 2, dtype=torch.int64)), "landmarks must be a floating"),
    "frame_index shape": (_with(frame_index=torch.tensor([0])), r"frame_index must have shape \(N,\)"),
    "frame_index dtype": (_with(frame_index=torch.tensor([0.0, 1.0])), "frame_index must be an integer"),
    "frame_index range": (_with(frame_index=torch.tensor([0, 2])), r"frame_index outside \[0, 2\) at face 1"),
    "frame_index negative": (_with(frame_index=torch.tensor([-1, 0])), r"frame_index outside \[0, 2\) at face 0"),
    "device mismatch": (_with(frames=torch.zeros(2, 3, 64, 64, device="meta")), "must be on one device"),
    "nan landmarks": (
        _with(landmarks=_landmarks_with(lambda t: t[1, 2, 0].fill_(float("nan")))),
        "non-finite landmarks at face 1",
    ),
    "inf landmarks": (
        _with(landmarks=_landmarks_with(lambda t: t[0, 0, 1].fill_(float("inf")))),
        "non-finite landmarks at face 0",
    ),
    "all equal": (_with(landmarks=_landmarks_with(lambda t: t[1].fill_(30.0))), "all five points coincide"),
    "collinear": (
        _with(landmarks=_landmarks_with(lambda t: t[0].copy_(torch.arange(10.0).view(5, 2) * 3.0))),
        "on one line",
    ),
    "size": (_with(size=100), "size divisible by 112 or 128"),
    "size type": (_with(size=112.0), "size must be a positive int"),
    "template shape": (_with(template=np.zeros((4, 2))), r"finite \(5, 2\) array"),
    "template name": (_with(template="vggface"), "template must be 'arcface'"),
    "input_range": (_with(input_range=(1, -1)), "low < high"),
    "channel_order": (_with(channel_order="rbg"), "channel_order must be 'rgb' or 'bgr'"),
    "std zero": (_with(std=(1, 0, 1)), "std must be non-zero"),
    "mean length": (_with(mean=(1, 2)), "mean must be a number or 3 numbers"),
    "backend": (_with(backend="cuda"), "backend must be"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_raises_value_error(case):
    (args, kwargs), message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        face_align(args["frames"], args["landmarks"], args["frame_index"], **kwargs)


def test_landmark_problems_flags_the_faces_face_align_rejects():
    good = torch.tensor(ARCFACE_112)
    landmarks = torch.stack([
        good,
        good * float("nan"),
        torch.full((5, 2), 7.0),
        torch.arange(10.0).view(5, 2),  # on the line y = x + 1
        good * 1e-2,  # a tiny (0.4 pixel) face is still a face
    ])
    problems = align.landmark_problems(landmarks)
    assert problems.tolist() == [
        [False, True, False, False, False],
        [False, False, True, False, False],
        [False, False, False, True, False],
    ]


def test_good_input_of_the_bad_input_cases_passes():
    frames, landmarks, frame_index = _good()
    crops, _ = face_align(frames, landmarks, frame_index)
    assert crops.shape == (2, 3, 112, 112) and torch.isfinite(crops).all()


def test_nearly_degenerate_but_valid_face_gives_finite_crops():
    # A tiny (2-pixel) face is odd but valid: finite crops, no error.
    frames = torch.rand(1, 3, 32, 32)
    landmarks = torch.tensor(ARCFACE_112 / 56.0 + 10.0, dtype=torch.float32)[None]
    for backend in ("torch",) + (("extension",) if HAS_EXTENSION else ()):
        crops, transforms = face_align(frames, landmarks, torch.tensor([0]), backend=backend)
        assert torch.isfinite(crops).all() and torch.isfinite(transforms).all()


# --------------------------------------------------------------------------- CUDA vs CPU


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_cpu_forward_and_backward(dtype):
    num_frames, height, width, size = 5, 120, 160, 112
    torch.manual_seed(3)
    frames = (torch.rand(num_frames, 3, height, width) * 2 - 1).to(dtype)
    landmarks, frame_index = random_faces(num_frames, 17, height, width, size, seed=8, dtype=torch.float32)
    out = {}
    for device in ("cpu", "cuda"):
        x = frames.to(device).requires_grad_()
        crops, _ = face_align(x, landmarks.to(device), frame_index.to(device), backend="extension")
        weights = torch.linspace(-1, 1, crops.numel(), device=device).view_as(crops)
        (crops * weights).sum().backward()
        out[device] = crops.detach().cpu(), x.grad.float().cpu()
    torch.testing.assert_close(out["cuda"][0], out["cpu"][0], atol=2e-3, rtol=1e-5)
    tol = dict(atol=1e-3, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(out["cuda"][1], out["cpu"][1], **tol)


@needs_cuda
def test_cuda_backward_is_flagged_nondeterministic():
    frames = torch.rand(1, 3, 32, 32, device="cuda", requires_grad=True)
    landmarks = torch.tensor(ARCFACE_112 / 4 + 2, dtype=torch.float32, device="cuda")[None]
    crops, _ = face_align(frames, landmarks, torch.tensor([0], device="cuda"), backend="extension")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="face_align_backward_cuda"):
            crops.sum().backward()
    finally:
        torch.use_deterministic_algorithms(previous)
