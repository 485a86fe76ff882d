"""Class-conditional UNet2DModels end to end: kind detection, sampling with class labels, calibration, the int8
OpenVINO graph with a class input, the service (API validation, queue, worker) and the CLI.

A tiny random class-conditional UNet (8x8, 4 classes) saved in the diffusers layout stands in for a trained one.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from markers import needs_openvino
from serving_helpers import CALIBRATION, CC_UNET_CONFIG, CLASSES, decode_png, generate_png, save_class_conditional
from test_openvino import OPENVINO_VS_FAKE_BOUND
from test_quantize import rel_error

from quantizer.diffusion.images import to_uint8
from quantizer.diffusion.kinds import (
    CLASS_CONDITIONAL,
    UNCONDITIONAL,
    ModelKind,
    class_names_index,
    default_class_label,
    kind_of,
    read_class_names,
    read_kind,
)
from quantizer.diffusion.models import DiffusionModel, load_model
from quantizer.diffusion.sampling import sample
from quantizer.engine import Engine
from quantizer.execution.executor import build_executor, float_weights_of
from quantizer.execution.int8_x86 import int8_supported, lower_int8_x86
from quantizer.ptq.calibration import build_calibration_set
from quantizer.ptq.config import CalibrationConfig
from quantizer.ptq.pipeline import build_config, cache_key, cache_key_parts, quantize_model
from service.batching import pack_passes
from service.cli import main as ptq4dm
from service.jobs import JobRecord

pytest_plugins = ["service.testing"]


@pytest.fixture(scope="module")
def cc_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_class_conditional(tmp_path_factory.mktemp("class-cond"))


@pytest.fixture(scope="module")
def cc_model(cc_dir):  # noqa: ANN201
    return load_model(cc_dir)


def test_the_kind_is_read_from_the_config(cc_model, cc_dir, tiny_model_dir):
    assert (cc_model.kind, cc_model.num_classes) == (CLASS_CONDITIONAL, CLASSES)
    plain = load_model(tiny_model_dir)
    assert (plain.kind, plain.num_classes) == (UNCONDITIONAL, None)
    # the torch-free reader (what the API uses) agrees, and says None where there is no model to read
    assert read_kind(cc_dir).num_classes == CLASSES and read_kind(tiny_model_dir).kind == UNCONDITIONAL
    assert read_kind("/nowhere/model") is None


def test_kind_of_a_unet_config():
    assert kind_of({}) == ModelKind(UNCONDITIONAL)
    assert kind_of({"num_class_embeds": 10}) == ModelKind(CLASS_CONDITIONAL, 10)
    assert kind_of({"class_embed_type": "timestep", "num_class_embeds": 3}) == ModelKind(CLASS_CONDITIONAL, 3)
    for config in ({"class_embed_type": "timestep"}, {"num_class_embeds": 0}, {"class_embed_type": "projection"}):
        with pytest.raises(ValueError, match="not supported yet"):
            kind_of(config)


def _folder(path: Path, config: dict, index: dict | None = None) -> Path:
    (path / "unet").mkdir(parents=True)
    (path / "unet" / "config.json").write_text(json.dumps(config))
    if index is not None:
        (path / "model_index.json").write_text(json.dumps(index))
    return path


@pytest.mark.parametrize(("config", "index", "message"), [
    ({"_class_name": "UNet2DConditionModel", "cross_attention_dim": 32}, None, "text-to-image models"),
    ({"_class_name": "UNet2DModel"}, {"_class_name": "LDMPipeline", "vqvae": ["diffusers", "Mystery"]},
     "latent decoder"),
    ({"_class_name": "UNet2DModel", "class_embed_type": "identity"}, None, "class_embed_type='identity'"),
])
def test_unsupported_models_say_what_they_are(tmp_path, config, index, message):
    folder = _folder(tmp_path / "m", config, index)
    with pytest.raises(ValueError, match=message):
        load_model(folder)
    with pytest.raises(ValueError, match=message):
        read_kind(folder)


def test_class_names_come_from_id2label_where_they_fit(tmp_path):
    """model_index.json's id2label (DiTPipeline's place for them); a map that does not name exactly the model's
    classes is ignored, since names are only a convenience."""
    config = {"_class_name": "UNet2DModel", "num_class_embeds": 3}
    good = _folder(tmp_path / "good", config, class_names_index(["cat", "dog", "fox"]))
    assert read_kind(good) == ModelKind(CLASS_CONDITIONAL, 3)  # the index changes nothing else
    assert read_class_names(good, 3) == ("cat", "dog", "fox")
    assert read_class_names(good, 2) is None and read_class_names(good, None) is None
    assert read_class_names(_folder(tmp_path / "none", config), 3) is None
    for k, id2label in enumerate(({"0": "a", "1": "b"}, {"0": "a", "1": "b", "2": 3}, {"0": "a", "1": "", "2": "c"},
                                  {"1": "a", "2": "b", "3": "c"}, ["a", "b", "c"])):
        folder = _folder(tmp_path / f"bad{k}", config, {"id2label": id2label})
        assert read_class_names(folder, 3) is None, id2label


def test_image_k_depends_only_on_its_seed_and_label(cc_model):
    unet, sched = cc_model.unet, cc_model.scheduler_config
    alone = sample(unet, sched, [5], steps=4, eta=0.5, class_labels=[2])
    batch = sample(unet, sched, [7, 5, 9], steps=4, eta=0.5, class_labels=[0, 2, 3])
    torch.testing.assert_close(batch[1], alone[0], atol=1e-4, rtol=0)
    # no labels: each image's own is drawn from its seed alone, whatever its neighbours
    drawn = sample(unet, sched, [9, 5], steps=4, eta=0.5)
    own = sample(unet, sched, [5], steps=4, eta=0.5, class_labels=[default_class_label(5, CLASSES)])
    torch.testing.assert_close(drawn[1], own[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(drawn[0], sample(unet, sched, [9], steps=4, eta=0.5)[0], atol=1e-4, rtol=0)
    assert len({default_class_label(s, CLASSES) for s in range(40)}) == CLASSES
    # the label changes the image
    other = sample(unet, sched, [5], steps=4, eta=0.5, class_labels=[1])
    assert (other - alone).abs().mean() > 0.05


def test_bad_class_labels_name_the_argument(cc_model, tiny_model_dir):
    unet, sched = cc_model.unet, cc_model.scheduler_config
    for labels in ([CLASSES], [-1], [0, 1], [True], [1.0]):
        with pytest.raises(ValueError, match="class_labels"):
            sample(unet, sched, [1], steps=1, class_labels=labels)
    plain = load_model(tiny_model_dir)
    with pytest.raises(ValueError, match="class_labels: the model is unconditional"):
        sample(plain.unet, plain.scheduler_config, [1], steps=1, class_labels=[0])


def test_the_engine_validates_and_reports_the_labels_it_ran(cc_dir):
    engine = Engine.load(cc_dir)
    engine.validate("ddim", 2, 0.0, 2, [0, 3])
    with pytest.raises(ValueError, match="class_labels"):
        engine.validate("ddim", 2, 0.0, 1, [CLASSES])
    out = engine.generate([5, 6], steps=2, class_labels=[2, None])  # a None entry is drawn from its seed
    assert out.class_labels == (2, default_class_label(6, CLASSES)) and out.images.shape == (2, 8, 8, 1)
    assert Engine.load(cc_dir).generate([6], steps=2).class_labels == (default_class_label(6, CLASSES),)


def test_passes_carry_each_images_label():
    jobs = [JobRecord(model="m", precision="fp32", sampler="ddim", steps=2, n=2, seed=10, class_labels=[1, 3]),
            JobRecord(model="m", precision="fp32", sampler="ddim", steps=2, n=2, seed=20)]
    (first, second) = pack_passes(jobs, max_images=3)
    assert [(s.seed, s.class_label) for s in first.slots + second.slots] == [(10, 1), (11, 3), (20, None),
                                                                           (21, None)]


def test_calibration_feeds_uniform_labels(cc_model):
    config = CalibrationConfig(method="uniform", n_samples=16, steps=4, batch_size=8, seed=0)
    calib = build_calibration_set(cc_model.unet, cc_model.scheduler_config, config, progress=False)
    assert calib.class_labels is not None and calib.class_labels.shape == (16,)
    assert set(calib.class_labels.tolist()) <= set(range(CLASSES)) and len(set(calib.class_labels.tolist())) > 1
    xs, ts, extra = next(calib.inputs())
    assert torch.equal(extra["class_labels"], calib.class_labels[:8]) and len(xs) == len(ts) == 8
    # each x_t is the trajectory of its own seed *and label*
    k = 5
    seen = {}

    def record(i, total, t, x):  # noqa: ANN001
        if i == int(calib.step_indices[k]):
            seen["x"] = x.clone()

    sample(cc_model.unet, cc_model.scheduler_config, [int(calib.seeds[k])], steps=4, callback=record,
           class_labels=[int(calib.class_labels[k])])
    torch.testing.assert_close(calib.xs[k], seen["x"][0], atol=1e-4, rtol=0)
    # the statistics' cache key tells the model apart through its weights (the class embedding among them)
    plain = UNet2DModel(**{**CC_UNET_CONFIG, "num_class_embeds": None})
    cfg = build_config("w8a8", CALIBRATION)
    unconditional = DiffusionModel(name="plain", unet=plain, scheduler_config=cc_model.scheduler_config)
    assert cache_key(cache_key_parts(cc_model, cfg)) != cache_key(cache_key_parts(unconditional, cfg))


@needs_openvino
@pytest.mark.parametrize("preset", ["ptq4dm", "faithful"])  # one graph; int8 and fp32 graphs per time-step group
def test_w8a8_on_openvino_matches_the_simulation(cc_model, preset, tmp_path):
    q = quantize_model(cc_model, "w8a8", {**CALIBRATION, "preset": preset}, cache_dir=tmp_path, progress=False)
    executor = build_executor(q.unet, "openvino", max_batch=8)
    probe = build_calibration_set(cc_model.unet, cc_model.scheduler_config,
                                  CalibrationConfig(method="uniform", n_samples=8, steps=4, seed=3), progress=False)
    x, t, labels = probe.xs, probe.ts, probe.class_labels
    with torch.no_grad():
        real = torch.cat([executor(x[i:i + 1], t[i], class_labels=labels[i:i + 1]).sample for i in range(len(x))])
        fake = torch.cat([q.unet(x[i:i + 1], t[i], class_labels=labels[i:i + 1]).sample for i in range(len(x))])
        fp = cc_model.unet(x, t, class_labels=labels).sample
        relabelled = executor(x[:1], t[0], class_labels=(labels[:1] + 1) % CLASSES).sample
    assert rel_error(real, fake) < OPENVINO_VS_FAKE_BOUND
    assert rel_error(real, fake) < rel_error(fake, fp) / 2  # the quantized model, not the float one
    assert rel_error(relabelled, real[:1]) > 0.01  # the class input reaches the graph
    with pytest.raises(ValueError, match="class_labels"):
        executor(x[:1], t[0])
    # whole sampling runs on the graph, with drawn labels, image by image as in a batch
    images = sample(executor, q.scheduler_config, [3, 4, 5], steps=3)
    torch.testing.assert_close(images[1:2], sample(executor, q.scheduler_config, [4], steps=3), atol=1e-4, rtol=0)


@pytest.mark.skipif(int8_supported() is not None, reason=str(int8_supported()))
def test_the_int8_x86_graph_takes_the_labels_with_ptq4dms_qparams(cc_model, tmp_path):
    """The exported PT2E graph before inductor (its reference quantize/dequantize form: compiling it takes a minute
    on 2 cores): the class input reaches it, and it computes the simulation."""
    q = quantize_model(cc_model, "w8a8", {**CALIBRATION, "preset": "ptq4dm"}, cache_dir=tmp_path, progress=False)
    graph = lower_int8_x86(float_weights_of(q.unet), q.unet, batch_size=4)
    x, t, labels = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor(500), \
        torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        real, fake = graph(x, t, labels), q.unet(x, t, class_labels=labels).sample
        relabelled = graph(x, t, labels.flip(0))
    assert rel_error(real, fake) < OPENVINO_VS_FAKE_BOUND and rel_error(relabelled, real) > 0.01
    executor = build_executor(q.unet, "int8-x86", max_batch=4)
    with pytest.raises(ValueError, match="class_labels"):
        executor(x, t)  # checked before anything compiles


def test_api_validates_class_labels_against_each_model(cc_dir, tiny_model_dir, serve, tmp_path):
    """API-only (no worker): the kinds come from the models' configs, so bad labels are 422 at submission, and
    GET /v1/models says which model takes them."""
    named = save_class_conditional(tmp_path / "named", class_names=["cat", "dog", "fox", "owl"])
    with serve({"cc": cc_dir, "plain": tiny_model_dir, "named": named}, worker=False) as client:
        described = {m["name"]: m for m in client.get("/v1/models").json()}
        assert {k: (m["kind"], m["num_classes"], m["class_names"], m["default"]) for k, m in described.items()} == {
            "cc": ("class-conditional", CLASSES, None, True), "plain": ("unconditional", None, None, False),
            "named": ("class-conditional", CLASSES, ["cat", "dog", "fox", "owl"], False)}
        assert (described["cc"]["width"], described["plain"]["height"]) == (8, 16)
        bad = [({"model": "cc", "class_labels": CLASSES}, "0..3"),
               ({"model": "cc", "n": 2, "class_labels": [1]}, "one label per image (2)"),
               ({"model": "cc", "class_labels": [-1]}, "greater than or equal to 0"),
               ({"model": "cc", "class_labels": ["1"]}, ""),
               ({"model": "plain", "class_labels": 0}, "unconditional")]
        for body, message in bad:
            r = client.post("/v1/jobs", json=body)
            assert r.status_code == 422, (body, r.text)
            detail = r.json()["detail"]
            assert all("class_labels" in err["loc"] for err in detail), detail
            assert any(message in err["msg"] for err in detail), detail
        ok = client.post("/v1/jobs", json={"model": "cc", "n": 3, "class_labels": 2})
        assert ok.status_code == 202
        assert client.get(ok.headers["location"]).json()["class_labels"] == [2, 2, 2]


@needs_openvino
def test_served_end_to_end_with_a_real_worker(cc_dir, cc_model, serve):
    with serve({"cc": cc_dir}) as client:
        png, image = generate_png(client, {"seed": 6, "class_labels": [3]})
        assert png.headers["x-class-label"] == "3"
        assert image.shape == (8, 8) and image.dtype == np.uint8
        expected = to_uint8(sample(cc_model.unet, cc_model.scheduler_config, [6], steps=3, class_labels=[3]))
        assert np.abs(image.astype(int) - expected[0, ..., 0].astype(int)).max() <= 1
        # no labels: drawn per seed, and the record says which
        drawn = client.post("/v1/generate", json={"seed": 10, "n": 2}).json()
        job = client.get(f"/v1/jobs/{drawn['id']}").json()
        assert job["class_labels"] == [default_class_label(s, CLASSES) for s in (10, 11)]
        # the int8 graphs take the labels too; different labels, different images
        q = [client.post("/v1/generate", json={"seed": 6, "precision": "w8a8", "class_labels": c}).json()
             for c in (1, 2)]
        assert all(r["status"] == "succeeded" for r in q), q
        assert q[0]["images_png_base64"] != q[1]["images_png_base64"]
        assert decode_png(base64.b64decode(q[0]["images_png_base64"][0])).shape == (8, 8)
        out_of_range = client.post("/v1/generate", json={"class_labels": [CLASSES]})
        assert out_of_range.status_code == 422 and out_of_range.json()["detail"][0]["loc"] == ["body", "class_labels"]


def test_cli_generates_a_class(cc_dir, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert ptq4dm(["generate", "--model", str(cc_dir), "--class-label", "3", "--n", "2", "--steps", "2",
                   "--seed", "4", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["class_labels"] == [3, 3] and len(list(out.glob("*.png"))) == 2
    assert ptq4dm(["generate", "--model", str(cc_dir), "--class-label", str(CLASSES), "--n", "1", "--steps", "1",
                   "--out", str(out)]) == 2
    assert "class_labels" in capsys.readouterr().err
    assert ptq4dm(["generate", "--model", str(tiny_model_dir), "--class-label", "0", "--n", "1", "--steps", "1",
                   "--out", str(out)]) == 2
    assert "unconditional" in capsys.readouterr().err
