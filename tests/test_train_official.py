"""loss.mode=official reproduces the released DomainStudio training step (commit cc69341).

The truth here is an independent transcription of the released step (its double loops with
nn.CosineSimilarity, nn.Softmax(dim=1), nn.KLDivLoss() and a conv2d Haar with its filters; the text-to-image
prompts tokenised unpadded and padded together, latents sampled from the VAE posterior), fed with the draws
taken from the run's :class:`Draws` directly (not from the method's micro-batch); the engine's ``run_step``
must give the same loss and gradients. Also: the official defaults, the samplers, and the per-term gradient
norms logged on logging steps.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, PNDMScheduler
from torch import nn

import dsfast.train.sample as sample_module
from dsfast.images import list_images, read_image
from dsfast.train import methods
from dsfast.train.config import family_options, load_config, official_differences, resolve
from dsfast.train.data import Draws, RandomCrops, load_images
from dsfast.train.diffusion import vlb_term
from dsfast.train.engine import run_step
from dsfast.train.errors import ConfigError
from dsfast.train.families import TEXT2IMAGE, UNCONDITIONAL
from dsfast.train.models import describe, load
from dsfast.train.testing import make_unconditional_pipeline, tiny_config, write_images

BATCH = 4
CPU = torch.device("cpu")


def _haar_bands(x):
    """LH, HL, HH of the released get_wave: stride-2 2x2 depthwise conv, L = [1, 1]/√2, H = [-1, 1]/√2."""
    low = torch.ones(1, 2, dtype=x.dtype) / math.sqrt(2)
    high = low.clone()
    high[0, 0] = -high[0, 0]
    c = x.shape[1]
    out = []
    for f in (low.T * high, high.T * low, high.T * high):
        conv = nn.Conv2d(c, c, 2, stride=2, bias=False, groups=c)
        conv.weight.data = f.unsqueeze(0).expand(c, -1, -1, -1).clone()
        conv.weight.requires_grad_(False)
        out.append(conv(x))
    return out


def _hf(x):
    lh, hl, hh = _haar_bands(x)
    return lh + hl + hh


def _sim_loss(base, ada, sub):
    """The released double loop on the subset ``sub`` of the batch."""
    sim, sfm, kl = nn.CosineSimilarity(), nn.Softmax(dim=1), nn.KLDivLoss()
    n = len(sub)
    dist_base, dist_ada = torch.zeros(n, n - 1), torch.zeros(n, n - 1)
    for dist, feats in ((dist_base, base), (dist_ada, ada)):
        for p1 in range(n):
            col = 0
            anchor = feats[sub[p1]].reshape(-1).unsqueeze(0)
            for p2 in range(n):
                if p1 != p2:
                    dist[p1, col] = sim(anchor, feats[sub[p2]].reshape(-1).unsqueeze(0))
                    col += 1
    return kl(torch.log(sfm(dist_ada)), sfm(dist_base))


def _released_loss(unet, source, sched, mb):
    x0, t, noise, sub = mb["x0"], mb["t"], mb["noise"], [int(i) for i in mb["subset"]]
    ab = sched.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    out, base = unet(x_t, t).sample, source(x_t, t).sample
    c = x0.shape[1]
    learned = out.shape[1] == 2 * c
    if learned:
        out, var = out[:, :c], out[:, c:]
        base = base[:, :c]
    mean_flat = lambda v: v.mean(dim=list(range(1, v.ndim)))  # noqa: E731
    mse = mean_flat((noise - out) ** 2)

    def x0_from_eps(eps):
        return (1 / ab).sqrt() * x_t - (1 / ab - 1).sqrt() * eps

    x0_ada, x0_true, x0_base = x0_from_eps(out), x0_from_eps(noise), x0_from_eps(base)
    mse2 = 1.0 * mean_flat((_hf(x0_ada) - _hf(x0_true)) ** 2)
    sim = 4.0 * _sim_loss(x0_base, x0_ada, sub)
    if not learned:
        return (mse + sim).mean()
    sim2 = 4.0 * _sim_loss(_hf(x0_base), _hf(x0_ada), sub)
    # L_vlb: the released _vb_terms_bpd on the stop-gradient mean (rescaled), as dsfast's vlb_term
    vb = vlb_term(sched, out.detach(), var, x0, x_t, t, "learned_range")
    return (mse + sim + sim2 + mse2).mean() + vb


def _method(root, learned, mode="official", **over):
    model = f"{root}/model_{int(learned)}"
    cfg = resolve(load_config(tiny_config(root, model, f"{root}/imgs", train__batch_size=BATCH, loss__mode=mode,
                                          train__mixed_precision="no", **over)), "unet2d")
    bundle = load(describe(model), model, dtype=torch.float32, lora=None, frozen_source=True, device=CPU)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # adapted != source, else the pairwise gradients vanish
        for p in bundle.unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    draws = Draws(seed=0, batch_size=BATCH, num_timesteps=1000, random_flip=cfg.data.random_flip)
    m = methods.get("domainstudio", "unet2d", mode)(
        bundle=bundle, images=load_images(cfg.data.instance_dir, 16), draws=draws, loss=cfg.loss, data=cfg.data,
        sample=cfg.sample, dtype=torch.float32, device=CPU)
    return cfg, bundle, m


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("official")
    for learned in (False, True):
        make_unconditional_pipeline(r / f"model_{int(learned)}", learned_sigma=learned)
    write_images(r / "imgs", 5)
    return str(r)


def _engine_step(method, unet, step, ks):
    """One ``run_step`` of the engine on the micro-batch ``ks``: ``(logged terms, gradients)``."""
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    logs = run_step(method, unet, [method.micro_batch(step, ks)], lambda loss: loss.backward(), step=step, device=CPU)
    return logs, [p.grad.clone() for p in params]


def _assert_same_step(logs, grads, ref, unet):
    assert logs["loss"] == pytest.approx(ref.item(), rel=1e-5)
    g_ref = torch.autograd.grad(ref, [p for p in unet.parameters() if p.requires_grad])
    scale = max(g.abs().max().item() for g in g_ref)
    for a, b in zip(grads, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * scale)


@pytest.mark.slow
@pytest.mark.parametrize("learned", [False, True], ids=["fixed_sigma", "learned_sigma"])
def test_official_unconditional_step_equals_released_loss(root, learned):
    torch.manual_seed(0)
    cfg, bundle, method = _method(root, learned)
    assert not method.has_global and bundle.source.training  # local per micro-batch; source in train mode
    images, draws, ks = method.batches.instances.pixels[0], method.draws, list(range(BATCH))
    for step in (0, 5):
        idx, flip, t, noise = draws.batch(step, ks, images.shape[0], images.shape[1:])
        x0 = torch.stack([images[i].flip(-1) if f else images[i] for i, f in zip(idx, flip)])
        released = {"x0": x0, "t": t, "noise": noise, "subset": draws.subset(step, 0, BATCH, 3)}
        assert len(set(released["subset"].tolist())) == 3
        logs, grads = _engine_step(method, bundle.unet, step, ks)
        assert ("hf" in logs) == learned and ("hfmse" in logs) == learned
        _assert_same_step(logs, grads, _released_loss(bundle.unet, bundle.source, bundle.scheduler, released),
                          bundle.unet)


def test_official_defaults_and_checks(root):
    cfg, _, _ = _method(root, False)
    assert (cfg.train.weight_decay, cfg.train.max_grad_norm, cfg.train.ema_warmup, cfg.data.random_flip,
            cfg.loss.hfmse_weighting) == (0.0, 0.0, False, True, "none")
    cfg, _, _ = _method(root, False, mode="dsfast")
    assert (cfg.train.weight_decay, cfg.train.max_grad_norm, cfg.train.ema_warmup, cfg.loss.hfmse_weighting) == \
        (0.0, 1.0, True, "min_snr")
    with pytest.raises(ConfigError, match="micro_batch_size must be >= 3"):
        resolve(load_config(tiny_config(root, f"{root}/model_0", f"{root}/imgs", train__batch_size=4,
                                        train__micro_batch_size=2, loss__mode="official",
                                        train__mixed_precision="no")), "unet2d")
    with pytest.raises(ConfigError, match="loss.num_anchors"):
        resolve(load_config(tiny_config(root, f"{root}/model_0", f"{root}/imgs", loss__mode="official",
                                        loss__num_anchors=2, train__mixed_precision="no")), "unet2d")


def _resolved(root, family, mode, world=1, **over):
    t2i = dict(data__instance_prompt="a sks dog", data__class_prompt="a dog") if family == "sd" else {}
    return resolve(load_config(tiny_config(root, f"{root}/model_0", f"{root}/imgs", loss__mode=mode,
                                           train__batch_size=None, sample__num_inference_steps=None, **t2i, **over)),
                   family, world=world)


def test_official_takes_the_released_settings(root, monkeypatch):
    """fp16 (unconditional; on CPU an error until float32 is asked for), the per-GPU batch, the EMA and the
    raw weights in final/, DDIM with 20 steps (text-to-image), and the items not reproduced, logged."""
    with pytest.raises(ConfigError, match="set train.mixed_precision=no to run it in float32"):
        _resolved(root, "unet2d", "official")
    cfg = _resolved(root, "unet2d", "official", train__mixed_precision="no")
    assert "precision (train.mixed_precision=no; released: fp16)" in official_differences(cfg, UNCONDITIONAL)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = _resolved(root, "unet2d", "official", world=2)
    t, s = cfg.train, cfg.sample
    assert (t.mixed_precision, t.batch_size, t.micro_batch_size, t.ema, t.final_raw) == ("fp16", 6, 3, 0.9999, True)
    assert (s.scheduler, s.num_inference_steps, s.precision) == ("pipeline", 50, "fp16")
    assert [d.split(" (")[0] for d in official_differences(cfg, UNCONDITIONAL)] == ["data order"]
    cfg = _resolved(root, "sd", "official", world=2)
    t, s = cfg.train, cfg.sample
    assert (t.mixed_precision, t.batch_size, t.micro_batch_size, t.final_raw) == ("no", 8, 4, True)
    assert (s.scheduler, s.num_inference_steps, s.precision) == ("ddim", 20, "fp16")
    assert cfg.data.random_crop and [d.split(" (")[0] for d in official_differences(cfg, TEXT2IMAGE)] == ["data order"]
    cfg = _resolved(root, "sd", "official", world=2, data__random_crop=False)
    assert [d.split(" (")[0] for d in official_differences(cfg, TEXT2IMAGE)] == ["data order", "crop"]
    for family in ("unet2d", "sd"):
        cfg = _resolved(root, family, "dsfast")
        assert (cfg.train.mixed_precision, cfg.train.final_raw, cfg.sample.scheduler, cfg.sample.num_inference_steps,
                cfg.sample.precision) == ("no", False, "pipeline", 50, "no")
        assert official_differences(cfg, UNCONDITIONAL) == []
    with pytest.raises(ConfigError, match="sample.scheduler=ddim does not apply to flux models"):
        _resolved(root, "flux", "dsfast", sample__scheduler="ddim")


def test_min_snr_weighting_caps_the_hf_mse(root):
    """min_snr: each sample's hf-MSE x min(SNR_t, 1), so it never exceeds the eps-space hf error."""
    _, bundle, method = _method(root, False, mode="dsfast", loss__image=0.0, loss__hf=0.0)
    mb = method.micro_batch(0, list(range(BATCH)))
    mb["t"] = torch.tensor([0, 300, 700, 999])
    out = method.forward(bundle.unet, mb, need_source=False)
    ab = bundle.scheduler.alphas_cumprod[mb["t"]].view(-1, 1, 1, 1)
    x_t = ab.sqrt() * mb["x0"] + (1 - ab).sqrt() * mb["noise"]
    eps = bundle.unet(x_t, mb["t"]).sample
    per_eps = _hf(eps - mb["noise"]).pow(2).flatten(1).mean(1)  # |hf(eps_hat - eps)|^2
    snr = (ab / (1 - ab)).flatten()
    expected = (per_eps / snr * snr.clamp(max=1)).mean()
    assert out.terms["hfmse"].item() == pytest.approx(expected.item(), rel=1e-4)
    assert out.terms["hfmse"].item() <= per_eps.mean().item() * (1 + 1e-5)


def test_grad_norms_are_the_loss_head_gradients_and_do_not_depend_on_micro_batches(root):
    _, bundle, method = _method(root, False, mode="dsfast")
    ks = list(range(BATCH))
    logs = {}
    for micro in (BATCH, 2):
        mbs = [method.micro_batch(3, ks[i:i + micro]) for i in range(0, BATCH, micro)]
        logs[micro] = run_step(method, bundle.unet, mbs, lambda loss: None, step=3, device=CPU,
                                 grad_norms=True)
    for k in ("simple", "hfmse", "image", "hf"):
        assert logs[BATCH][f"grad_norm/{k}"] > 0
        assert logs[2][f"grad_norm/{k}"] == pytest.approx(logs[BATCH][f"grad_norm/{k}"], rel=1e-4)
    # L_simple = mean((eps_hat - eps)^2): its gradient w.r.t. the output is 2 (eps_hat - eps) / numel
    mb = method.micro_batch(3, ks)
    ab = bundle.scheduler.alphas_cumprod[mb["t"]].view(-1, 1, 1, 1)
    with torch.no_grad():
        eps = bundle.unet(ab.sqrt() * mb["x0"] + (1 - ab).sqrt() * mb["noise"], mb["t"]).sample
    expected = (2 * (eps - mb["noise"]) / eps.numel()).norm().item()
    assert logs[BATCH]["grad_norm/simple"] == pytest.approx(expected, rel=1e-4)


# ----------------------------------------------------------------------------- text-to-image


def _released_sd_loss(unet, vae, text_encoder, tokenizer, sched, prompts, released):
    """The released train_domainstudio.py step (prior preservation on, pad_tokens=False), transcribed."""
    sim, sfm, kl = nn.CosineSimilarity(), nn.Softmax(dim=1), nn.KLDivLoss()

    def dist(feats):
        n = feats.shape[0]
        d = torch.zeros(n, n - 1)
        for p1 in range(n):
            col = 0
            anchor = feats[p1].reshape(-1).unsqueeze(0)
            for p2 in range(n):
                if p1 != p2:
                    d[p1, col] = sim(anchor, feats[p2].reshape(-1).unsqueeze(0))
                    col += 1
        return sfm(d)

    m = released["z"].shape[0]
    ids = [tokenizer(p, padding="do_not_pad", truncation=True, max_length=tokenizer.model_max_length).input_ids
           for p in prompts]  # collate_fn: the instance prompts, then the class prompts, padded to the longest
    input_ids = tokenizer.pad({"input_ids": [ids[0]] * m + [ids[1]] * m}, padding=True, return_tensors="pt").input_ids
    enc = text_encoder(input_ids)[0]
    latents = torch.cat([released["z"], released["zc"]])
    noise = torch.cat([released["noise"], released["noise_c"]])
    timestep = released["t_shared"]
    timesteps = (timestep * torch.ones(2 * m)).long()
    noisy = sched.add_noise(latents, noise, timesteps)
    residual = unet(noisy, timesteps, enc).sample
    pred_sample = sched.step(residual, timestep, noisy).pred_original_sample
    pred_instance, pred_class = torch.chunk(pred_sample, 2, dim=0)
    image, image_prior = vae.decode(pred_instance.float()).sample, vae.decode(pred_class.float()).sample
    rel_loss = kl(torch.log(dist(image)), dist(image_prior))
    image_wave, prior_wave = _hf(image), _hf(image_prior)
    rel_wave_loss = kl(torch.log(dist(image_wave)), dist(prior_wave))
    wave_loss = F.mse_loss(image_wave.float(), _hf(released["x_other"]).float(), reduction="mean")
    timesteps = torch.cat([released["t"], released["t_c"]])
    pred = unet(sched.add_noise(latents, noise, timesteps), timesteps, enc).sample
    pred_i, pred_p = torch.chunk(pred, 2, dim=0)
    t_i, t_p = torch.chunk(noise, 2, dim=0)
    loss = F.mse_loss(pred_i.float(), t_i.float(), reduction="mean")
    prior = F.mse_loss(pred_p.float(), t_p.float(), reduction="mean")
    return loss + 1.0 * prior + 100.0 * rel_loss + 100.0 * rel_wave_loss + 0.1 * wave_loss


def _released_draws(vae, draws, images, class_images, step, ks):
    """The released step's random inputs, drawn from the run's :class:`Draws` (one stream per draw): latents
    ``latent_dist.sample() * 0.18215``, per-sample t and noise, the class samples' own t, one t for the pairwise
    branch, and the hf-MSE target: a batch of instance images drawn on its own (a second shuffled loader)."""
    m, out = len(ks), {}
    for key, imgs, stream in (("", images, 0), ("c", class_images, 1)):
        idx, flip, t, noise = draws.batch(step, ks, len(imgs), (4, 8, 8), stream=stream)
        assert not flip.any()  # no --hflip
        dist = vae.encode(_released_crops(imgs, idx, draws, step, ks, stream)).latent_dist
        n = torch.stack([draws.draw(step, k, (4, 8, 8), stream=stream + 2)[2] for k in ks])
        out.update({f"z{key}": (dist.mean + dist.std * n) * 0.18215, f"t{'_c' if key else ''}": t,
                    f"noise{'_c' if key else ''}": noise})
    other = draws.other_batch(step, ks[0], len(images), m)
    assert len(set(other.tolist())) == m  # a batch of distinct images, as a shuffled loader gives
    out.update(t_shared=draws.shared_t(step, ks[0]), x_other=_released_crops(images, other, draws, step, ks, 4))
    return out


def _released_crops(images, idx, draws, step, ks, stream):
    """The images ``idx`` as the released loader gives them: ``images`` cropped already (a tensor), or each image
    resized (a list) and cropped by ``RandomCrop`` at a random window (the run's window draws)."""
    if isinstance(images, torch.Tensor):
        return images[idx]
    crops = []
    for k, i in zip(ks, idx.tolist()):
        top, left = draws.window(step, k, images[i].shape[1] - 16, images[i].shape[2] - 16, stream)
        crops.append(images[i][:, top:top + 16, left:left + 16])
    return torch.stack(crops)


@pytest.fixture(scope="module")
def sd_root(tmp_path_factory):
    from dsfast.train.testing import make_sd_pipeline

    r = tmp_path_factory.mktemp("official_sd")
    make_sd_pipeline(r / "sd")
    write_images(r / "imgs", 4, size=16)
    return r


def test_the_sampler_is_the_pipelines_own_or_the_released_one(sd_root, tmp_path):
    """dsfast mode samples (class images, grids, final/) with the pipeline's own scheduler, official t2i with DDIM."""
    import json
    import shutil

    model = tmp_path / "sd"
    shutil.copytree(sd_root / "sd", model)
    sched_file = model / "scheduler" / "scheduler_config.json"
    sched_file.write_text(json.dumps({**json.loads(sched_file.read_text()), "_class_name": "PNDMScheduler"}))
    index = model / "model_index.json"  # as an SD-1.x folder: a PNDM scheduler
    index.write_text(json.dumps({**json.loads(index.read_text()), "scheduler": ["diffusers", "PNDMScheduler"]}))
    for mode, want in (("dsfast", PNDMScheduler), ("official", DDIMScheduler)):
        cfg = resolve(load_config(tiny_config(tmp_path, model, sd_root / "imgs", loss__mode=mode,
                                              data__instance_prompt="a sks dog", data__class_prompt="a dog")), "sd",
                      down_factor=4)
        bundle = load(describe(str(model)), str(model), dtype=torch.float32, lora=None, frozen_source=False,
                      device=CPU, options=family_options(cfg))
        assert type(bundle.family.pipeline(bundle.unet, CPU).scheduler) is want


@pytest.mark.slow
@pytest.mark.parametrize("clip_sample, random_crop", [(False, False), (True, False), (False, True)],
                         ids=["no_clip", "clip_sample", "random_crop"])
def test_official_text2image_step_equals_released_loss(sd_root, tmp_path, monkeypatch, clip_sample, random_crop):
    """The engine's step against the released step with the released draws; DDIM class images with 20 steps; with
    images that are not square, the released random crops (of the instance images and of the hf-MSE target)."""
    import json
    import shutil

    model = tmp_path / "sd"
    shutil.copytree(sd_root / "sd", model)
    sched_file = model / "scheduler" / "scheduler_config.json"
    sched_file.write_text(json.dumps({**json.loads(sched_file.read_text()), "clip_sample": clip_sample}))
    imgs = sd_root / "imgs"
    if random_crop:  # wide and tall images: the released loader's RandomCrop has room to move
        imgs = write_images(tmp_path / "imgs", 0, sizes=[(16, 24), (21, 16), (16, 19), (30, 16)])
    cfg = resolve(load_config(tiny_config(
        tmp_path, model, imgs, loss__mode="official", train__batch_size=3,
        data__instance_prompt="a sks dog", data__class_prompt="a dog", data__num_class_images=3,
        data__class_dir=str(tmp_path / "class"), sample__num=2, sample__num_inference_steps=None)), "sd",
        down_factor=4)
    assert (cfg.train.weight_decay, cfg.train.max_grad_norm, cfg.data.random_flip) == (1e-2, 0.0, False)
    bundle = load(describe(str(model)), str(model), dtype=torch.float32, lora=None, frozen_source=False, device=CPU,
                  options=family_options(cfg))
    assert bundle.source is None  # the released script loads a frozen copy it never uses
    seen = []

    def recording(pipe, num, **kw):  # the class images: which sampler, steps and precision; random pixels
        seen.append((type(pipe.scheduler), kw["num_inference_steps"], pipe.unet.dtype))
        return torch.rand(num, 3, 16, 16, generator=torch.Generator().manual_seed(len(seen)))

    monkeypatch.setattr(sample_module, "run_pipeline", recording)
    draws = Draws(seed=0, batch_size=3, num_timesteps=1000, random_flip=False)
    images = load_images(cfg.data.instance_dir, 16)
    method = methods.get("domainstudio", "sd", "official")(
        bundle=bundle, images=images, draws=draws, loss=cfg.loss, data=cfg.data, sample=cfg.sample,
        dtype=torch.float32, device=CPU)
    assert seen == [(DDIMScheduler, 20, torch.float32)] * 3  # as released: DDIM, 20 steps (fp16 on a GPU only)
    assert not method.has_global
    unet = bundle.unet.train()
    # a step whose shared t leaves x0 predictions outside [-1, 1] (the clip_sample branch clips them)
    step = next(s for s in range(100) if draws.shared_t(s, 0) > 600)
    resized = [read_image(f, shorter=16, range01=False) for f in list_images(imgs)] if random_crop else images
    assert cfg.data.random_crop and isinstance(method.batches.instances, RandomCrops) == random_crop
    released = _released_draws(bundle.vae, draws, resized, load_images(cfg.data.class_dir, 16), step, [0, 1, 2])
    logs, grads = _engine_step(method, unet, step, [0, 1, 2])
    assert {"instance", "prior", "image", "hf", "hfmse"} <= set(logs)
    sched = DDPMScheduler.from_pretrained(str(model), subfolder="scheduler")  # the released noise_scheduler
    ref = _released_sd_loss(unet, bundle.vae, bundle.family.parts["text_encoder"], bundle.family.parts["tokenizer"],
                            sched, ["a sks dog", "a dog"], released)
    _assert_same_step(logs, grads, ref, unet)
