"""An exponential moving average of the trainable weights (``ema_decay``).

After every optimizer update that changed the weights: ``ema = decay * ema + (1 - decay) * w``, in
float32 whatever the weights' dtype (a bf16 EMA would lose the small ``(1 - decay) * w`` steps),
starting from the weights as built. Kept beside the weights (``ema_device: device``) or in host
memory (``cpu``). Checkpoints hold it as ``ema.safetensors``; exports as ``final/ema/``;
``rewardfl.generate``/``rewardfl.evaluate`` use it with ``--weights ema``.

Keys are the model's ``trainable_state_dict`` keys, so EMA weights load wherever trained weights do.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["EMA", "EMA_FILE"]

#: the EMA's file in a training checkpoint directory
EMA_FILE = "ema.safetensors"


class EMA:
    def __init__(self, weights: dict[str, torch.Tensor], decay: float, device: Optional[str] = None):
        """``weights``: ``model.trainable_state_dict()``; ``device``: ``"cpu"`` for host memory, None beside them."""
        self.decay = float(decay)
        self.updates = 0
        self.shadow = {k: v.detach().to(device or v.device, torch.float32, copy=True) for k, v in weights.items()}

    @torch.no_grad()
    def update(self, weights: dict[str, torch.Tensor]) -> None:
        """One step towards ``weights`` (the trainable weights after an update)."""
        for key, s in self.shadow.items():
            s.lerp_(weights[key].detach().to(s.device, torch.float32), 1.0 - self.decay)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights on the CPU (float32), in ``trainable_state_dict`` keys."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = sorted(set(self.shadow) - set(state)), sorted(set(state) - set(self.shadow))
        if missing or unexpected:
            raise ValueError(f"{EMA_FILE}: keys do not match the trainable weights (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}); resume with the config that wrote it")
        with torch.no_grad():
            for k, s in self.shadow.items():
                s.copy_(state[k].to(s.device, torch.float32))
