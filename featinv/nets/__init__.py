"""The networks, tensors in and tensors out: ``attention``, ``unet`` (SD-1.x), ``autoencoder`` (KL VAE),
``text`` (CLIP text encoder), ``adapter`` (the FeatInv hint adapter), ``controlnet``, ``model`` (FeatInv:
all of them composed) and ``backbone`` (the frozen classifier whose feature map is inverted).
No training, I/O or device logic lives here; import the submodules directly; this file imports nothing."""
