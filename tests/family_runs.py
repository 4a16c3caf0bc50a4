"""Driver of tests/test_train_families.py: trains every (family, method, LoRA or not) case of ``CASES`` for 2
steps through ``dsfast.train.train`` in this one process (one DeepSpeed process group, one start-up), then
checks each ``final/`` with diffusers, and writes what it measured as JSON: ``python family_runs.py ROOT OUT``."""
import json
import sys
import traceback
from pathlib import Path

import numpy as np
import torch

from dsfast.train import train
from dsfast.train.families import load_pipeline
from dsfast.train.sample import sample_images
from dsfast.train.testing import (
    make_flux_pipeline,
    make_sd3_pipeline,
    make_sdxl_pipeline,
    tiny_config,
    write_images,
)

BUILDERS = {"sdxl": make_sdxl_pipeline, "sd3": make_sd3_pipeline, "sd3-no-t5": lambda p: make_sd3_pipeline(p, t5=False),
            "flux": make_flux_pipeline}
METHODS = ("finetune", "dreambooth", "domainstudio")
CASES = [(f, m, r) for f in ("sdxl", "sd3", "flux") for m in METHODS for r in (0, 4)] + [("sd3-no-t5", "domainstudio", 4)]
# options beside the defaults, each on one family: (family, method, LoRA rank, config overrides)
OPTIONS = {
    "flux-bf16-checkpointing-lora_off": ("flux", "domainstudio", 4, dict(
        train__mixed_precision="bf16", train__gradient_checkpointing=True, loss__source="lora_off")),
    "sd3-frozen-pixel-accumulation-cosmap-precondition": ("sd3", "domainstudio", 0, dict(
        loss__source="frozen", loss__space="pixel", train__micro_batch_size=2, train__weighting_scheme="cosmap",
        train__precondition_outputs=True)),
    "sdxl-zero3-lora-checkpointing": ("sdxl", "dreambooth", 4, dict(
        deepspeed__zero_stage=3, train__gradient_checkpointing=True)),
    "flux-zero3-frozen-anchors": ("flux", "domainstudio", 0, dict(
        deepspeed__zero_stage=3, loss__source="frozen", loss__num_anchors=2)),
}
PROMPT = "a sks dog"


def _images(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=PROMPT, num_inference_steps=2, height=16, width=16, guidance_scale=1.0, output_type="np",
               generator=torch.Generator().manual_seed(0))
    return np.asarray(out.images)


def _denoiser(pipe):
    return getattr(pipe, "transformer", None) or pipe.unet


def run_case(root: Path, key: str, family: str, method: str, rank: int, **over) -> dict:
    model = root / "models" / family
    cfg = tiny_config(root / "runs" / key, model, root / "imgs", method=method, data__instance_prompt=PROMPT,
                      data__class_prompt="a dog", data__class_dir=str(root / "class" / family), data__num_class_images=4,
                      model__lora_rank=rank, train__lr=1e-3, sample_every=2, checkpoint_every=2, **over)
    out = train(cfg)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    final = load_pipeline(str(out / "final"))
    base = load_pipeline(str(model))
    img_final, img_base = _images(final), _images(base)
    r = {"pipeline": type(final).__name__, "terms": sorted(k for k in metrics[-1] if k not in ("step", "lr")),
         "steps": [m["step"] for m in metrics], "finite": bool(np.isfinite(img_final).all()),
         "shape": list(img_final.shape), "final_vs_base": float(np.abs(img_final - img_base).max()),
         "grid": (out / "samples" / "step_00000002.png").is_file(),
         "weights_moved": float(max((a - b).abs().max() for a, b in zip(_denoiser(final).state_dict().values(),
                                                                         _denoiser(base).state_dict().values(),
                                                                         strict=True)))}
    if rank:
        base.load_lora_weights(str(out / "final" / "lora"))
        r["lora_vs_final"] = float(np.abs(_images(base) - img_final).max())
        r["lora_modules"] = sum(1 for n, _ in _denoiser(base).named_modules() if n.endswith("lora_A"))
    ckpt = sample_images(out, 1, prompt=PROMPT, num_inference_steps=2, checkpoint="latest")
    r["checkpoint_sample"] = list(ckpt.shape)
    return r


def main(root: str, out: str) -> None:
    root = Path(root)
    write_images(root / "imgs", 4, size=16)
    for family, build in BUILDERS.items():
        build(root / "models" / family)
        write_images(root / "class" / family, 4, size=16, seed=1)  # given: no class images generated
    results = {}
    cases = {f"{family}-{method}-{rank}": (family, method, rank, {}) for family, method, rank in CASES}
    for key, (family, method, rank, over) in {**cases, **OPTIONS}.items():
        try:
            results[key] = run_case(root, key, family, method, rank, **over)
        except Exception:  # noqa: BLE001 - reported to the test, which fails on it
            results[key] = {"error": traceback.format_exc()[-3000:]}
    Path(out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
