"""Built-in reward plugins (entry-point group ``rewardfl.rewards``): ``face_identity`` and
``identity_consistency`` (``face_identity/``), ``motion`` (``motion.py``), ``clip_score``,
``pickscore``, ``hps`` and ``aesthetic`` (``clip/``). Several at once: ``weighted_sum``
(``weighted_sum.py``), which a ``reward:`` list means."""
