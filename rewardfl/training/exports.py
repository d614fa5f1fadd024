"""What a run leaves besides checkpoints: the final export and the best weights so far.

Both are directories replaced whole (``fileio.replace_directory``): ``OUTPUT_DIR/final`` holds the
trainable weights in the model family's own format (e.g. DiffSynth LoRA files) and, with
``ema_decay``, their moving average in ``final/ema``; ``OUTPUT_DIR/best`` the weights of the best
evaluation by ``save_best_by`` with ``best.json`` saying which. A previous run's files never stay
beside this run's. Rank 0 writes, inside the engine's ``gathered()`` (whole tensors under ZeRO-3);
every rank meets at the barrier.
"""

from __future__ import annotations

import logging
import os
import shutil

from rewardfl.fileio import replace_directory, write_json
from rewardfl.runtime import barrier

log = logging.getLogger("rewardfl")

__all__ = ["export_final", "save_best"]

WEIGHTS = "trainable.safetensors"


def export_final(trainer) -> None:
    """``OUTPUT_DIR/final``: the trained weights (and ``final/ema``, the EMA's, with ``ema_decay``)."""
    final = os.path.join(trainer.output_dir, "final")
    model, ema = trainer.model, trainer.ema
    with trainer.engine.gathered():
        if trainer.is_main:
            tmp = final + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                files = model.save_trainable(os.path.join(tmp, WEIGHTS))
                if ema is not None:  # the same export of the averaged weights, in final/ema
                    trained = {k: v.detach().to("cpu", copy=True) for k, v in model.trainable_state_dict().items()}
                    try:
                        model.load_trainable_state_dict(ema.state_dict())
                        files += model.save_trainable(os.path.join(tmp, "ema", WEIGHTS))
                    finally:
                        model.load_trainable_state_dict(trained)
            except NotImplementedError:
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                replace_directory(tmp, final)
                log.info("exported %s", ", ".join(final + f[len(tmp):] for f in files))
    barrier(trainer.dist)


def save_best(trainer, step: int, best: dict) -> None:
    """``OUTPUT_DIR/best``: the current weights, the best evaluation so far (``best``: its step, metric
    and value, written as ``best.json``)."""
    path = os.path.join(trainer.output_dir, "best")
    with trainer.engine.gathered():
        if trainer.is_main:
            tmp = path + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                trainer.model.save_trainable(os.path.join(tmp, WEIGHTS))
                write_json(os.path.join(tmp, "best.json"), best, indent=1)
            except NotImplementedError:
                log.warning("save_best_by: %s cannot export its weights; OUTPUT_DIR/best not written",
                            type(trainer.model).__name__)
            else:  # exchanged whole (or the previous one moved aside first, put back by the next start)
                replace_directory(tmp, path)
                log.info("step %d: best %s = %.4f so far: weights in %s", step, best["metric"], best["value"], path)
    barrier(trainer.dist)
