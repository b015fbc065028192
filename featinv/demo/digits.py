"""The demo's data and classifier: scikit-learn's 8x8 handwritten digits and a small CNN whose spatial
feature map (64 x 2 x 2 at 8 px) the demo inverts."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from featinv.nets.backbone import FeatureExtractor
from featinv.runtime import progress_bar


def load_digits_split(size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """scikit-learn digits -> (N, 1, size, size) in [0, 1] and labels; fixed 80/20 split (stratified)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    y = torch.tensor(d.target, dtype=torch.int64)
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=0.2, random_state=0, stratify=d.target)  # same split for every seed
    return {"x_train": x[tr], "y_train": y[tr], "x_test": x[te], "y_test": y[te]}


class DigitsCNN(nn.Module):
    """(B, 3, S, S) normalised -> logits (B, 10); ``features`` -> (B, width, S/4, S/4) (64 x 2 x 2 at 8 px).
    ``width`` other than 64: the demo's second classifier (featinv maps --source-backbone digits-b)."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, width // 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width // 2, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(width, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x.mean(dim=1, keepdim=True))  # grey: the three channels are averaged

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def _features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.features(x)


def _head(model: nn.Module, feats: torch.Tensor) -> torch.Tensor:
    return model.head(feats.mean(dim=(2, 3)))  # DigitsCNN.forward after the feature map


def make_extractor(model: DigitsCNN, size: int) -> FeatureExtractor:
    return FeatureExtractor(model, feature_fn=_features, mean=(0.5,) * 3, std=(0.5,) * 3, image_size=size,
                            head_fn=_head)


def rgb(x: torch.Tensor) -> torch.Tensor:
    return x.expand(-1, 3, -1, -1)


def train_classifier(data: dict, epochs: int, seed: int, device: torch.device, width: int = 64) -> DigitsCNN:
    """AdamW on the training split with 1-px shifts; returns the model in eval mode."""
    torch.manual_seed(seed)
    model = DigitsCNN(width).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    x, y = data["x_train"].to(device), data["y_train"].to(device)
    g = torch.Generator().manual_seed(seed)
    bar = progress_bar(range(epochs), desc="1/4 classifier", unit="epoch")
    for _ in bar:
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 64):
            b = perm[i:i + 64]
            xb = x[b]
            shift = torch.randint(-1, 2, (2,), generator=g).tolist()  # light augmentation: 1-px shifts
            xb = torch.roll(xb, shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model((rgb(xb) - 0.5) / 0.5), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


class DigitsDataset(Dataset):
    """Items for ``featinv.training.loop.train``: the same digit as backbone input and diffusion target."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        img = self.x[i].expand(3, -1, -1)
        return {"feat_input": img.clone(), "image": img * 2 - 1, "label": self.y[i], "index": i}
