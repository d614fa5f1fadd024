"""Training: the loop and the parts it is made of (the core; it imports no plugin).

* ``loop``: :class:`Trainer` and :func:`train`, the loop a reader holds in their head;
* ``algorithm``: what a micro-batch contributes to the loss (reward backpropagation today);
* ``policy``: which sampling steps run, carry gradient and use which expert;
* ``engines``: the optimizer, LR schedule and update (plain torch or DeepSpeed ZeRO);
* ``distributed``: processes, collectives, signals agreed on by every process;
* ``checkpoints``: the on-disk layout of training checkpoints, saved and resumed;
* ``outputs``: the output directory's lock, metrics, sample videos, the reward curve;
* ``trackers``: TensorBoard and wandb (``report_to``);
* ``evaluator``: evaluation during training (``eval_steps``), the hacking guard, ``save_best_by``;
* ``ema``: the moving average of the trainable weights (``ema_decay``).
"""

from .loop import EXIT_NOTHING_TRAINED, EXIT_STOPPED, Trainer, TrainState, train

__all__ = ["train", "Trainer", "TrainState", "EXIT_STOPPED", "EXIT_NOTHING_TRAINED"]
