"""Helpers shared by the tests (plain functions; fixtures live in conftest.py)."""
from __future__ import annotations

from pathlib import Path

from PIL import Image

# Photos bundled with scikit-image (no download needed), grouped into ImageNet-style classes.
_SAMPLE_PHOTOS = {
    "animal": ("chelsea",),
    "person": ("astronaut", "camera"),  # camera is grayscale: exercises the RGB conversion
    "thing": ("coffee", "rocket"),
}


def sample_photos_folder(out_dir: str | Path, size: int | None = 128) -> Path:
    """Write scikit-image's bundled photos as ``<out_dir>/<class>/<name>.JPEG``; returns ``out_dir``.

    ``size``: shorter side in pixels after resizing (``None`` keeps the original size).
    """
    from skimage import data as skdata  # test / demo dependency only

    root = Path(out_dir)
    for cls, names in _SAMPLE_PHOTOS.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for name in names:
            pil = Image.fromarray(getattr(skdata, name)())
            if size is not None:
                scale = size / min(pil.size)
                pil = pil.resize((round(pil.width * scale), round(pil.height * scale)),
                                 Image.Resampling.BICUBIC)
            pil.save(root / cls / f"{name}.JPEG", quality=90)
    return root
