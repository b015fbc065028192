"""Training the control branch: ``module`` (the LightningModule), ``loop`` (:func:`~featinv.training.loop.train`,
atomic checkpoints, resume), ``run_config`` (a resumed run keeps its config) and ``progress`` (log lines).
Import the submodules directly; this file imports nothing."""
