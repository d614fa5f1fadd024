"""Built-in training algorithm plugins besides the default reward backprop (``rewardfl.training.algorithm``)."""
