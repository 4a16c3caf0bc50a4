"""The released text-to-image steps (``loss.mode=official``) on Stable Diffusion (the released code exists for it
only): bbzhu-jy16/DomainStudio ``Text-to-Image/train_domainstudio.py`` at cc69341, whose data draws are those
of diffusers' ``train_dreambooth.py`` too.

:class:`ReleasedDraws` (every method in official mode): a fresh ``latent_dist.sample()`` each step from the cached
posterior mean and std, a class sample draws its own timestep, and the prompts are padded to the longest of the
batch (the released ``pad_tokens=False``: the instance prompt and, with class images, the class prompt tokenised
together), not to the encoder's context of 77 tokens. CLIP's text encoder is causal, so the encoding of the first
L tokens does not depend on what follows: the embeddings are the first L rows of the 77-token encoding.

:class:`OfficialDomainStudioSD` adds the released pairwise/hf branch: a second UNet forward on the instance and
class latents, noised with the same noise at one t shared by the micro-batch; x0 = the scheduler's
``pred_original_sample`` (clipped when the scheduler clips), decoded with gradients *without* dividing by the
VAE scaling factor; the source side is the class half of that forward, with gradients; KL_img / KL_hf =
KL(p_class || p_instance) of the decoded images / their hf maps, within the micro-batch; hf-MSE = MSE of
hf(decoded instance x0) to hf of a different random batch of instance images; L_simple and the prior loss use
per-sample t.
"""
from __future__ import annotations

import torch

from ...data import instance_prompts
from ...diffusion import predicted_x0
from ...errors import ConfigError
from ...families import TEXT2IMAGE
from ...families.base import cat
from ..base import OfficialPairwise, weighted_hf_mse
from ..domainstudio import DomainStudio
from ..dreambooth import DreamBooth
from ..finetune import Finetune


class ReleasedDraws:
    """The released scripts' draws, for a text-to-image method class (a mixin placed before it)."""

    kinds = (TEXT2IMAGE,)
    mode = "official"

    @classmethod
    def check(cls, loss, data, kind) -> None:
        super().check(loss, data, kind)
        if data.captions != "none" and instance_prompts(data) is not None:
            raise ConfigError(f"data.captions={data.captions} (captions in {data.instance_dir}) with loss.mode=official:"
                              " per-image captions are not reproduced (the released --read_prompts_from_txts pads "
                              "each batch's captions to their longest); use data.captions=none or loss.mode=dsfast")

    def __init__(self, *, data, **kw):
        super().__init__(data=data, **kw)
        prompts = [data.instance_prompt] + ([data.class_prompt] if self.batches.classes is not None else [])
        length = max(self.family.prompt_length(p) for p in prompts)
        self.emb_prompts = {k: v[:, :length] for k, v in self.emb_prompts.items()}
        if self.emb_class is not None:
            self.emb_class = {k: v[:, :length] for k, v in self.emb_class.items()}

    def encode_batch(self, x, batch: int = 8):
        """``(mean, std)`` of the posterior: a latent is sampled afresh each step."""
        return self.family.encode(x, batch, std=True)

    def class_t(self, mb):
        return mb["t_c"]  # the class sample's own draw


class OfficialFinetuneSD(ReleasedDraws, Finetune):
    pass


class OfficialDreamBooth(ReleasedDraws, DreamBooth):
    pass


class OfficialDomainStudioSD(ReleasedDraws, DomainStudio):
    @classmethod
    def check(cls, loss, data, kind) -> None:
        super().check(loss, data, kind)
        if loss.source != "class_prompt":
            raise ConfigError("loss.mode=official on a text-to-image model uses loss.source=class_prompt (the "
                              f"released code); got {loss.source!r}")

    def __init__(self, **kw):
        super().__init__(**kw)
        self.has_global = False  # every term is local to the micro-batch
        self.pairwise = OfficialPairwise(self.loss)

    def micro_batch(self, step, ks):
        mb = super().micro_batch(step, ks)
        mb["t_shared"] = torch.full((len(ks),), self.draws.shared_t(step, ks[0]), dtype=torch.long, device=self.device)
        # the hf-MSE target: a random batch of the images, unmirrored (cropped at random again with data.random_crop)
        images = self.batches.instances
        other = self.draws.other_batch(step, ks[0], len(images), len(ks))
        mb["x_other"] = images.crop(other, torch.zeros_like(other), self.draws, step, ks, stream=4)[0]
        return mb

    def forward(self, model, mb, need_source):
        return self.released_branch(model, mb, self.denoise(model, mb)[0])

    def released_branch(self, model, mb, out):
        """The released pairwise/hf branch, added to ``out`` (see the module docstring)."""
        lam, sch, t = self.loss, self.process.scheduler, mb["t_shared"]
        if "zc" not in mb:  # the released script runs the branch only with prior preservation
            return out
        m = t.shape[0]
        z_t = torch.cat([sch.add_noise(mb["z"], mb["noise"], t), sch.add_noise(mb["zc"], mb["noise_c"], t)])
        pred = self.family.predict(model, z_t, torch.cat([t, t]), cat(self.instance_cond(mb), self.class_cond(mb)))
        x0 = predicted_x0(sch, pred, z_t, torch.cat([t, t]))
        if sch.config.get("clip_sample", False):  # as DDPMScheduler.step's pred_original_sample
            r = sch.config.get("clip_sample_range", 1.0)
            x0 = x0.clamp(-r, r)
        grad = torch.is_grad_enabled()
        inst, cls = self.family.decode(x0[:m], grad, unscale=False), self.family.decode(x0[m:], grad, unscale=False)
        image, hf = self.pairwise(cls, inst)
        hfmse = weighted_hf_mse(inst, mb["x_other"], torch.ones(m, device=inst.device), "domainstudio",
                                lam.backend)
        for key, weight, value in (("image", lam.image, image), ("hf", lam.hf, hf), ("hfmse", lam.hfmse, hfmse)):
            if weight > 0:
                out.loss = out.loss + weight * value
                out.terms[key], out.heads[key] = value, weight * value
        out.outputs = (*out.outputs, pred)
        return out
