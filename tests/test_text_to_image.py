"""Text-to-image latent diffusion (diffusers' StableDiffusionPipeline layout) end to end: kind and size from the
configs, prompts through a CLIP text encoder, classifier-free guidance as one UNet pass of 2N, PTQ4DM calibrated on
the built-in prompts with the same guidance, the int8 OpenVINO graph with encoder_hidden_states as an input, and the
service (prompt fields validated in one place, PNGs of the decoded size).

Everything is tiny, random and written by tests/serving_helpers.py: a character-level CLIP vocabulary (no network),
a 1-layer text encoder, a 4x4x4 latent UNet2DConditionModel and an AutoencoderKL that upsamples 2x (8x8 RGB images).
"""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from markers import needs_openvino
from PIL import Image
from serving_helpers import CALIBRATION, CONTEXT, WIDTH, decode_png, generate_png, save_text_to_image
from test_openvino import OPENVINO_VS_FAKE_BOUND
from test_quantize import rel_error

from quantizer.diffusion.images import to_uint8
from quantizer.diffusion.kinds import TEXT_TO_IMAGE, ModelKind, image_size, read_kind
from quantizer.diffusion.models import load_model
from quantizer.diffusion.prompts import DEFAULT_GUIDANCE_SCALE, builtin_prompts, check_text_inputs
from quantizer.diffusion.sampling import sample
from quantizer.engine import Engine
from quantizer.execution.executor import build_executor
from quantizer.ptq.calibration import build_calibration_set
from quantizer.ptq.config import CalibrationConfig
from quantizer.ptq.pipeline import quantize_model
from service.model_info import model_info

pytest_plugins = ["service.testing"]



@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """StableDiffusionPipeline.save_pretrained itself writes the layout and model_index.json."""
    return save_text_to_image(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def sd_model(sd_dir):  # noqa: ANN201
    return load_model(sd_dir)


def test_kind_and_size_come_from_the_configs(sd_dir, sd_model):
    assert read_kind(sd_dir) == ModelKind(TEXT_TO_IMAGE) and image_size(sd_dir) == (8, 8)
    info = model_info(str(sd_dir))
    assert info.size == "8x8" and info.takes_prompt
    assert sd_model.kind == TEXT_TO_IMAGE and sd_model.image_shape == (3, 8, 8)
    assert sd_model.text_encoder is not None and sd_model.sample_shape == (4, 4, 4)


def test_text_fields_are_validated_in_one_place(sd_model):
    text, plain = ModelKind(TEXT_TO_IMAGE), ModelKind()
    check_text_inputs("a cat", "blurry", 5.0, text)
    for args, kind, message in [((None, None, None), text, "prompt: required"),
                                (("a cat", None, None), plain, "prompt: the model is unconditional"),
                                ((None, "x", None), plain, "negative_prompt: the model"),
                                ((None, None, 3.0), plain, "guidance_scale: the model"),
                                (("x" * 501, None, None), text, "prompt must be at most 500"),
                                (("a", None, 0.5), text, "guidance_scale must be in")]:
        with pytest.raises(ValueError, match=message):
            check_text_inputs(*args, kind)
    assert len(builtin_prompts()) >= 200 and len(set(builtin_prompts())) == len(builtin_prompts())


def test_sampling_matches_diffusers_stable_diffusion(sd_dir, sd_model):
    """The same x_T (a seed's generator), DDIM with CFG as one 2N pass, the KL decode: what the pipeline makes."""
    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe("a red fox", negative_prompt="blurry", num_inference_steps=4, guidance_scale=6.0, height=8, width=8,
               generator=torch.Generator().manual_seed(5), output_type="np").images
    text = sd_model.text_encoder.condition(["a red fox"], ["blurry"], [6.0])
    ours = sample(sd_model.unet, sd_model.scheduler_config, [5], steps=4, decoder=sd_model.decoder, text=text)
    assert ours.shape == (1, 3, 8, 8)
    np.testing.assert_allclose((ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy(), ref, atol=1e-4)


def test_image_k_depends_only_on_its_seed_and_prompt(sd_model):
    unet, sched, vae, enc = sd_model.unet, sd_model.scheduler_config, sd_model.decoder, sd_model.text_encoder
    alone = sample(unet, sched, [5], steps=3, eta=0.5, decoder=vae, text=enc.condition(["a cat"]))
    batch = sample(unet, sched, [7, 5, 9], steps=3, eta=0.5, decoder=vae,
                   text=enc.condition(["a dog", "a cat", "a ship"], [None, None, "x"], [2.0, None, 9.0]))
    torch.testing.assert_close(batch[1], alone[0], atol=1e-4, rtol=0)
    other = sample(unet, sched, [5], steps=3, eta=0.5, decoder=vae, text=enc.condition(["a ship at sea"]))
    assert (other - alone).abs().mean() > 1e-3  # the prompt reaches the image
    with pytest.raises(ValueError, match="prompt"):
        sample(unet, sched, [5], steps=1)


def test_the_engine_takes_prompts(sd_dir):
    engine = Engine.load(sd_dir)
    engine.validate("ddim", 2, 0.0, 1, prompt="a cat", guidance_scale=DEFAULT_GUIDANCE_SCALE)
    for kwargs, field in (({}, "prompt"), ({"prompt": "a", "class_labels": [0]}, "class_labels")):
        with pytest.raises(ValueError, match=field):
            engine.validate("ddim", 2, 0.0, 1, **kwargs)
    out = engine.generate([5, 6], steps=2, prompts=["a cat", "a dog"])
    assert out.images.shape == (2, 8, 8, 3)
    with pytest.raises(ValueError, match="prompt"):
        engine.generate([5], steps=2)


def test_calibration_runs_the_builtin_prompts_with_guidance_as_served(sd_model):
    config = CalibrationConfig(method="uniform", n_samples=4, steps=4, batch_size=4, seed=0)
    calib = build_calibration_set(sd_model.unet, sd_model.scheduler_config, config, progress=False,
                                  text_encoder=sd_model.text_encoder)
    # every x_t twice: with the negative ('') embedding, then with its prompt's
    assert len(calib) == 8 and calib.encoder_hidden_states.shape == (8, CONTEXT, WIDTH)
    torch.testing.assert_close(calib.xs[0::2], calib.xs[1::2])
    empty = sd_model.text_encoder([""])[0]
    torch.testing.assert_close(calib.encoder_hidden_states[0], empty)
    assert not torch.allclose(calib.encoder_hidden_states[1], empty)
    xs, ts, extra = next(calib.inputs())
    assert extra["encoder_hidden_states"].shape[0] == len(xs) == len(ts)
    with pytest.raises(ValueError, match="text encoder"):
        build_calibration_set(sd_model.unet, sd_model.scheduler_config, config, progress=False)


@needs_openvino
def test_w8a8_on_openvino_matches_the_simulation(sd_model, tmp_path):
    """Only the UNet is quantized; the OpenVINO graph takes the text embeddings as an input."""
    q = quantize_model(sd_model, "w8a8", {**CALIBRATION, "preset": "ptq4dm"}, cache_dir=tmp_path, progress=False)
    assert q.text_encoder is sd_model.text_encoder and q.decoder is sd_model.decoder
    probe = build_calibration_set(sd_model.unet, sd_model.scheduler_config,
                                  CalibrationConfig(method="uniform", n_samples=4, steps=4, seed=3), progress=False,
                                  text_encoder=sd_model.text_encoder)
    x, t, states = probe.xs, probe.ts, probe.encoder_hidden_states
    executor = build_executor(q.unet, "openvino", max_batch=8)
    with torch.no_grad():
        real = executor(x, t, encoder_hidden_states=states).sample
        fake = q.unet(x, t, encoder_hidden_states=states).sample
        fp = sd_model.unet(x, t, encoder_hidden_states=states).sample
        other = executor(x[:1], t[:1], encoder_hidden_states=states[1:2].flip(1)).sample
    assert rel_error(real, fake) < OPENVINO_VS_FAKE_BOUND
    assert rel_error(real, fake) < rel_error(fake, fp) / 2  # the quantized model, not the float one
    assert rel_error(other, real[:1]) > 1e-3  # the text input reaches the graph
    text = sd_model.text_encoder.condition(["a cat", "a dog"])
    images = sample(executor, q.scheduler_config, [3, 4], steps=3, decoder=q.decoder, text=text)
    assert images.shape == (2, 3, 8, 8)
    torch.testing.assert_close(images[1:], sample(executor, q.scheduler_config, [4], steps=3, decoder=q.decoder,
                                                  text=text.select(slice(1, 2))), atol=1e-4, rtol=0)


def test_api_validates_the_text_fields_against_each_model(sd_dir, tiny_model_dir, serve):
    """API-only (no worker): each 422 names its field, from the kinds read off the configs, which GET /v1/models
    reports."""
    with serve({"sd": sd_dir, "plain": tiny_model_dir}, worker=False) as client:
        described = {m["name"]: (m["kind"], m["width"], m["height"]) for m in client.get("/v1/models").json()}
        assert described == {"sd": ("text-to-image", 8, 8), "plain": ("unconditional", 16, 16)}
        bad = [({"model": "sd"}, "prompt", "required"),
               ({"model": "sd", "prompt": "x" * 501}, "prompt", "at most 500"),
               ({"model": "sd", "prompt": "a", "guidance_scale": 50.0}, "guidance_scale", "[1, 30]"),
               ({"model": "sd", "prompt": "a", "class_labels": 0}, "class_labels", "text-to-image"),
               ({"model": "plain", "prompt": "a cat"}, "prompt", "takes no prompt"),
               ({"model": "plain", "negative_prompt": "a"}, "negative_prompt", "takes no prompt"),
               ({"model": "plain", "guidance_scale": 2.0}, "guidance_scale", "text-to-image models only")]
        for body, field, message in bad:
            r = client.post("/v1/jobs", json=body)
            assert r.status_code == 422, (body, r.text)
            detail = r.json()["detail"]
            assert detail[0]["loc"] == ["body", field] and message in detail[0]["msg"], (body, detail)
        ok = client.post("/v1/jobs", json={"model": "sd", "prompt": "a red fox", "guidance_scale": 3.0})
        assert ok.status_code == 202, ok.text
        job = client.get(ok.headers["location"]).json()
        assert (job["prompt"], job["guidance_scale"], job["negative_prompt"]) == ("a red fox", 3.0, None)


@needs_openvino
def test_served_end_to_end_with_a_real_worker(sd_dir, sd_model, serve):
    with serve({"sd": sd_dir}) as client:
        body = {"seed": 6, "prompt": "a red fox", "negative_prompt": "blurry", "guidance_scale": 5.0}
        _, image = generate_png(client, body)
        assert image.shape == (8, 8, 3)  # the decoded size
        text = sd_model.text_encoder.condition(["a red fox"], ["blurry"], [5.0])
        expected = to_uint8(sample(sd_model.unet, sd_model.scheduler_config, [6], steps=3, decoder=sd_model.decoder,
                                   text=text))
        assert np.abs(image.astype(int) - expected[0].astype(int)).max() <= 1
        q = [client.post("/v1/generate", json={"seed": 6, "precision": "w8a8", "prompt": p}).json()
             for p in ("a red fox", "a blue ship")]
        assert all(r["status"] == "succeeded" for r in q), q
        assert decode_png(base64.b64decode(q[0]["images_png_base64"][0])).shape == (8, 8, 3)
        openai = client.post("/v1/images/generations", json={"prompt": "a red fox", "n": 1})
        assert openai.status_code == 200, openai.text
        assert client.post("/v1/generate", json={"seed": 6}).status_code == 422  # no prompt


def test_cli_generates_from_a_prompt(sd_dir, tiny_model_dir, tmp_path, capsys):

    from service.cli import main as ptq4dm

    out = tmp_path / "out"
    assert ptq4dm(["generate", "--model", str(sd_dir), "--prompt", "a red cat", "--guidance-scale", "5",
                   "--n", "2", "--steps", "2", "--seed", "3", "--out", str(out)]) == 0
    written = sorted(out.glob("*.png"))
    assert len(written) == 2 and Image.open(written[0]).size == (8, 8)
    # the same image as the Engine the worker uses, for the same seed and prompt
    expected = Engine.load(sd_dir).generate([3], steps=2, prompts=["a red cat"], guidance_scales=[5.0]).images[0]
    assert np.abs(np.asarray(Image.open(written[0])).astype(int) - expected.astype(int)).max() <= 1
    assert ptq4dm(["generate", "--model", str(sd_dir), "--n", "1", "--steps", "1", "--out", str(out)]) == 2
    assert "prompt" in capsys.readouterr().err
    assert ptq4dm(["generate", "--model", str(tiny_model_dir), "--prompt", "a cat", "--n", "1", "--steps", "1",
                   "--out", str(out)]) == 2
    assert "prompt" in capsys.readouterr().err
