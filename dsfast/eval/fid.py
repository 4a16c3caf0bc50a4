"""FID through ``pytorch-fid`` or ``torch-fidelity``, only when the Inception weights are on disk.

Nothing is downloaded. The weights are looked up, in order, at

* ``$DSFAST_FID_WEIGHTS`` — a path to the file the backend expects
  (``pt_inception-2015-12-05-6726825d.pth`` for pytorch-fid,
  ``weights-inception-2015-12-05-6726825d.pth`` for torch-fidelity);
* torch.hub's cache, ``$TORCH_HOME/hub/checkpoints/<that file>`` (``TORCH_HOME`` defaults to
  ``~/.cache/torch``), where both packages put the file when they download it themselves.

With few images (the few-shot setting: 10 training images) FID is dominated by estimation
noise; report it only as a rough indication.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from dsfast.eval.distances import MetricUnavailable, hub_cache_holding

PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
TORCH_FIDELITY_FILE = "weights-inception-2015-12-05-6726825d.pth"


def _find(filename: str) -> Path | None:
    env = os.environ.get("DSFAST_FID_WEIGHTS")
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise MetricUnavailable(f"DSFAST_FID_WEIGHTS={env} is not a file")
        return path
    path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    return path if path.is_file() else None


def _unavailable_message(installed: list[str]) -> str:
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    if not installed:
        return ("--fid needs pytorch-fid or torch-fidelity (pip install pytorch-fid) and its Inception weights on "
                f"disk: put {PYTORCH_FID_FILE} in {hub} (or set DSFAST_FID_WEIGHTS to its path). "
                "No weights are downloaded.")
    return (f"--fid: found {', '.join(installed)} but not its Inception weights, which are not downloaded. "
            f"Put {PYTORCH_FID_FILE} (pytorch-fid) or {TORCH_FIDELITY_FILE} (torch-fidelity) in {hub} "
            "(TORCH_HOME moves that folder) or set DSFAST_FID_WEIGHTS to the file's path.")


def _pytorch_fid(samples: torch.Tensor, train: torch.Tensor, weights: Path, device) -> float:
    from pytorch_fid.fid_score import calculate_frechet_distance
    from pytorch_fid.inception import InceptionV3

    # pytorch-fid loads its weights with load_state_dict_from_url, which reads torch.hub's cache first.
    with hub_cache_holding(weights, PYTORCH_FID_FILE):
        model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).to(device).eval()

    @torch.no_grad()
    def feats(x):
        out = []
        for i in range(0, len(x), 50):
            out.append(model(x[i: i + 50].to(device))[0].flatten(1).cpu().double())
        return torch.cat(out).numpy()

    import numpy as np

    fa, fb = feats(samples), feats(train)
    return float(calculate_frechet_distance(fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0), np.cov(fb, rowvar=False)))


def _torch_fidelity(samples_dir: Path, train_dir: Path, weights: Path, device) -> float:
    import torch_fidelity

    res = torch_fidelity.calculate_metrics(input1=str(samples_dir), input2=str(train_dir), fid=True,
                                           cuda=torch.device(device).type == "cuda", verbose=False,
                                           feature_extractor_weights_path=str(weights))
    return float(res["frechet_inception_distance"])


def compute_fid(samples: torch.Tensor, train: torch.Tensor, samples_dir: Path | None = None,
                train_dir: Path | None = None, device="cpu") -> dict:
    """FID between two image sets in [0, 1]; raises :class:`MetricUnavailable` with instructions if it can't."""
    installed = []
    for module, name in (("pytorch_fid", "pytorch-fid"), ("torch_fidelity", "torch-fidelity")):
        try:
            __import__(module)
            installed.append(name)
        except ImportError:
            pass
    if "pytorch-fid" in installed:
        weights = _find(PYTORCH_FID_FILE)
        if weights is not None:
            return {"fid": _pytorch_fid(samples, train, weights, device), "backend": "pytorch-fid"}
    if "torch-fidelity" in installed and samples_dir is not None and train_dir is not None:
        weights = _find(TORCH_FIDELITY_FILE)
        if weights is not None:
            return {"fid": _torch_fidelity(samples_dir, train_dir, weights, device), "backend": "torch-fidelity"}
    raise MetricUnavailable(_unavailable_message(installed))
