"""Maps inside feature space (FeatMap: Krey, Neukirch & Strodthoff 2026, arXiv 2605.11203): from an image's feature
map to the map of the same image after a manipulation, or to another network's map of it.

Each map type is one class here with ``fit`` (streamed batches of (input, target) maps) and ``__call__`` (apply);
its tensors and spec go to one safetensors file (:mod:`featinv.analysis.map_files`, no pickles); the names and
one-line helps are ``featinv.registry.MAP_TYPES``. The map types, in growing capacity:

- ``identity``: the unmapped map, the baseline every score is read against;
- ``linear``: one affine map W·x + b shared by every grid position; closed-form ridge from streamed normal
  equations (:class:`NormalEquations`, float64), λ chosen on validation maps, exact for any number of vectors;
- ``local``: a k×k convolution over the grid, the same ridge over unfolded k×k patches (linear is k = 1);
- ``global``: a small transformer over the grid's tokens (Adam, early-stopped on validation maps, best state
  kept), which can move content between positions, as a flip does and no per-position map can.

Maps are (B, C_in, h_in, w_in) -> (B, C_out, h, w); an input on another grid (another network's, FeatMap's
cross-network case) is resampled bilinearly to the target grid first (:func:`to_grid`).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from featinv import registry
from featinv.runtime import progress_bar

RIDGE_GRID = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # λ relative to the mean input variance
Batches = Callable[[], Iterable[tuple[Tensor, Tensor]]]     # a fresh pass over (input, target) map batches


def to_grid(x: Tensor, grid: tuple[int, int]) -> Tensor:
    """(B, C, h, w) -> (B, C, *grid), bilinear (align_corners=False, as the adapter's upsampling); as is if equal."""
    if tuple(x.shape[-2:]) == tuple(grid):
        return x
    return F.interpolate(x.float(), size=tuple(grid), mode="bilinear", align_corners=False)


class NormalEquations:
    """Streamed sums of a least-squares problem y ≈ x W + b over rows (float64): n, Σx, Σy, Σxᵀx, Σxᵀy, Σ|y|².

    From them, :meth:`solve` gives the ridge solution and :meth:`sse` any solution's squared error on these rows,
    so neither the fit nor the choice of λ needs the rows in memory at once."""

    def __init__(self, d_in: int, d_out: int):
        f64 = {"dtype": torch.float64}
        self.n = 0
        self.sx, self.sy = torch.zeros(d_in, **f64), torch.zeros(d_out, **f64)
        self.sxx, self.sxy = torch.zeros(d_in, d_in, **f64), torch.zeros(d_in, d_out, **f64)
        self.syy = 0.0

    def add(self, x: Tensor, y: Tensor) -> None:
        """x: (N, d_in), y: (N, d_out) rows, any float dtype and device (products in float32 per chunk, then
        accumulated in float64: ~1e-7 relative per chunk, where a float64 GEMM would cost several times the time)."""
        x, y = x.float(), y.float()
        self.n += x.shape[0]
        self.sx += x.sum(0).double().cpu()
        self.sy += y.sum(0).double().cpu()
        self.sxx += (x.T @ x).double().cpu()
        self.sxy += (x.T @ y).double().cpu()
        self.syy += float(y.double().square().sum())

    def centred(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """-> (mean x, mean y, Cov(x), Cov(x, y)): the problem around the means, where ridge leaves b unpenalised."""
        mx, my = self.sx / self.n, self.sy / self.n
        return mx, my, self.sxx / self.n - torch.outer(mx, mx), self.sxy / self.n - torch.outer(mx, my)

    def solve(self, lambdas: Iterable[float]) -> list[tuple[float, Tensor, Tensor]]:
        """Ridge solutions for each relative λ -> [(λ, W (d_in, d_out), b (d_out,))], float64.

        W = (Cov(x) + λ·tr(Cov(x))/d_in·I)⁻¹ Cov(x, y), b = ȳ − x̄ W; one eigendecomposition serves every λ. λ = 0
        is least squares (eigenvalues below 1e-10 of the largest are dropped: a pseudo-inverse)."""
        if self.n < 2:
            raise ValueError(f"a ridge fit needs at least 2 vectors, got {self.n}")
        mx, my, cxx, cxy = self.centred()
        evals, evecs = torch.linalg.eigh(cxx)
        scale = max(float(evals.clamp_min(0).mean()), 1e-30)
        proj = evecs.T @ cxy
        out = []
        for lam in lambdas:
            denom = evals + lam * scale
            inv = torch.where(denom > 1e-10 * max(float(evals.max()), 1e-30), 1.0 / denom, torch.zeros_like(denom))
            w = evecs @ (inv[:, None] * proj)
            out.append((float(lam), w, my - mx @ w))
        return out

    def sse(self, w: Tensor, b: Tensor) -> float:
        """Σ |y − (x W + b)|² over the rows summed here, from the sums alone."""
        w, b = w.double(), b.double()
        return float(self.syy - 2 * (w * self.sxy).sum() - 2 * b @ self.sy + (w * (self.sxx @ w)).sum()
                     + 2 * b @ (self.sx @ w) + self.n * b @ b)

    def sst(self) -> float:
        """Σ |y − ȳ|²: the squared error of predicting the mean target (the denominator of R²)."""
        return float(self.syy - self.sy @ self.sy / self.n)


class FeatureMapping(nn.Module):
    """What every map type shares: channels and grids in and out, the options it was built with, and its
    validation record (``fit_info``). Subclasses set ``kind`` and implement ``forward`` and ``fit``."""

    kind = ""

    def __init__(self, in_channels: int, out_channels: int, in_grid: tuple[int, int], grid: tuple[int, int],
                 **options):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.in_grid, self.grid = tuple(map(int, in_grid)), tuple(map(int, grid))
        self.options = options
        self.fit_info: dict = {}   # what the fit chose and scored on the validation maps
        self.about: dict = {}      # where the maps came from (networks, manipulation), saved with the map

    def spec(self) -> dict:
        return {"kind": self.kind, "in_channels": self.in_channels, "out_channels": self.out_channels,
                "in_grid": list(self.in_grid), "grid": list(self.grid), "options": self.options,
                "fit": self.fit_info}

    def check_input(self, x: Tensor, what: str = "the input map") -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels or tuple(x.shape[-2:]) != self.in_grid:
            raise ValueError(f"{what} has shape {tuple(x.shape)}; this {self.kind} map takes (B, {self.in_channels}, "
                             f"{self.in_grid[0]}, {self.in_grid[1]})")

    def fit(self, batches: Batches, val: tuple[Tensor, Tensor]) -> FeatureMapping:
        """Fit on the (input, target) batches a fresh ``batches()`` pass yields, choose options on ``val``."""
        return self


class Identity(FeatureMapping):
    """The unmapped map (the baseline): needs the same channels and grid in and out."""

    kind = "identity"

    def __init__(self, in_channels, out_channels, in_grid, grid, **options):
        if in_channels != out_channels or tuple(in_grid) != tuple(grid):
            raise ValueError(f"the identity map needs the same map shape in and out, got {in_channels}x"
                             f"{tuple(in_grid)} -> {out_channels}x{tuple(grid)} (another network: fit a map)")
        super().__init__(in_channels, out_channels, in_grid, grid, **options)

    def forward(self, x: Tensor) -> Tensor:
        return x.float()


class Convolution(FeatureMapping):
    """A k×k convolution over the grid (zero padding), fitted in closed form: ridge over unfolded patches.

    Options: ``kernel`` (odd). The ``linear`` map is this with kernel 1: W·x + b at each position."""

    kind = "local"

    def __init__(self, in_channels, out_channels, in_grid, grid, kernel: int = 3, **options):
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"a local map's kernel must be odd and >= 1, got {kernel}")
        super().__init__(in_channels, out_channels, in_grid, grid, kernel=int(kernel), **options)
        self.register_buffer("weight", torch.zeros(out_channels, in_channels, kernel, kernel))
        self.register_buffer("bias", torch.zeros(out_channels))

    @property
    def kernel(self) -> int:
        return self.options["kernel"]

    def patches(self, x: Tensor) -> Tensor:
        """(B, C_in, h_in, w_in) -> (B·h·w, C_in·k²) rows, in the order of a conv weight's flattening."""
        x = to_grid(x.float(), self.grid)
        k = self.kernel
        cols = F.unfold(x, k, padding=k // 2) if k > 1 else x.flatten(2)      # (B, C·k², h·w)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])

    @staticmethod
    def rows(y: Tensor) -> Tensor:
        return y.float().flatten(2).transpose(1, 2).reshape(-1, y.shape[1])  # (B·h·w, C_out)

    def forward(self, x: Tensor) -> Tensor:
        x = to_grid(x.float(), self.grid)
        return F.conv2d(x, self.weight, self.bias, padding=self.kernel // 2)

    def fit(self, batches: Batches, val: tuple[Tensor, Tensor]) -> Convolution:
        d_in = self.in_channels * self.kernel ** 2
        train, held = NormalEquations(d_in, self.out_channels), NormalEquations(d_in, self.out_channels)
        for x, y in batches():
            train.add(self.patches(x), self.rows(y))
        held.add(self.patches(val[0]), self.rows(val[1]))
        errors = [(held.sse(w, b), lam, w, b) for lam, w, b in train.solve(RIDGE_GRID)]
        err, lam, w, b = min(errors, key=lambda e: (e[0], -e[1]))  # ties: the stronger ridge
        self.weight.copy_(w.T.reshape(self.weight.shape).float())
        self.bias.copy_(b.float())
        self.fit_info = {"ridge": lam, "val_r2": 1 - err / max(held.sst(), 1e-30), "vectors": train.n,
                         "val_r2_by_ridge": {str(e[1]): 1 - e[0] / max(held.sst(), 1e-30) for e in errors}}
        return self


class Linear(Convolution):
    """One affine map W·x + b shared by every grid position (a 1×1 convolution), closed-form ridge."""

    kind = "linear"

    def __init__(self, in_channels, out_channels, in_grid, grid, **options):
        options.pop("kernel", None)
        super().__init__(in_channels, out_channels, in_grid, grid, kernel=1, **options)

    @property
    def matrix(self) -> Tensor:
        """W (C_out, C_in)."""
        return self.weight[:, :, 0, 0]


class _GridTransformer(nn.Module):
    """Tokens of a grid -> tokens: in-projection, learned positions, pre-norm encoder layers, out-projection.
    (B, C_in, h, w) -> (B, C_out, h, w). Attention is PyTorch's encoder layer (scaled_dot_product_attention)."""

    def __init__(self, c_in: int, c_out: int, tokens: int, width: int, depth: int, heads: int):
        super().__init__()
        self.inp = nn.Linear(c_in, width)
        self.pos = nn.Parameter(torch.randn(1, tokens, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, c_out)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        tokens = self.inp(x.flatten(2).transpose(1, 2)) + self.pos        # (B, h·w, width)
        return self.out(self.norm(self.blocks(tokens))).transpose(1, 2).reshape(b, -1, h, w)


class Transformer(FeatureMapping):
    """A small transformer over the grid's tokens, on standardised channels; Adam, early-stopped on the
    validation maps (the best state is kept), so an undertrained net is not read as a weak map.

    Options: width, depth, heads, lr, batch (maps), max_epochs, patience (epochs without a better val loss)."""

    kind = "global"
    DEFAULTS = dict(width=128, depth=2, heads=4, lr=3e-3, batch=64, max_epochs=300, patience=25, seed=0)

    def __init__(self, in_channels, out_channels, in_grid, grid, **options):
        options = {**self.DEFAULTS, **options}
        super().__init__(in_channels, out_channels, in_grid, grid, **options)
        o = self.options
        torch.manual_seed(o["seed"])
        self.net = _GridTransformer(in_channels, out_channels, grid[0] * grid[1], o["width"], o["depth"], o["heads"])
        for name, c in (("in_mean", in_channels), ("in_std", in_channels), ("out_mean", out_channels),
                        ("out_std", out_channels)):
            self.register_buffer(name, torch.zeros(c) if "mean" in name else torch.ones(c))

    def forward(self, x: Tensor) -> Tensor:
        x = to_grid(x.float(), self.grid)
        z = (x - self.in_mean[:, None, None]) / self.in_std[:, None, None]
        return self.net(z) * self.out_std[:, None, None] + self.out_mean[:, None, None]

    def _standardise(self, batches: Batches) -> None:
        n, s = 0, {}
        for x, y in batches():
            x, y = to_grid(x.float(), self.grid), y.float()
            for key, t in (("x", x), ("y", y)):
                rows = t.transpose(0, 1).flatten(1).double()
                s[key] = s.get(key, 0) + torch.stack([rows.sum(1), rows.square().sum(1)])
            n += x.shape[0] * x.shape[2] * x.shape[3]
        for key, (m, sd) in (("x", ("in_mean", "in_std")), ("y", ("out_mean", "out_std"))):
            mean = s[key][0] / n
            std = (s[key][1] / n - mean.square()).clamp_min(0).sqrt()
            getattr(self, m).copy_(mean.float().to(self.in_mean.device))
            getattr(self, sd).copy_(std.clamp_min(1e-6).float().to(self.in_mean.device))

    def fit(self, batches: Batches, val: tuple[Tensor, Tensor]) -> Transformer:
        o, dev = self.options, self.in_mean.device
        self._standardise(batches)
        opt = torch.optim.Adam(self.net.parameters(), lr=o["lr"])
        g = torch.Generator().manual_seed(o["seed"])
        vx, vy = val[0].to(dev), val[1].to(dev).float()
        best, best_state, best_epoch, epoch = math.inf, None, 0, 0
        bar = progress_bar(range(o["max_epochs"]), desc="global map", unit="epoch")
        for epoch in bar:
            self.train()
            for x, y in batches():  # each streamed batch in shuffled steps of ``batch`` maps
                for idx in torch.randperm(len(x), generator=g).split(o["batch"]):
                    xb, yb = x[idx].to(dev), y[idx].to(dev).float()
                    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                        loss = (self(xb).float() - yb).div(self.out_std[:, None, None]).square().mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            self.eval()
            with torch.no_grad():
                err = float((self(vx) - vy).square().sum())
            if err < best:
                best, best_epoch = err, epoch
                best_state = {k: v.detach().clone() for k, v in self.state_dict().items()}
            bar.set_postfix(val=f"{err:.4g}")
            if epoch - best_epoch >= o["patience"]:
                break
        self.load_state_dict(best_state)
        self.eval()
        sst = float((vy - vy.mean(dim=(0, 2, 3), keepdim=True)).square().sum())
        self.fit_info = {"epochs": epoch + 1, "best_epoch": best_epoch + 1, "val_r2": 1 - best / max(sst, 1e-30),
                         "stopped_early": epoch + 1 < o["max_epochs"]}
        return self


def build_map(kind: str, in_channels: int, out_channels: int, in_grid, grid, **options) -> FeatureMapping:
    """A map type of ``featinv.registry.MAP_TYPES`` by name, unfitted."""
    if kind not in registry.MAP_TYPES:
        raise ValueError(f"unknown map type {kind!r}; choose from {registry.names(registry.MAP_TYPES)}")
    return registry.MAP_TYPES[kind].load()(in_channels, out_channels, tuple(in_grid), tuple(grid), **options)


def fit_map(kind: str, batches: Batches, val: tuple[Tensor, Tensor], device: str | torch.device = "cpu",
            **options) -> FeatureMapping:
    """Build the map type for the shapes of ``val`` (input, target) and fit it -> the fitted map, eval mode."""
    x, y = val
    fmap = build_map(kind, x.shape[1], y.shape[1], x.shape[-2:], y.shape[-2:], **options).to(device)
    with torch.no_grad() if kind != "global" else torch.enable_grad():
        fmap.fit(batches, (x, y))
    return fmap.eval()
