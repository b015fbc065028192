"""Checkpoints, the only place that knows foreign key names: ``layout`` (the reference prefixes and key
mapping), ``load`` (read, strict load, save), ``config_file`` (YAML and presets), ``reference_yaml``,
``diffusers`` and ``hub`` (other sources), ``convert``, ``inspect``, ``build_control`` (miniSD -> initial
FeatInv), and the safe readers ``tensor_files`` (with the NaN/inf check every tensor-file reader uses, and
``read_tensors`` for files that are not checkpoints) and ``safe_unpickle``.
Import the submodules directly; this file imports nothing."""
