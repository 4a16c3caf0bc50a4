"""Driver of tests/test_train_quant.py: short runs with ``model.quantize``, ``model.drop_text_encoders`` and
``train.optimizer=adamw8bit`` through ``dsfast.train.train`` in this one process (one DeepSpeed process group),
``final/`` checked with diffusers, written as JSON: ``python quant_runs.py ROOT OUT``."""
import json
import sys
import traceback
from pathlib import Path

import numpy as np
import torch

from dsfast.train import train
from dsfast.train.families import load_pipeline
from dsfast.train.testing import (
    make_flux_pipeline,
    make_sdxl_pipeline,
    tiny_config,
    unconditional_run_inputs,
    write_images,
)

PROMPT = "a sks dog"
# DomainStudio LoRA on a quantized base, 2 steps, a sample grid and a checkpoint at step 2, resumed for a third
LORA_CASES = {
    "flux-int8-lora_off-drop": ("flux", dict(model__quantize="int8", model__drop_text_encoders=True,
                                             loss__source="lora_off")),
    "sdxl-float8-adamw8bit": ("sdxl", dict(model__quantize="float8", train__optimizer="adamw8bit",
                                           deepspeed__zero_stage=2)),
}
# the loss curve of AdamW with 8-bit states against AdamW: a full fine-tune of the tiny unconditional UNet (its
# ZeRO-2 partition is one tensor of 8-bit moments), 50 steps, the same draws
CURVE_STEPS = 50


def _images(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=PROMPT, num_inference_steps=2, height=16, width=16, guidance_scale=1.0, output_type="np",
               generator=torch.Generator().manual_seed(0))
    return np.asarray(out.images)


def lora_case(root: Path, key: str, family: str, over: dict) -> dict:
    model = root / "models" / family
    cfg = tiny_config(root / "runs" / key, model, root / "imgs", data__instance_prompt=PROMPT,
                      data__class_prompt="a dog", data__class_dir=str(root / "class"), data__num_class_images=4,
                      model__lora_rank=4, train__lr=1e-3, sample_every=2, checkpoint_every=2, **over)
    out = train(cfg)
    final = load_pipeline(str(out / "final"))
    base = load_pipeline(str(model))  # the unquantized pretrained pipeline
    img_final, img_base = _images(final), _images(base)
    base.load_lora_weights(str(out / "final" / "lora"))
    lora_vs_final = float(np.abs(_images(base) - img_final).max())
    train(cfg, ["train.max_steps=3", "sample_every=0"])  # resumes from step 2 (the quantized base is not in it)
    return {"steps": [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()],
            "grid": (out / "samples" / "step_00000002.png").is_file(),
            "text_encoders": sorted(n for n, p in final.components.items() if n.startswith("text_encoder") and p is not None),
            "final_vs_base": float(np.abs(img_final - img_base).max()),
            "lora_vs_final": lora_vs_final,
            "finite": bool(np.isfinite(img_final).all())}


def curve(root: Path, optimizer: str) -> dict:
    cfg = tiny_config(root / "runs" / optimizer, root / "u" / "model", root / "u" / "imgs", method="finetune",
                      train__max_steps=CURVE_STEPS, train__lr=1e-3, train__optimizer=optimizer, deepspeed__zero_stage=2,
                      checkpoint_every=CURVE_STEPS)
    out = train(cfg)
    states = torch.load(next((out / "checkpoints").glob("*/*optim_states.pt")), weights_only=False)
    dtypes = set()

    def walk(o):
        if isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif torch.is_tensor(o):
            dtypes.add(str(o.dtype))

    walk(states["optimizer_state_dict"]["base_optimizer_state"]["state"])
    return {"loss": [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()],
            "state_dtypes": sorted(dtypes)}


def main(root: str, out: str) -> None:
    root = Path(root)
    write_images(root / "imgs", 4, size=16)
    write_images(root / "class", 4, size=16, seed=1)  # given: no class images generated
    make_flux_pipeline(root / "models" / "flux")
    make_sdxl_pipeline(root / "models" / "sdxl")
    unconditional_run_inputs(root / "u")
    results = {}
    jobs = {key: (lambda f=family, o=over, k=key: lora_case(root, k, f, o)) for key, (family, over) in LORA_CASES.items()}
    jobs.update({f"curve-{opt}": (lambda o=opt: curve(root, o)) for opt in ("adamw", "adamw8bit")})
    for key, job in jobs.items():
        try:
            results[key] = job()
        except Exception:  # noqa: BLE001 - reported to the test, which fails on it
            results[key] = {"error": traceback.format_exc()[-3000:]}
    Path(out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
