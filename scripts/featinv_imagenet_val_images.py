"""Reconstruct ImageNet-val (10 images per class) from a FeatInv checkpoint: see ``featinv reconstruct -h``."""
from featinv.commands.reconstruct import main

if __name__ == "__main__":
    raise SystemExit(main())
