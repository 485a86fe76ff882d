from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch

from quantizer.diffusion.models import DiffusionModel
from quantizer.ptq import pipeline as ptq
from quantizer.ptq.cache import CacheCorruptionWarning, CalibrationCache, cache_key, hash_state_dict
from quantizer.ptq.config import CalibrationConfig, PTQ4DMConfig, QuantConfig
from quantizer.ptq.pipeline import cache_key_parts, quantize_model
from quantizer.ptq.quant_modules import QuantLayer

REPO = Path(__file__).resolve().parents[1]
CALIB = CalibrationConfig(method="ndtc", n_samples=8, steps=8, batch_size=4)
QUANT = QuantConfig(weight_bits=8, act_bits=8, n_candidates=10, act_samples=2048)


def sample_stats(value: float = 1.0) -> dict[str, torch.Tensor]:
    return {"a.scale": torch.full((4, 1, 1, 1), value), "a.bits": torch.tensor(8, dtype=torch.int32),
            "b.zero_point": torch.tensor(3, dtype=torch.int32)}


class Counter:
    """A real compute function that counts its own calls."""

    def __init__(self, value: float = 1.0) -> None:
        self.calls = 0
        self.value = value

    def __call__(self) -> dict[str, torch.Tensor]:
        self.calls += 1
        return sample_stats(self.value)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture()
def model(tiny_unet, scheduler_config):
    """A DiffusionModel around a private copy of the tiny UNet, with a count of every UNet forward.

    The pre-hook travels with deep copies, so forwards of quantized copies are counted too.
    """
    unet = copy.deepcopy(tiny_unet)
    calls = {"n": 0}
    unet.register_forward_pre_hook(lambda _m, _a: calls.__setitem__("n", calls["n"] + 1))
    return DiffusionModel(name="tiny", unet=unet, scheduler_config=dict(scheduler_config)), calls


def probe_output(model: DiffusionModel) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, *model.sample_shape, generator=gen)
    with torch.no_grad():
        return model.unet(x, torch.tensor([10, 700])).sample


def test_store_then_load_round_trips_with_a_complete_manifest(tmp_path):
    cache = CalibrationCache(tmp_path)
    parts = {"model": "abc", "config": {"w": 8, "skip": ("x",)}}
    manifest_path = cache.store(parts, sample_stats(), extra={"note": "t"})
    loaded = cache.load(parts)
    assert loaded is not None and same(loaded, sample_stats())
    manifest = json.loads(manifest_path.read_text())
    data_file = tmp_path / manifest["file"]
    assert manifest["sha256"] == hashlib.sha256(data_file.read_bytes()).hexdigest()
    assert manifest["key"] == cache_key(parts) and manifest["key_parts"]["config"]["skip"] == ["x"]
    assert set(manifest["versions"]) == {"ptq4dm", "torch", "diffusers"}
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["created"] and manifest["tensors"] == sorted(sample_stats())
    assert cache.load({"model": "other", "config": {"w": 8, "skip": ["x"]}}) is None
    assert not list(tmp_path.glob("*.tmp"))


def test_get_or_compute_computes_once(tmp_path):
    cache, compute = CalibrationCache(tmp_path), Counter()
    first = cache.get_or_compute({"k": 1}, compute)
    second = CalibrationCache(tmp_path).get_or_compute({"k": 1}, compute)
    assert compute.calls == 1 and same(first, second)
    CalibrationCache(tmp_path).get_or_compute({"k": 2}, compute)
    assert compute.calls == 2


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _data_file(tmp_path: Path, parts: dict) -> Path:
    manifest = json.loads((tmp_path / f"{cache_key(parts)}.json").read_text())
    return tmp_path / manifest["file"]


def _garbage_with_matching_checksum(tmp_path: Path, parts: dict) -> None:
    data_file = _data_file(tmp_path, parts)
    data_file.write_bytes(b"not a safetensors file")
    manifest_path = tmp_path / f"{cache_key(parts)}.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["sha256"] = hashlib.sha256(b"not a safetensors file").hexdigest()
    manifest_path.write_text(json.dumps(manifest))


def _edit_manifest(tmp_path: Path, parts: dict, **changes) -> None:
    manifest_path = tmp_path / f"{cache_key(parts)}.json"
    manifest = json.loads(manifest_path.read_text())
    manifest.update(changes)
    manifest_path.write_text(json.dumps(manifest))


CORRUPTIONS = {
    "bad checksum": lambda tmp, parts: _flip_byte(_data_file(tmp, parts)),
    "truncated file": lambda tmp, parts: _data_file(tmp, parts).write_bytes(_data_file(tmp, parts).read_bytes()[:40]),
    "unreadable safetensors": _garbage_with_matching_checksum,
    "manifest not json": lambda tmp, parts: (tmp / f"{cache_key(parts)}.json").write_text("{not json"),
    "manifest key parts": lambda tmp, parts: _edit_manifest(tmp, parts, key_parts={"k": "other"}),
    "manifest tensor names": lambda tmp, parts: _edit_manifest(tmp, parts, tensors=["a.scale"]),
    "missing tensor file": lambda tmp, parts: _data_file(tmp, parts).unlink(),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupted_entry_warns_and_is_recomputed(tmp_path, corruption):
    parts = {"k": "v"}
    cache, compute = CalibrationCache(tmp_path), Counter()
    cache.get_or_compute(parts, compute)
    CORRUPTIONS[corruption](tmp_path, parts)
    with pytest.warns(CacheCorruptionWarning, match="corrupted"):
        stats = cache.get_or_compute(parts, compute)
    assert compute.calls == 2 and same(stats, sample_stats())
    # The recomputed entry is stored again and now verifies.
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheCorruptionWarning)
        again = cache.get_or_compute(parts, compute)
    assert compute.calls == 2 and same(again, sample_stats())


def test_cache_hit_runs_no_calibration(tmp_path, model):
    fp_model, calls = model
    first = quantize_model(fp_model, QUANT, CALIB, cache_dir=tmp_path, progress=False)
    assert calls["n"] > 0  # a miss samples trajectories and runs the calibration forward
    assert len(list(tmp_path.glob("*.json"))) == 1
    calls["n"] = 0
    second = quantize_model(fp_model, QUANT, CALIB, cache_dir=tmp_path, progress=False)
    assert calls["n"] == 0
    assert any(isinstance(m, QuantLayer) for m in second.unet.modules())
    assert not any(isinstance(m, QuantLayer) for m in fp_model.unet.modules())  # the input model is untouched
    assert torch.equal(probe_output(first), probe_output(second))
    assert (first.cache_hit, second.cache_hit) == (False, True)
    assert first.calibration_hash == second.calibration_hash and first.cache_key == second.cache_key
    assert second.precision == "w8a8" and second.config.calibration == CALIB
    # Anything in the key changing is a miss.
    calls["n"] = 0
    quantize_model(fp_model, QuantConfig(weight_bits=4, n_candidates=10, act_samples=2048), CALIB,
                   cache_dir=tmp_path, progress=False)
    assert calls["n"] > 0


def test_corrupted_stats_file_is_recalibrated_end_to_end(tmp_path, model):
    fp_model, calls = model
    reference = probe_output(quantize_model(fp_model, QUANT, CALIB, cache_dir=tmp_path, progress=False))
    parts = cache_key_parts(fp_model, PTQ4DMConfig(QUANT, CALIB))
    _flip_byte(_data_file(tmp_path, parts))
    calls["n"] = 0
    with pytest.warns(CacheCorruptionWarning):
        recalibrated = quantize_model(fp_model, QUANT, CALIB, cache_dir=tmp_path, progress=False)
    assert calls["n"] > 0
    assert torch.equal(probe_output(recalibrated), reference)


def test_calibration_set_is_shared_across_precisions(tmp_path, model):
    fp_model, calls = model
    ptq._CALIBRATION_SETS.clear()
    quantize_model(fp_model, "w8a8", CALIB, cache_dir=tmp_path, progress=False)
    first = calls["n"]
    calls["n"] = 0
    quantize_model(fp_model, "w8a16", CALIB, cache_dir=tmp_path, progress=False)
    # Only the calibration forward runs again (one UNet call per batch); no trajectories are sampled.
    assert calls["n"] == -(-CALIB.n_samples // CALIB.batch_size) < first


def test_service_style_overrides_mapping(tmp_path, model):
    """The service passes calibration overrides as a plain dict (flat field names)."""
    fp_model, _ = model
    overrides = {"n_samples": 8, "steps": 8, "batch_size": 4, "n_candidates": 10, "act_samples": 2048}
    result = quantize_model(fp_model, "w8a8", overrides, str(tmp_path), progress=False)
    assert result.config.calibration.n_samples == 8 and result.config.quant.n_candidates == 10
    assert result.calibration_hash and not result.cache_hit
    with pytest.raises(ValueError, match="unknown override"):
        quantize_model(fp_model, "w8a8", {"n_sample": 8}, str(tmp_path), progress=False)


def test_fp32_and_uncached_paths(model):
    fp_model, calls = model
    assert quantize_model(fp_model, "fp32") is fp_model
    quantized = quantize_model(fp_model, QUANT, CALIB, cache_dir=None, progress=False)
    assert calls["n"] > 0 and any(isinstance(m, QuantLayer) for m in quantized.unet.modules())
    with pytest.raises(ValueError, match="weight_bits"):
        quantize_model(fp_model, "w3a8")


def test_model_hash_is_deterministic_and_weight_sensitive(tiny_unet):
    copy_a, copy_b = copy.deepcopy(tiny_unet), copy.deepcopy(tiny_unet)
    assert hash_state_dict(copy_a) == hash_state_dict(copy_b) == hash_state_dict(tiny_unet.state_dict())
    reordered = dict(reversed(list(copy_a.state_dict().items())))
    assert hash_state_dict(reordered) == hash_state_dict(copy_a)
    with torch.no_grad():
        copy_b.conv_in.weight[0, 0, 0, 0] += 1e-6
    assert hash_state_dict(copy_b) != hash_state_dict(copy_a)
    assert hash_state_dict({"w": torch.zeros(2)}) != hash_state_dict({"w": torch.zeros(2, dtype=torch.float64)})


WRITER = textwrap.dedent("""
    import pathlib, sys, time, torch
    from quantizer.ptq.cache import CalibrationCache, _versions
    directory, value, rounds, barrier = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    stats = {f"t{i}": torch.full((20000,), value) for i in range(8)}
    stats["bits"] = torch.tensor(int(value))
    _versions()  # warm the lazy import so the stores themselves overlap
    pathlib.Path(barrier, f"ready{value}").touch()
    deadline = time.time() + 60
    while len(list(pathlib.Path(barrier).glob("ready*"))) < 3 and time.time() < deadline:  # start together
        time.sleep(0.002)
    for _ in range(rounds):
        CalibrationCache(directory).store({"k": "shared"}, stats)
""")


def test_concurrent_stores_are_safe(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    cache_dir = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    writers = [subprocess.Popen([sys.executable, str(script), str(cache_dir), str(v), "15", str(barrier)], env=env)
               for v in (1.0, 2.0, 3.0)]
    cache = CalibrationCache(cache_dir)
    seen_values, loads = set(), 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheCorruptionWarning)  # a reader must never see a broken entry
        while any(w.poll() is None for w in writers):
            stats = cache.load({"k": "shared"})
            if stats is not None:
                loads += 1
                value = stats["bits"].item()
                assert sorted(stats) == sorted([f"t{i}" for i in range(8)] + ["bits"])
                assert all(torch.equal(stats[f"t{i}"], torch.full((20000,), float(value))) for i in range(8))
                seen_values.add(value)
            time.sleep(0.001)
    assert [w.returncode for w in writers] == [0, 0, 0]
    final = cache.load({"k": "shared"})
    assert final is not None and final["bits"].item() in (1, 2, 3)
    assert not list(cache_dir.glob("*.tmp")) and not list(cache_dir.glob(".*.tmp"))
    assert loads > 0 and seen_values <= {1, 2, 3}
    # Every tensor file left behind is complete and verifies against its content-addressed name.
    for data_file in cache_dir.glob("*.safetensors"):
        content = data_file.read_bytes()
        assert data_file.name.split(".")[1] == hashlib.sha256(content).hexdigest()[:16]
        assert len(safetensors.torch.load(content)) == 9
