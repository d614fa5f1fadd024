"""Training: the loop and the parts it is made of (it imports no plugin; below it: the sampling and
evaluation library, the registry and the foundations; see docs/architecture.md).

* ``loop``: :class:`Trainer` and :func:`train`, the loop a reader holds in their head;
* ``algorithm``: the default algorithm, reward backpropagation (what a micro-batch contributes to the loss);
* ``engines``: the optimizer, LR schedule and update (plain torch or DeepSpeed ZeRO);
* ``exports``: ``OUTPUT_DIR/final`` and ``OUTPUT_DIR/best``;
* ``outputs``: the output directory's lock, metrics, sample videos, the reward curve;
* ``trackers``: TensorBoard and wandb (``report_to``);
* ``evaluator``: evaluation during training (``eval_steps``), the hacking guard, ``save_best_by``;
* ``ema``: the moving average of the trainable weights (``ema_decay``).
"""

from .loop import Trainer, TrainResult, TrainState, train

__all__ = ["train", "Trainer", "TrainState", "TrainResult"]
