"""Image distances for the diversity metrics: a weight-free *fallback* and real LPIPS.

**Fallback (``"fallback"``, label ``fallback-haar``)** — a multi-scale Haar-wavelet distance
that needs no pretrained network, so it works offline and on CI. Images in [0, 1] are
decomposed with a ``J``-level orthonormal 2-D Haar transform (``dsfast.reference.haar_wavedec2``,
equal to ``pywt.wavedec2(x, 'haar')``; default ``J = 3``). The coefficients of level ``j``
are divided by ``2**j`` so every scale is in pixel units (the level-``J`` approximation then
is the local mean colour). With ``B_j`` = the three detail bands of level ``j`` (all colour
channels) and ``B_{J+1}`` = the approximation band,

    d(x, y) = 1/(J+1) · Σ_{s=1..J+1}  RMS( B_s(x) − B_s(y) )

i.e. the mean over scales of the root-mean-square coefficient difference. Each scale —
fine texture, edges, coarse layout/colour — weighs the same, which, like LPIPS and unlike
pixel MSE, makes the distance sensitive to high-frequency detail. It is a metric (a sum of
norms of an invertible linear map), 0 only for identical images, symmetric, and in [0, 1]
for images in [0, 1] (in practice ≪ 1). It is **not** LPIPS: its values are not comparable
with published Intra-LPIPS numbers, and every output that uses it says "fallback".
Height and width are padded (edge replication) to a multiple of ``2**J``.

**LPIPS (``"lpips"``)** — the ``lpips`` package (v0.1) under the Intra-LPIPS protocol of CDC's
``feat_cluster.py`` (which DomainStudio's tables follow): network **VGG** (``net='vgg'``, the
default; AlexNet, ``net='alex'``, is an option whose numbers are labelled as such and are not
comparable with published Intra-LPIPS), every image resized to **256x256** (bilinear) and
normalised to **[-1, 1]**. Used only when the package is installed *and* the backbone's ImageNet
weights are already on disk (nothing is downloaded): ``$DSFAST_LPIPS_VGG`` /
``$DSFAST_LPIPS_ALEXNET`` (a path to ``vgg16-397923af.pth`` / ``alexnet-owt-7be5be79.pth``) or
torchvision's cache, ``$TORCH_HOME/hub/checkpoints/<that file>`` (``TORCH_HOME`` defaults to
``~/.cache/torch``). Otherwise :class:`MetricUnavailable` explains how to provide them. (The
small linear heads of LPIPS ship inside the ``lpips`` wheel.)
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from dsfast.reference import haar_wavedec2

# network -> (torchvision weights file lpips' backbone loads, environment variable naming it, display name)
LPIPS_NETS = {
    "vgg": ("vgg16-397923af.pth", "DSFAST_LPIPS_VGG", "VGG"),
    "alex": ("alexnet-owt-7be5be79.pth", "DSFAST_LPIPS_ALEXNET", "AlexNet"),
}
LPIPS_SIZE = 256  # the protocol's resize


class MetricUnavailable(RuntimeError):
    """A metric needs a package or weights that are not present locally."""


def _hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


class HaarDistance:
    """The weight-free fallback distance (see the module docstring)."""

    name = "fallback-haar"
    label = "fallback (multi-scale Haar distance, not LPIPS)"

    def __init__(self, levels: int = 3):
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        self.levels = levels

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per-scale flattened coefficients ``[(N, D_s)]``, finest detail level first, approximation last."""
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected images (N, 3, H, W), got shape {tuple(x.shape)}")
        x = x.to(torch.float64)
        m = 2 ** self.levels
        ph, pw = (-x.shape[-2]) % m, (-x.shape[-1]) % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        coeffs = haar_wavedec2(x, self.levels)  # [LL_J, (H_J, V_J, D_J), ..., (H_1, V_1, D_1)]
        n = x.shape[0]
        feats = []
        for k, details in enumerate(coeffs[:0:-1]):  # level 1 (finest) ... level J
            level = k + 1
            feats.append(torch.cat([b.reshape(n, -1) for b in details], dim=1) / 2 ** level)
        feats.append(coeffs[0].reshape(n, -1) / 2 ** self.levels)
        return feats

    def pairwise(self, a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, M)`` distances between the images of ``a`` and ``b`` (``b = a`` when omitted)."""
        fa = self.features(a)
        fb = fa if b is None else self.features(b)
        total = None
        for xa, xb in zip(fa, fb):
            d = torch.cdist(xa, xb) / xa.shape[1] ** 0.5  # RMS difference at this scale
            total = d if total is None else total + d
        out = total / len(fa)
        if b is None:
            out.fill_diagonal_(0)  # exact zeros despite cdist rounding
        return out.float()



@contextlib.contextmanager
def hub_cache_holding(weights: Path, filename: str):
    """torch.hub's cache, for the duration, is a folder whose ``checkpoints/filename`` is ``weights``."""
    if weights.parent == _hub_checkpoints() and weights.name == filename:
        yield
        return
    old = torch.hub.get_dir()
    with tempfile.TemporaryDirectory() as tmp:
        link = Path(tmp) / "checkpoints" / filename
        link.parent.mkdir()
        try:
            link.symlink_to(weights.resolve())
        except OSError:
            shutil.copyfile(weights, link)
        torch.hub.set_dir(tmp)
        try:
            yield
        finally:
            torch.hub.set_dir(old)


class LpipsDistance:
    """LPIPS (lpips v0.1) under the Intra-LPIPS protocol: VGG by default, images resized to 256x256, [-1, 1].

    ``model`` replaces the network (anything called as ``model(a, b) -> (N, 1, 1, 1)`` on
    ``(N, 3, size, size)`` tensors in [-1, 1]); without it the ``lpips`` package and the backbone's
    weights on disk are required (see the module docstring).
    """

    def __init__(self, net: str = "vgg", size: int = LPIPS_SIZE, device: str | torch.device = "cpu",
                 batch: int = 32, model=None):
        if net not in LPIPS_NETS:
            raise ValueError(f"LPIPS network must be one of {', '.join(LPIPS_NETS)}, got {net!r}")
        if size < 16:
            raise ValueError(f"LPIPS resize must be >= 16 pixels, got {size}")
        self.net, self.size, self.batch = net, size, batch
        self.name = f"lpips-{net}"
        self.label = f"LPIPS ({LPIPS_NETS[net][2]}, lpips v0.1; images resized to {size}x{size} bilinear, in [-1, 1])"
        self.device = torch.device(device)
        self.model = (self._build(net) if model is None else model).to(self.device).eval()

    @staticmethod
    def find_weights(net: str) -> Path | None:
        filename, env_var, _ = LPIPS_NETS[net]
        env = os.environ.get(env_var)
        if env:
            path = Path(env).expanduser()
            if not path.is_file():
                raise MetricUnavailable(f"{env_var}={env} is not a file")
            return path
        path = _hub_checkpoints() / filename
        return path if path.is_file() else None

    @classmethod
    def _build(cls, net: str):
        filename, env_var, display = LPIPS_NETS[net]
        try:
            import lpips
        except ImportError as e:
            raise MetricUnavailable(
                f"--metric lpips needs the 'lpips' package (pip install lpips) and the {display} weights on disk; "
                "use --metric fallback (the default) otherwise") from e
        weights = cls.find_weights(net)
        if weights is None:
            raise MetricUnavailable(
                f"--metric lpips: the {display} weights ({filename}) are not on disk and will not be downloaded. "
                f"Put the file at {_hub_checkpoints() / filename} (torchvision's cache; set TORCH_HOME to move it) "
                f"or point {env_var} at it; or use --metric fallback")
        # lpips builds torchvision's backbone with pretrained weights, which reads torch.hub's cache:
        # point the cache at the local file so that nothing is fetched from the network.
        with hub_cache_holding(weights, filename):
            return lpips.LPIPS(net=net, version="0.1", verbose=False)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` in [0, 1] -> ``(N, 3, size, size)`` in [-1, 1] (grey expanded to RGB)."""
        x = images.float().expand(-1, 3, -1, -1) if images.shape[1] == 1 else images.float()
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return x.clamp(0, 1) * 2 - 1

    @torch.no_grad()
    def pairwise(self, a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        same = b is None
        b = a if same else b
        out = torch.zeros(len(a), len(b))
        for j0 in range(0, len(b), self.batch):
            bj = self.prepare(b[j0: j0 + self.batch]).to(self.device)
            for i in range(len(a)):
                ai = self.prepare(a[i: i + 1]).to(self.device).expand_as(bj)
                out[i, j0: j0 + len(bj)] = self.model(ai, bj).flatten().cpu()
        if same:
            out = (out + out.T) / 2
            out.fill_diagonal_(0)
        return out


def get_distance(metric: str = "fallback", **kwargs):
    """``"fallback"`` → :class:`HaarDistance`; ``"lpips"`` → :class:`LpipsDistance` (VGG, 256x256 unless
    ``net``/``size`` say otherwise; may raise MetricUnavailable)."""
    if metric == "fallback":
        return HaarDistance(**kwargs)
    if metric == "lpips":
        return LpipsDistance(**kwargs)
    raise ValueError(f"metric must be 'fallback' or 'lpips', got {metric!r}")
