"""Built-in reward plugins (entry-point group ``rewardfl.rewards``): ``face_identity``."""
