"""The tiny SD-XL, SD3 and FLUX.1 pipelines of dsfast.train.testing build offline, save, load back through
``DiffusionPipeline.from_pretrained`` as the right class and generate finite 16 px images."""
import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline, StableDiffusionXLPipeline

from dsfast.train.testing import make_flux_pipeline, make_sd3_pipeline, make_sdxl_pipeline


def _generate(pipe, **kw):
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a photo of sks dog", num_inference_steps=2, height=16, width=16, output_type="np",
               generator=torch.Generator().manual_seed(0), **kw).images
    assert out.shape == (1, 16, 16, 3)
    assert np.isfinite(out).all()
    return out


def test_sdxl(tmp_path):
    path = make_sdxl_pipeline(tmp_path / "sdxl")
    pipe = DiffusionPipeline.from_pretrained(path)
    assert type(pipe) is StableDiffusionXLPipeline
    unet = pipe.unet.config
    assert unet.addition_embed_type == "text_time"
    assert unet.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert unet.projection_class_embeddings_input_dim == (6 * unet.addition_time_embed_dim
                                                          + pipe.text_encoder_2.config.projection_dim)
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert pipe.scheduler.config.timestep_spacing == "leading" and pipe.scheduler.config.steps_offset == 1
    assert pipe.config.force_zeros_for_empty_prompt
    _generate(pipe, guidance_scale=5.0)


@pytest.mark.parametrize("t5", [True, False], ids=["t5", "no_t5"])
def test_sd3(tmp_path, t5):
    path = make_sd3_pipeline(tmp_path / "sd3", t5=t5)
    if t5:
        pipe = DiffusionPipeline.from_pretrained(path)
        assert type(pipe.text_encoder_3).__name__ == "T5EncoderModel"
        assert pipe.tokenizer_3("a photo", padding="max_length", max_length=8).input_ids[-1] == pipe.tokenizer_3.pad_token_id
    else:
        # model_index.json records text_encoder_3 / tokenizer_3 as null, and diffusers does not count them
        # optional: a T5-less SD3 folder loads only with both passed as None (as with the real SD3 models)
        with pytest.raises(ValueError, match="text_encoder_3"):
            DiffusionPipeline.from_pretrained(path)
        pipe = DiffusionPipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)
        assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    assert type(pipe) is StableDiffusion3Pipeline
    assert pipe.vae.config.latent_channels == pipe.transformer.config.in_channels == 16
    assert pipe.vae.config.shift_factor is not None
    assert pipe.transformer.config.pooled_projection_dim == (pipe.text_encoder.config.projection_dim
                                                             + pipe.text_encoder_2.config.projection_dim)
    _generate(pipe, guidance_scale=5.0)


@pytest.mark.parametrize("guidance_embeds", [True, False], ids=["guidance", "no_guidance"])
def test_flux(tmp_path, guidance_embeds):
    path = make_flux_pipeline(tmp_path / "flux", guidance_embeds=guidance_embeds)
    pipe = DiffusionPipeline.from_pretrained(path)
    assert type(pipe) is FluxPipeline
    assert pipe.transformer.config.guidance_embeds is guidance_embeds
    assert pipe.transformer.config.in_channels == 4 * pipe.vae.config.latent_channels
    assert sum(pipe.transformer.config.axes_dims_rope) == pipe.transformer.config.attention_head_dim
    assert pipe.scheduler.config.use_dynamic_shifting
    _generate(pipe, guidance_scale=3.5 if guidance_embeds else 0.0)


def test_seeded(tmp_path):
    """The same seed builds the same weights; another seed other weights."""
    from safetensors.torch import load_file

    folders = [make_flux_pipeline(tmp_path / str(i), seed=s) for i, s in enumerate((0, 0, 1))]
    weights = [load_file(f / "transformer" / "diffusion_pytorch_model.safetensors") for f in folders]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
