"""Diffusion math over any ε-callable: ``schedule`` (the SD-1.x schedule, q_sample, the ε loss),
``samplers`` (DDIM, DPM-Solver++; one signature, see :data:`featinv.registry.SAMPLERS`), ``guidance``
(classifier-free and feature guidance as ε-callables) and ``reconstruct`` (feature map -> image).
The samplers know no network; import the submodules directly; this file imports nothing."""
