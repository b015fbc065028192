"""Folder jobs: work over a folder of images that writes a folder of results, resumably.

``reconstruct`` (the ImageNet-val reconstruction job, one or many devices), ``evaluate`` (its metrics and
contact sheet), ``export`` (a trained run as a shareable folder), ``state`` (the output folder's layout and
manifest) and ``lock`` (one job per folder). Import the submodules directly; this file imports nothing."""
