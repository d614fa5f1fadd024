"""The plugin kinds the core knows: samplers, models, rewards and training algorithms.

The core (config, registry, training loop, checkpointing) talks to plugins only
through these classes. Concrete plugins live in ``rewardfl.samplers``,
``rewardfl.models`` and ``rewardfl.rewards`` (or in third-party packages) and
are found through the entry-point groups ``rewardfl.samplers``,
``rewardfl.models`` and ``rewardfl.rewards``.

Every plugin class has:

* ``Options``: a dataclass of its own options. The config section of its kind
  (``sampler:``, ``model:``, ``reward:``) is validated against it, with unknown
  keys, wrong types and did-you-mean reported by ``rewardfl.config``.
* ``__init__(self, config, options, **runtime)``: ``config`` is the whole
  validated :class:`rewardfl.config.TrainConfig` (the core's keys such as
  ``num_inference_steps``), ``options`` an instance of ``Options`` (a field with
  ``metadata={"top_level": True}``, such as the Wan model's ``model_paths``, may
  also be written at the top level of the YAML and arrives here); ``runtime``
  carries things such as ``device``.
  Constructors must stay cheap enough for ``--check`` where possible and must
  raise ``ValueError``/``FileNotFoundError`` naming the config key for user
  errors.

Shapes: latents and videos ``(B, C, T, H, W)``; frames ``(F, 3, H, W)``.
Decoded videos are float in [-1, 1].
"""

from __future__ import annotations

import dataclasses
import os
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Iterator, Optional, Sequence

import torch

from .config import build_plugin_options

__all__ = [
    "NoOptions",
    "StepPlan",
    "Sampler",
    "VideoModel",
    "DeviceTarget",
    "SampleContext",
    "RewardOutput",
    "StepCache",
    "Reward",
    "MicroBatch",
    "Algorithm",
    "require_gradient",
]


@dataclasses.dataclass
class NoOptions:
    """Options of a plugin that takes none (its config section must be empty)."""


# --------------------------------------------------------------------------- samplers


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """One step of a sampling trajectory, decided before sampling starts.

    ``index`` runs 0..N-1 over the schedule (0 = noisiest). ``sigma`` and
    ``sigma_next`` are the (shifted) noise levels before and after the update,
    ``timestep = 1000 * sigma`` is what the model is conditioned on. ``expert``
    names the model expert that runs this step (see ``VideoModel.experts``).
    ``grad`` says the step runs with autograd on; ``last`` says sampling stops
    after it (its ``sigma_next`` is then 0: the update jumps to the clean end).
    """

    index: int
    timestep: float
    sigma: float
    sigma_next: float
    expert: str
    grad: bool
    last: bool

    @property
    def dt(self) -> float:
        return self.sigma_next - self.sigma


class Sampler(ABC):
    """Owns the noise schedule, the starting noise, the update rule and the regulariser.

    Which steps run, carry gradient and use which expert is training policy
    (``rewardfl.sampling.policy``), computed from ``sigmas``/``timesteps``."""

    Options: ClassVar[type] = NoOptions

    #: (N + 1,) float64 noise levels, sigmas[0] = 1 (pure noise), sigmas[N] = 0.
    sigmas: torch.Tensor
    #: (N,) float64 model timesteps, 1000 * sigmas[:N].
    timesteps: torch.Tensor
    #: True when ``step`` needs ``v_uncond`` (classifier-free guidance): the loop then also runs the
    #: model on the conditioning of ``negative_prompt``
    uses_guidance: bool = False
    negative_prompt: str = ""

    @abstractmethod
    def initial_noise(
        self,
        shape: Sequence[int],
        *,
        sample_seeds: Sequence[int],
        step: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Starting noise ``(B, *shape)``, reproducible from (sample seed, training step)."""

    @abstractmethod
    def step(
        self,
        x: torch.Tensor,
        v: torch.Tensor,
        plan: StepPlan,
        *,
        v_uncond: Optional[torch.Tensor] = None,
        inject_mask: Optional[torch.Tensor] = None,
        inject_latent: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """One update ``x -> x_next`` (differentiable)."""

    def regularizer(self, v: torch.Tensor, v_ref: torch.Tensor, plan: StepPlan) -> torch.Tensor:
        """0-dim fp32 penalty keeping ``v`` near the base model's ``v_ref`` at this step."""
        sigma = max(plan.sigma, 1e-6)
        return ((v.float() - v_ref.float()) ** 2).mean() / (2.0 * sigma * sigma)


# --------------------------------------------------------------------------- models


@dataclasses.dataclass(frozen=True)
class DeviceTarget:
    """The device a model is built for, when that is not the device its tensors are on.

    The memory planner (``rewardfl.plan``) builds a model on fake tensors (the ``meta`` device) to
    plan a step on a GPU it may not have: the model's device-dependent choices (its dtype, what waits
    in host memory between uses) follow ``type`` ("cuda" or "cpu") and ``total_memory`` (bytes of
    one accelerator; None: ask the device) instead of the device it was given.
    """

    type: str
    total_memory: Optional[int] = None


class VideoModel(ABC):
    """A video generator: conditioning encoders, one or more denoising experts, a decoder.

    The model owns its modules and which parameters train. Experts are named
    (``("dit", "dit2")`` for Wan2.2 A14B: high noise first); the sampler's plan
    says which one runs at each step.
    """

    Options: ClassVar[type] = NoOptions

    #: expert names from high noise to low noise
    experts: tuple[str, ...] = ()

    @classmethod
    def expert_boundary(cls, options, config=None) -> Optional[float]:
        """Where the second expert takes over: it runs while ``timestep < boundary * 1000`` (None
        for a single-expert model). A classmethod over the validated options (and the whole config,
        for a boundary read from the model's files, e.g. diffusers' model_index.json), so that
        ``run --check`` plans before any weights load."""
        return None

    @classmethod
    def check(cls, config, options) -> list[str]:
        """``run --check``: find the model's files without loading (or downloading) them; lines to
        print (e.g. "high_noise_model: /path/dit.safetensors"). Raises ``ValueError``/``FileNotFoundError``
        naming the key for what is missing."""
        return []

    @classmethod
    def planned_experts(cls, config, options) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """``(experts, trainable experts)`` that a model built from ``config``/``options`` will have,
        found without loading weights (file headers at most), so that ``run --check`` plans the
        gradient window as training will. Default: :attr:`experts`, all of them trainable."""
        return tuple(cls.experts), tuple(cls.experts)

    #: the model's latent dtype (bf16 on GPU, fp32 on CPU typically)
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")

    @abstractmethod
    def trainable_experts(self) -> tuple[str, ...]:
        """Names of experts that hold trainable parameters."""

    @abstractmethod
    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """``(C, T, h, w)`` of the latent for a video of that size."""

    @abstractmethod
    def encode(self, prompts: Sequence[str], first_frames: torch.Tensor, num_frames: int) -> Any:
        """Conditioning for a batch: prompts and first frames ``(B, 3, H, W)`` in [-1, 1].

        Returns an opaque object passed back to ``denoise`` and ``injection``.
        Runs without gradient; caching (e.g. per unique prompt) is the model's.
        """

    @abstractmethod
    def denoise(
        self,
        expert: str,
        x: torch.Tensor,
        timestep: torch.Tensor,
        cond: Any,
        *,
        base: bool = False,
    ) -> torch.Tensor:
        """Velocity ``(B, C, T, h, w)`` of ``expert`` at ``x`` and ``timestep`` ``(B,)``.

        ``base=True`` evaluates the expert without its trainable part (LoRA
        adapters disabled, or the frozen copy) for the regulariser.
        """

    def injection(self, cond: Any) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """``(mask, latent)`` for first-frame latent injection (TI2V-style), or None."""
        return None

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Videos ``(B, 3, F, H, W)`` in [-1, 1] from latents, differentiable."""

    @abstractmethod
    def trainable_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """Named parameters the optimizer updates."""

    @abstractmethod
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores of the model (LoRA weights, or full expert weights)."""

    @abstractmethod
    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of ``trainable_state_dict``; strict."""

    def save_trainable(self, path: str) -> list[str]:
        """Export the trainable weights in the model family's own format (e.g. LoRA files its
        loaders accept); returns the files written. Optional."""
        raise NotImplementedError(f"{type(self).__name__} does not export trainable weights")

    def read_exported(self, files: Sequence[str]) -> dict[str, torch.Tensor]:
        """``save_trainable``'s files read back in :meth:`trainable_state_dict` keys, for
        ``generate``/``evaluate --checkpoint OUTPUT_DIR/final``: only the model knows the layouts it
        exports (and what a loader's scale means for its trainable weights). Optional; raises
        ``ValueError`` naming the file for one it cannot read."""
        raise ValueError(f"{type(self).__name__} cannot read exported weight files (the model plugin has no "
                         "read_exported); give a training checkpoint directory instead")

    @classmethod
    def export_main(cls, argv: Optional[Sequence[str]], prog: str) -> int:
        """``python -m rewardfl.export --model NAME ...``: the model family's exporter (convert or merge
        what ``save_trainable`` wrote) on the rest of the command line; returns the exit status and
        raises user errors (``ValueError``/``FileNotFoundError``) for the caller to print. Optional."""
        raise ValueError(f"{cls.__name__} has no exporter (the model plugin has no export_main)")

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        """The ``nn.Module``s that hold the trainable parameters (DeepSpeed wraps these).

        The default finds them among the model's attributes (modules, and dicts
        of modules) and keeps those with a parameter that requires grad.
        """
        found: dict[str, torch.nn.Module] = {}
        for attr, value in vars(self).items():
            items = value.items() if isinstance(value, dict) else [("", value)]
            for key, module in items:
                if isinstance(module, torch.nn.Module) and any(p.requires_grad for p in module.parameters()):
                    found[f"{attr}.{key}" if key else attr] = module
        return found

    def train(self, mode: bool = True) -> "VideoModel":
        return self

    def eval(self) -> "VideoModel":
        return self.train(False)


# --------------------------------------------------------------------------- rewards


@dataclasses.dataclass
class SampleContext:
    """What a reward may know about one sample besides the generated video.

    ``sample_id`` is stable across steps and names one clip across every dataset of a run (used as a
    cache key: a dataset clip's is its file's absolute path, :meth:`of_clip`); ``reference`` is the
    reference video ``(F, 3, H, W)`` in [-1, 1] (its frame 0 conditioned generation); ``reference_path``
    the file it came from (for disk caches keyed by file hash), ``prompt`` the text.
    """

    sample_id: str
    reference: Optional[torch.Tensor] = None
    reference_path: Optional[str] = None
    prompt: str = ""
    #: which frames of the generated video the reward is given (indices into the full video, e.g.
    #: ``(0, 2, 4)``), when a composition scores a subset (``frames: stride|random``); None: all
    frames: Optional[tuple[int, ...]] = None

    @classmethod
    def of_clip(cls, sample_id: str, reference: Optional[torch.Tensor], path: Optional[str],
                prompt: str = "") -> "SampleContext":
        """The context of a dataset clip. Its ``sample_id`` is the clip file's absolute path (the row's id
        where there is no file): a metadata row's ``video`` cell is relative to its CSV, so a held-out set's
        ``videos/04.mp4`` and the training set's are other clips of other people, and a reward or judge
        caching references by the row's id would score one against the other's reference."""
        key = os.path.abspath(path) if path else sample_id
        return cls(key, reference, path, prompt)


@dataclasses.dataclass
class RewardOutput:
    """Per-sample reward for a batch of B videos.

    ``scores`` ``(B,)`` float32 (differentiable w.r.t. the videos when the reward
    is); ``valid`` ``(B,)`` bool, False where the reward has no signal (e.g. no
    face found): such samples add nothing to the loss and are counted;
    ``metrics`` scalar diagnostics (counts, means) for logging.
    """

    scores: torch.Tensor
    valid: torch.Tensor
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)


class StepCache:
    """Work that several rewards of one micro-batch share (the same frames resized, the same face
    detections), computed once.

    The composition (``rewardfl.rewards.weighted_sum``) gives every reward of a micro-batch the same cache
    as ``reward.cache`` and the same tensor object for the same frame selection, so a key built
    from the input tensor and the name of the computation identifies the work:
    ``self.cache.get(frames, "face_detections", lambda: detect(frames))``. The cache lives for
    one micro-batch (it holds its inputs, so an ``id`` is never reused while it lives); a reward
    used alone gets a fresh one per call. ``computed``/``hits`` count, for tests and logs.
    """

    def __init__(self):
        self._values: dict = {}
        self._keep: list = []  # the keyed tensors stay alive, so their ids stay unique
        self.computed: dict[str, int] = {}
        self.hits: dict[str, int] = {}

    def get(self, tensor: Any, name: str, compute):
        """``compute()`` the first time for (``tensor``, ``name``), the stored value afterwards."""
        key = (id(tensor), name)
        if key in self._values:
            self.hits[name] = self.hits.get(name, 0) + 1
            return self._values[key]
        value = compute()
        self._values[key] = value
        self._keep.append(tensor)
        self.computed[name] = self.computed.get(name, 0) + 1
        return value


class Reward(ABC):
    """Scores decoded videos against per-sample context."""

    Options: ClassVar[type] = NoOptions

    #: True when ``scores`` carry gradient to the input videos
    differentiable: ClassVar[bool] = False

    #: which of this reward's numbers are better when higher, as a judge of ``rewardfl.evaluate``
    #: reports them: ``"score"`` (the per-sample score, which training maximises) and keys of the
    #: dict its optional ``evaluate(video, context)`` returns. The reward-hacking guard watches only
    #: these (and ``specificity``, computed from ``score``); counts such as ``frames_with_face`` and
    #: lower-is-better numbers such as ``degenerate_faces`` have no direction the guard could read.
    #: A reward whose score is not a quality (none is expected) declares ``()``.
    higher_is_better: ClassVar[tuple[str, ...]] = ("score",)

    #: whether the score against another clip's reference says something about the video, so that a
    #: judge's ``specificity`` (own clip minus the others, ``rewardfl.evaluate``) means anything:
    #: likeness to the reference does; ``motion``, whose target is only the reference's amount of
    #: motion, does not (below every target its specificity is the same number at every checkpoint)
    reference_specific: ClassVar[bool] = True

    #: the micro-batch's shared work (see :class:`StepCache`); set by the composition before each
    #: call. A reward alone, or called directly, sees a fresh cache each time it reads this.
    @property
    def cache(self) -> StepCache:
        cache = self.__dict__.get("_step_cache")
        return StepCache() if cache is None else cache

    @cache.setter
    def cache(self, value: Optional[StepCache]) -> None:
        self.__dict__["_step_cache"] = value

    @classmethod
    def resolve_options(cls, values, top_level: dict, prefix: str, also_known=(), owner: str = ""):
        """This reward's validated ``Options`` from its config section ``values`` and the config's
        top-level keys ``top_level`` (the ones its ``Options`` declares are routed in); errors name
        ``prefix.key`` and ``owner`` (the plugin). A reward made of other rewards (``weighted_sum``)
        overrides this to build each of theirs through ``rewardfl.registry.build_options`` with the
        same ``top_level``."""
        return build_plugin_options(cls.Options, values, top_level, prefix, also_known, owner)

    @classmethod
    def check(cls, config, options) -> list[str]:
        """``run --check``: find the reward's files without loading them; lines to print (e.g.
        "detector /path/det.onnx"). Raises ``ConfigError`` naming the key for what is missing."""
        return []

    @classmethod
    def gradient_problem(cls, options) -> Optional[str]:
        """Why reward backprop cannot train on this reward with these ``options`` (a phrase naming the
        key, e.g. "gives none"), or None when every score it trains on carries gradient. Default: by
        :attr:`differentiable`. ``weighted_sum`` names the weighted entry that gives none."""
        return None if cls.differentiable else "gives none"

    def gradient_split(self) -> tuple[Optional["Reward"], Optional["Reward"]]:
        """``(the part that gives gradients, the part that does not)`` for ``algorithm: hybrid``, None
        where a part is empty; each part a reward of its own (scores: its weighted total). Default: the
        whole reward on the side :attr:`differentiable` says; ``weighted_sum`` splits its entries."""
        return (self, None) if self.differentiable else (None, self)

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` (on the CPU) over every training process, for a reward whose state must
        agree across them (``weighted_sum``'s running statistics). The trainer replaces it on every
        reward it builds with its all-reduce; built elsewhere (one process), the tensor itself."""
        return tensor

    def state_dict(self) -> dict:
        """What a training checkpoint keeps of the reward (JSON-serialisable; e.g. running statistics)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Inverse of :meth:`state_dict`."""

    def prepare(self, contexts: Sequence[SampleContext]) -> torch.Tensor:
        """Precompute per-sample references once (cached by ``sample_id``).

        Returns ``(B,)`` bool: False for samples that can never be scored (e.g.
        a reference video without a face); the loop skips and counts them.
        """
        return torch.ones(len(contexts), dtype=torch.bool)

    def reference_problem(self, frame: torch.Tensor) -> Optional[str]:
        """Why ``frame`` ``(3, H, W)`` in [-1, 1] (a clip's first frame as training sees it) cannot be
        a sample's reference, or None when it can. The reason is one short line, its kind before the
        first colon (``"no face"``, ``"several faces: 2 found"``); ``python -m rewardfl.data prepare``
        skips such videos and counts them by kind. The default accepts every frame."""
        return None

    @abstractmethod
    def __call__(self, videos: torch.Tensor, contexts: Sequence[SampleContext]) -> RewardOutput:
        """Score videos ``(B, 3, F, H, W)`` in [-1, 1]."""

    def loss(self, output: RewardOutput) -> torch.Tensor:
        """0-dim loss to minimise; default ``-mean(score)`` over valid samples (0 if none)."""
        valid = output.valid.to(output.scores.device)
        if not bool(valid.any()):
            return output.scores.sum() * 0.0
        return -(output.scores[valid]).mean()


def require_gradient(loss: torch.Tensor, source: torch.Tensor, valid: torch.Tensor, who: str) -> None:
    """A differentiable reward whose loss lost the gradient of ``source`` (the videos it scored) would
    otherwise fail inside autograd with a traceback that names nothing (scores computed under
    ``no_grad``, detached, or through numpy): one line naming the reward ``who`` instead."""
    if source.requires_grad and bool(valid.any()) and not loss.requires_grad:
        raise ValueError(f"{who}: declares itself differentiable, but its loss carries no gradient from the "
                         "videos (its scores were detached: computed under torch.no_grad, .detach(), .item() or "
                         "numpy); keep them in the autograd graph, or declare it differentiable = False and list "
                         "it with weight: 0 to log it only")


# --------------------------------------------------------------------------- training algorithms


@dataclasses.dataclass
class MicroBatch:
    """What an algorithm returns for one micro-batch.

    ``loss``: 0-dim, to backpropagate (already 0-weighted when no sample is valid);
    ``scores``/``valid``: ``(N,)`` detached reward scores of the N videos it generated (N = B for
    reward backprop, B * group_size for GRPO) and which of them count; ``reward_loss``/``kl_loss``:
    the loss's parts as floats; ``metrics``: the reward's and the algorithm's own scalars;
    ``videos``: ``(N, 3, F, H, W)`` in [-1, 1], detached (for sample videos), or None when the step
    generated none (it trained again on samples of an earlier step, see :meth:`Algorithm.replays`;
    ``scores``/``valid`` are then those samples').
    """

    loss: torch.Tensor
    scores: torch.Tensor
    valid: torch.Tensor
    reward_loss: float
    kl_loss: float
    metrics: dict
    videos: Optional[torch.Tensor]


class Algorithm(ABC):
    """Turns a micro-batch of clips into a loss to backpropagate (entry-point group
    ``rewardfl.algorithms``, config key ``algorithm``).

    The training loop owns everything around it: data, gradient accumulation, the optimizer engine,
    skips, checkpoints, evaluation and metrics. Constructed as
    ``cls(config, options, *, model, sampler, reward, plan)`` with the loop's model, sampler and
    reward plugins and the step plan (``rewardfl.sampling.policy.plan_steps``: which steps run, which
    carry gradient, which expert runs each).
    """

    Options: ClassVar[type] = NoOptions

    @classmethod
    def check(cls, config, options, reward_cls) -> list[str]:
        """``run --check``: raise ``ConfigError`` naming the key for a config this algorithm cannot
        train (e.g. a reward without gradient under reward backprop); lines to print."""
        return []

    @abstractmethod
    def micro_batch(self, batch: dict, contexts: Sequence[SampleContext], step: int) -> MicroBatch:
        """``batch`` as :func:`rewardfl.data.collate` makes it; ``step`` the optimizer step (noise seeds)."""

    # Optional: several optimizer steps per sampled batch (PPO's epochs). The defaults sample anew
    # every step and keep nothing between steps.

    def replays(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based) trains again on the samples of step ``step - 1``
        instead of drawing new clips: the loop then hands :meth:`micro_batch` the micro-batches of
        the step before (the same clips, contexts and skips, in the same order) and the data
        position stays where it is. A function of ``step`` and the options only: the loop asks it
        on resume too."""
        return False

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint saved after the last step must keep of this process's algorithm for the
        next step to go on exactly as in an uninterrupted run (e.g. the sampled groups a replay
        trains on again), as tensors (on any device: the checkpoint writes them one at a time);
        empty when the next step needs nothing (then nothing is written)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state_dict`, on resume (``{}`` when the checkpoint holds nothing)."""

    # Optional: the memory planner (``python -m rewardfl.plan``).

    def planned_micro_batch(self, batch: dict, step: int, backprop: Callable[[], MicroBatch]) -> MicroBatch:
        """One micro-batch for the memory planner: the same tensor work as :meth:`micro_batch`, on
        tensors that have shapes but no values (so no host reads: no ``.item()``, no scores; a reward
        used without gradient allocates nothing the planner counts and is left out). ``backprop()``
        is the planner's reward-backprop micro-batch (the rollout with the gradient window, the decode
        with gradient, the reward's loss as far as the planner knows the reward). The default, for
        reward backprop, returns it."""
        return backprop()
