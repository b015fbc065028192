"""Analyses built on reconstruction: steering (``steering``), composite features (``compose``),
perturbed inputs (``perturb``) and the shared plumbing of their commands (``common``).
Uncertainty is ``featinv.diffusion.reconstruct.uncertainty``. Import the submodules directly."""
