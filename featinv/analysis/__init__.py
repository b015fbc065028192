"""Analyses built on reconstruction: what a classifier's feature map holds, seen through its inversions.

- ``steering``         directions in the channel space (class, channel, mean difference, probe) and steering along them
- ``specs``            the syntax of direction and edit specs, checked without torch
- ``directions``       direction specs as users write them (``class:<i>``, ``mean-diff:<a>:<b>``, ...) -> a direction;
                       code edit specs (``set:<basis>:<concepts>``, ``swap:<basis>:<a>:<b>``)
- ``compose``          composite feature maps: interpolation, pasting a region, keeping or removing channels
- ``perturb``          common corruptions and a PGD attack
- ``concepts``         a concept basis of the per-location channel vectors: fit, encode, decode, save, load
- ``concept_methods``  the concept methods, one class each (scikit-learn factorisations, sparse autoencoders)
- ``sae``              training a sparse autoencoder and its held-out metrics
- ``shards``           channel vectors on disk: .npy shards written and read memory-mapped
- ``concept_edits``    edits by concept: its contribution, the map without it, its atom as a direction, its heat map,
                       its code set to a level of its own distribution (``set_code``), class a -> b (``swap``)
- ``concept_scores``   each concept's importance per class and a basis's completeness
- ``concept_index``    per concept: frequency, mean code, top images and places, importance, in one streamed pass
- ``atlas_html``       the static HTML atlas over a concept index
- ``concepts_report``  the concept atlas that ``featinv concepts`` writes
- ``reports``          the pictures and tables that ``featinv steer``, ``compose`` and ``perturb`` write
- ``manipulations``    image manipulations (torchvision) and before/after folder pairs, for ``featinv maps``
- ``feature_maps``     maps inside feature space (FeatMap): identity, linear (streamed ridge), local, global
- ``map_files``        a map on disk (safetensors, spec in the metadata) and the check that it fits a network
- ``map_scores``       a map's scores in feature space, for the classifier and decoded; a linear map's geometry
- ``maps_report``      what ``featinv maps`` runs: tasks (manipulation, folder pairs, another network), fits, pictures
- ``baselines``        the pixel-optimisation baseline
- ``common``           what they share: input images, labelled tiles and grids, tables

Uncertainty is ``featinv.diffusion.reconstruct.uncertainty``; what the classifier reads back in an image is
``featinv.metrics.read_back``. This package imports nothing: import the submodules directly."""
