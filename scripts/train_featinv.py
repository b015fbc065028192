"""Train FeatInv: ``python scripts/train_featinv.py --init FEATINV_INIT --data IMAGENET_TRAIN [overrides]``."""
from featinv.commands.train import main

if __name__ == "__main__":
    raise SystemExit(main())
