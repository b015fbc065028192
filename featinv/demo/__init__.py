"""The digits demo: the whole recipe on scikit-learn's digits, on a CPU, in minutes. ``digits`` (data and the
classifier), ``stages`` (miniSD stand-in, build-control, control training; cached), ``pair`` (the demo's pair,
registered in :data:`featinv.registry.DEMO_PAIR`) and ``run`` (``featinv demo``: evaluate and draw).
Import the submodules directly; this file imports nothing."""
