"""FeatInv: map a classifier's spatial feature maps back to images with a ControlNet-conditioned latent
diffusion model.

The library by role: ``nets`` (tensors in, tensors out), ``diffusion`` (schedule, samplers, reconstruction),
``checkpoint`` (weights on disk), ``pair`` (the one loader), ``training``, ``jobs``, ``analysis`` and ``demo``;
the faces: ``commands`` (``featinv <command>``) and ``app`` (the explorer). Import the submodules: this file
imports nothing heavy, so ``import featinv`` and ``featinv --help`` never load torch.
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("featinv")  # one source: the installed package's metadata (pyproject.toml)
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "unknown"
