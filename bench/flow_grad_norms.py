"""Per-term gradient norms of DomainStudio on a flow-matching family, hf-MSE weighted `none` vs `min_snr`.

A tiny random FLUX.1 pipeline (dsfast.train.testing.make_flux_pipeline), 8 images of 16 px, 40 steps, DomainStudio
with its text-to-image defaults and ``train.log_grad_norms=true``; prints, per weighting, the median (min, max) over
the logged steps of grad_norm/<term> / grad_norm/instance. Run: ``python bench/flow_grad_norms.py`` (CPU, ~2 min).
"""
import json
import statistics
import tempfile
from pathlib import Path

from dsfast.train import train
from dsfast.train.testing import make_flux_pipeline, tiny_config, write_images


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="flow-gn-"))
    make_flux_pipeline(root / "model")
    write_images(root / "imgs", 8, size=16)
    write_images(root / "class", 8, size=16, seed=1)
    for weighting in ("none", "min_snr"):
        cfg = tiny_config(root / weighting, root / "model", root / "imgs", data__instance_prompt="a sks dog",
                          data__class_prompt="a dog", data__class_dir=str(root / "class"), data__num_class_images=8,
                          train__max_steps=40, train__lr=1e-4, loss__hfmse_weighting=weighting,
                          train__log_grad_norms=True, train__log_every=2)
        out = train(cfg)
        logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "grad_norm/instance" in x]
        for term in ("hfmse", "image", "hf"):
            r = [m[f"grad_norm/{term}"] / m["grad_norm/instance"] for m in logged]
            print(f"{weighting:8s} {term:6s} / instance: median {statistics.median(r):.3g} "
                  f"({min(r):.3g}-{max(r):.3g}), {len(r)} steps")


if __name__ == "__main__":
    main()
