"""``dsfast dreambooth <flags of diffusers' train_dreambooth.py / train_dreambooth_lora.py and the LoRA scripts
of SDXL, SD3 and FLUX (train_dreambooth_lora_sdxl.py, _sd3.py, _flux.py)>``.

The flags map onto a dsfast run config (``flags_to_config``), which is written to
``<output_dir>/dreambooth.yaml`` (rerun it with ``dsfast train --config``) and trained. A flag of the
diffusers scripts that dsfast does not map is one error naming it and what to use instead. Flags not
given keep dsfast's defaults (the papers' values; see ``dsfast train --help``), not the diffusers ones.

Batch sizes: diffusers' ``--train_batch_size`` is per device and ``--gradient_accumulation_steps``
multiplies it, so dsfast's global ``train.batch_size`` = train_batch_size x accumulation x world size
(the ranks of the launcher, ``WORLD_SIZE``) and ``train.micro_batch_size`` = train_batch_size. With
DomainStudio the pairwise losses see the whole global batch (dsfast's exact accumulation).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from dsfast.argtypes import ArgumentParser, non_negative_int, positive_int

from .config import load_config
from .data import METADATA
from .engine import train
from .errors import USER_ERRORS, ConfigError

# diffusers flags dsfast does not take, and what to use instead
UNSUPPORTED = {
    "--scale_lr": "dsfast does not scale the learning rate; give --learning_rate the value to train with",
    "--train_text_encoder": "dsfast trains the UNet (or its LoRA adapters) only",
    "--num_train_epochs": "use --max_train_steps",
    "--validation_prompt": "dsfast writes sample grids: add sample_every=N sample.prompt='...'",
    "--num_validation_images": "add sample.num=N",
    "--validation_steps": "add sample_every=N",
    "--report_to": "dsfast writes TensorBoard and metrics.jsonl into the run folder",
    "--logging_dir": "dsfast writes its logs into the run folder (--output_dir)",
    "--push_to_hub": "upload the run's final/ folder yourself",
    "--hub_token": "upload the run's final/ folder yourself",
    "--hub_model_id": "upload the run's final/ folder yourself",
    "--sample_batch_size": "class images are generated one at a time, split across ranks",
    "--enable_xformers_memory_efficient_attention": "dsfast uses PyTorch SDPA attention",
    "--allow_tf32": "not a dsfast option",
    "--lr_num_cycles": "dsfast's schedule is constant (with an optional linear warm-up)",
    "--lr_power": "dsfast's schedule is constant (with an optional linear warm-up)",
    "--dataloader_num_workers": "dsfast caches the (few) images and their latents before training",
    "--pre_compute_text_embeddings": "dsfast always caches the text embeddings",
    "--revision": "point --pretrained_model_name_or_path at a local folder of that revision",
    "--variant": "point --pretrained_model_name_or_path at a local folder of that variant",
    "--tokenizer_name": "the tokenizer of the pipeline folder is used",
    "--prior_generation_precision": "class images are generated in float32",
    "--offset_noise": "not a dsfast option",
    "--snr_gamma": "not a dsfast option",
    "--dataset_name": "give a local image folder with --instance_data_dir (captions: its metadata.jsonl with "
                      "--caption_column, or <image>.txt files with data.captions=txt)",
    "--train_text_encoder_ti": "dsfast trains the UNet/transformer (or its LoRA adapters) only",
    "--text_encoder_lr": "dsfast trains the UNet/transformer (or its LoRA adapters) only",
    "--lora_layers": "dsfast puts the adapters where diffusers' script of the model family does (docs/training.md: model families)",
}
SCHEDULES = ("constant", "constant_with_warmup")


def parser() -> ArgumentParser:
    ap = ArgumentParser(
        prog="dsfast dreambooth",
        description="Train with the flags of diffusers' train_dreambooth.py (and --rank of the LoRA script); "
                    "they map onto a dsfast config, written to OUTPUT_DIR/dreambooth.yaml. Extra key=value "
                    "arguments override dsfast config keys (see dsfast train --help).",
        epilog="Batch: --train_batch_size is per device, as in diffusers: dsfast's global train.batch_size = "
               "train_batch_size x gradient_accumulation_steps x world size. Flags not given keep dsfast's "
               "defaults (the papers' values), not the diffusers script's.")
    a = ap.add_argument
    a("--method", choices=("dreambooth", "domainstudio"), default="dreambooth", help="training method")
    a("--pretrained_model_name_or_path", required=True, help="diffusers pipeline folder or cached hub id")
    a("--instance_data_dir", required=True, help="folder of the instance images")
    a("--instance_prompt", required=True, help='prompt of the instance images, e.g. "a sks dog" (with '
                                               '--caption_column: of the images without a caption)')
    a("--caption_column", help="read per-image captions from --instance_data_dir's metadata.jsonl (Hugging Face "
                               "imagefolder: file_name + this key, e.g. text); each caption replaces "
                               "--instance_prompt for its image (data.captions=metadata)")
    a("--class_data_dir", help="folder of class images (missing ones are generated)")
    a("--class_prompt", help='prompt of the class images, e.g. "a dog"')
    a("--with_prior_preservation", action="store_true", help="add the prior-preservation loss on class images")
    a("--prior_loss_weight", type=float, default=None, help="lambda_prior (default 1.0 with prior preservation)")
    a("--num_class_images", type=non_negative_int, help="class images to have in --class_data_dir")
    a("--resolution", type=int, help="training resolution in pixels")
    a("--center_crop", action="store_true",
      help="centre-crop the images (dsfast's default either way; diffusers crops at random without this flag: add "
           "data.random_crop=true for that)")
    a("--train_batch_size", type=positive_int, help="instance images per device and forward")
    a("--gradient_accumulation_steps", type=positive_int, default=1, help="forwards per optimizer step")
    a("--learning_rate", type=float, help="AdamW learning rate")
    a("--lr_scheduler", choices=SCHEDULES, default="constant", help="constant, or constant_with_warmup")
    a("--lr_warmup_steps", type=non_negative_int, help="linear warm-up steps (with --lr_scheduler constant_with_warmup)")
    a("--max_train_steps", type=positive_int, help="optimizer steps")
    a("--checkpointing_steps", type=non_negative_int, help="save a checkpoint every N steps")
    a("--checkpoints_total_limit", type=non_negative_int, help="complete checkpoints kept")
    a("--resume_from_checkpoint", help="'latest' or a dsfast checkpoint folder")
    a("--gradient_checkpointing", action="store_true", help="gradient checkpointing in the UNet")
    a("--mixed_precision", choices=("no", "fp16", "bf16"), help="training precision")
    a("--use_8bit_adam", action="store_true", help="AdamW with 8-bit states (bitsandbytes; train.optimizer=adamw8bit)")
    a("--quantize", choices=("none", "int8", "float8", "nf4"),
      help="with --rank: load the frozen UNet/transformer base quantized (model.quantize: int8 / float8 torchao "
           "weight-only, nf4 bitsandbytes, GPU only)")
    a("--drop_text_encoders", action="store_true",
      help="free the text encoders once the prompts are encoded (model.drop_text_encoders)")
    a("--adam_beta1", type=float, help="AdamW beta1")
    a("--adam_beta2", type=float, help="AdamW beta2")
    a("--adam_weight_decay", type=float, help="AdamW weight decay")
    a("--adam_epsilon", type=float, help="AdamW epsilon")
    a("--max_grad_norm", type=float, help="gradient clipping norm")
    a("--output_dir", default="runs/dreambooth", help="run folder (default: runs/dreambooth)")
    a("--seed", type=int, help="seed of every random draw")
    a("--rank", type=non_negative_int, help="LoRA rank (the LoRA script's flag); without it the whole UNet trains")
    a("--pretrained_vae_model_name_or_path", help="a VAE folder or hub id to use instead of the pipeline's (sdxl: an "
                                                  "fp16-safe VAE)")
    a("--weighting_scheme", choices=("none", "logit_normal", "mode", "sigma_sqrt", "cosmap"),
      help="sd3/flux: timestep density and loss weighting (default: sd3 logit_normal, flux none)")
    a("--logit_mean", type=float, help="sd3/flux: mean of the logit_normal density")
    a("--logit_std", type=float, help="sd3/flux: standard deviation of the logit_normal density")
    a("--mode_scale", type=float, help="sd3/flux: scale of the mode density")
    a("--precondition_outputs", type=int, choices=(0, 1), help="sd3/flux: 1 = regress x0 = x_t - sigma*v on x0 "
                                                                "(the SD3 script's default); dsfast's default is 0")
    a("--guidance_scale", type=float, help="flux: the guidance embedding's value in training (default 3.5)")
    a("--max_sequence_length", type=positive_int, help="sd3/flux: T5 prompt tokens (default: sd3 256, flux 512)")
    a("--cache_latents", action="store_true", help="cache the VAE latents (dsfast always does)")
    a("--lambda_img", type=float, help="DomainStudio: weight of the pairwise-similarity KL of x0")
    a("--lambda_hf", type=float, help="DomainStudio: weight of the pairwise-similarity KL of hf(x0)")
    a("--lambda_hfmse", type=float, help="DomainStudio: weight of the hf-MSE to the real image")
    a("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    a("overrides", nargs="*", help="key=value dsfast config overrides")
    return ap


def _unsupported(extra: list[str]) -> ConfigError:
    flag = extra[0].split("=", 1)[0]
    hint = UNSUPPORTED.get(flag, "not a train_dreambooth.py flag that dsfast maps; run `dsfast dreambooth --help` "
                                 "for the flags, or give a dsfast key=value override (dsfast train --help)")
    return ConfigError(f"unsupported flag {flag}: {hint}")


def flags_to_config(args: argparse.Namespace, world: int = 1) -> dict:
    """The dsfast config dict of parsed ``dsfast dreambooth`` flags, for ``world`` ranks."""
    if args.method == "dreambooth" and any(v is not None for v in (args.lambda_img, args.lambda_hf, args.lambda_hfmse)):
        raise ConfigError("--lambda_img/--lambda_hf/--lambda_hfmse are DomainStudio weights: add --method domainstudio")
    if args.prior_loss_weight is not None and not args.with_prior_preservation:
        raise ConfigError("--prior_loss_weight needs --with_prior_preservation (as in diffusers)")
    if args.with_prior_preservation and not args.class_prompt:
        raise ConfigError("--with_prior_preservation needs --class_prompt (as in diffusers)")
    warmup = args.lr_warmup_steps or 0
    if args.lr_scheduler == "constant" and warmup:
        raise ConfigError(f"--lr_warmup_steps {warmup} with --lr_scheduler constant: diffusers ignores the "
                          "warm-up of that schedule; add --lr_scheduler constant_with_warmup to warm up")
    model = {"pretrained": args.pretrained_model_name_or_path, "vae": args.pretrained_vae_model_name_or_path,
             "guidance": args.guidance_scale, "max_sequence_length": args.max_sequence_length,
             "quantize": args.quantize, "drop_text_encoders": args.drop_text_encoders or None}
    data = {"instance_dir": args.instance_data_dir, "instance_prompt": args.instance_prompt,
            "class_prompt": args.class_prompt, "class_dir": args.class_data_dir,
            "num_class_images": args.num_class_images, "resolution": args.resolution}
    if args.caption_column is not None:
        if not (Path(args.instance_data_dir) / METADATA).is_file():
            raise ConfigError(f"--caption_column {args.caption_column}: dsfast reads captions from the {METADATA} of "
                              f"a local --instance_data_dir (file_name + {args.caption_column}, as Hugging Face "
                              f"imagefolder); {args.instance_data_dir} has none (for <image>.txt captions add "
                              "data.captions=txt instead)")
        data.update(captions="metadata", caption_column=args.caption_column)
    loss = {"prior": (args.prior_loss_weight if args.prior_loss_weight is not None else 1.0)
            if args.with_prior_preservation else 0.0,
            "image": args.lambda_img, "hf": args.lambda_hf, "hfmse": args.lambda_hfmse}
    train = {"max_steps": args.max_train_steps, "lr": args.learning_rate, "warmup_steps": warmup,
             "seed": args.seed, "mixed_precision": args.mixed_precision,
             "adam_beta1": args.adam_beta1, "adam_beta2": args.adam_beta2, "weight_decay": args.adam_weight_decay,
             "adam_eps": args.adam_epsilon, "max_grad_norm": args.max_grad_norm,
             "weighting_scheme": args.weighting_scheme, "logit_mean": args.logit_mean, "logit_std": args.logit_std,
             "mode_scale": args.mode_scale,
             "precondition_outputs": None if args.precondition_outputs is None else bool(args.precondition_outputs)}
    if args.gradient_checkpointing:
        train["gradient_checkpointing"] = True
    if args.use_8bit_adam:
        train["optimizer"] = "adamw8bit"
    if args.train_batch_size is not None:
        train["micro_batch_size"] = args.train_batch_size
        train["batch_size"] = args.train_batch_size * args.gradient_accumulation_steps * world
    elif args.gradient_accumulation_steps != 1:
        raise ConfigError("--gradient_accumulation_steps needs --train_batch_size (the per-device batch)")
    if args.resume_from_checkpoint is not None:
        train["resume"] = args.resume_from_checkpoint
    if args.rank is not None:
        model["lora_rank"] = args.rank
    cfg = {"method": args.method, "model": model, "data": data, "loss": loss, "train": train,
           "output_dir": args.output_dir, "checkpoint_every": args.checkpointing_steps,
           "keep_last": args.checkpoints_total_limit}

    def drop_none(d):
        return {k: drop_none(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}

    return drop_none(cfg)


def main(argv=None) -> int:
    ap = parser()
    args, extra = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        if extra:
            raise _unsupported(extra)
        raw = load_config(flags_to_config(args, world=int(os.environ.get("WORLD_SIZE", "1"))), args.overrides)
        path = Path(raw.output_dir) / "dreambooth.yaml"

        def write_config():  # once train has checked the input: a bad flag writes nothing
            if int(os.environ.get("RANK", "0")) == 0:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(yaml.safe_dump(raw.model_dump(exclude_defaults=True), sort_keys=False))
                print(f"dsfast dreambooth: config written to {path} (the same run: dsfast train --config {path})",
                      flush=True)

        run = train(raw, on_valid=write_config)
    except USER_ERRORS as exc:
        print(f"dsfast dreambooth: error: {exc}", file=sys.stderr)
        return 1
    print(f"dsfast dreambooth: done, run folder {run}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
