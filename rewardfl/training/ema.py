"""An exponential moving average of the trainable weights (``ema_decay``).

After every optimizer update that changed the weights: ``ema = d_n * ema + (1 - d_n) * w``, in
float32 whatever the weights' dtype (a bf16 EMA would lose the small ``(1 - d_n) * w`` steps),
starting from the weights as built. ``d_n`` warms up as diffusers' ``EMAModel`` (``use_ema_warmup``
off) does, with ``n`` the updates before this one: ``d_0 = 0`` (the first update copies the weights),
then ``d_n = min(decay, (1 + n) / (10 + n))``. Without it the average of a short run stays near the
base model: at 0.999 over 300 updates 0.999^300 = 74% of it would still be the weights as built.
A resumed run continues ``n`` from the checkpoint's update count. Kept beside the weights (``ema_device: device``) or in host
memory (``cpu``). Checkpoints hold it as ``ema.safetensors``; exports as ``final/ema/``;
``rewardfl.generate``/``rewardfl.evaluate`` use it with ``--weights ema``.

Keys are the model's ``trainable_state_dict`` keys, so EMA weights load wherever trained weights do.
"""

from __future__ import annotations

from typing import Optional

import torch

from rewardfl.checkpoints import EMA_FILE

__all__ = ["EMA", "EMA_FILE"]


class EMA:
    def __init__(self, weights: dict[str, torch.Tensor], decay: float, device: Optional[str] = None):
        """``weights``: ``model.trainable_state_dict()``; ``device``: ``"cpu"`` for host memory, None beside them."""
        self.decay = float(decay)
        self.updates = 0
        self.shadow = {k: v.detach().to(device or v.device, torch.float32, copy=True) for k, v in weights.items()}

    def current_decay(self) -> float:
        """``d_n`` of the next update (``n = self.updates``; see the module docstring)."""
        n = self.updates
        return 0.0 if n == 0 else min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, weights: dict[str, torch.Tensor]) -> None:
        """One step towards ``weights`` (the trainable weights after an update)."""
        decay = self.current_decay()
        for key, s in self.shadow.items():
            s.lerp_(weights[key].detach().to(s.device, torch.float32), 1.0 - decay)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights on the CPU (float32), in ``trainable_state_dict`` keys."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        """The average ``state`` after ``updates`` updates (the training state's update count)."""
        missing, unexpected = sorted(set(self.shadow) - set(state)), sorted(set(state) - set(self.shadow))
        if missing or unexpected:
            raise ValueError(f"{EMA_FILE}: keys do not match the trainable weights (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}); resume with the config that wrote it")
        with torch.no_grad():
            for k, s in self.shadow.items():
                s.copy_(state[k].to(s.device, torch.float32))
        self.updates = int(updates)
