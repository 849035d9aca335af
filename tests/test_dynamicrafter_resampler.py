"""Resampler parity with the official module (tiny config with stored weights, and the real
config with formula weights)."""
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from kinema.pipelines.dynamicrafter.resampler import Resampler


pytestmark = pytest.mark.usefixtures("one_thread")


def _load(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_resampler_tiny_parity(fixtures_dir):
    t, meta = _load(fixtures_dir / "dynamicrafter" / "resampler.safetensors")
    cfg = json.loads(meta["resampler_config"])
    model = Resampler(**cfg).eval()
    sd = {k[len("state_dict."):]: v for k, v in t.items() if k.startswith("state_dict.")}
    model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        y = model(t["input.x"])
    assert y.shape == t["output.y"].shape
    torch.testing.assert_close(y, t["output.y"], atol=1e-4, rtol=1e-4)


def _splitmix_weights(shapes: dict, salt: int) -> dict:
    out = {}
    with np.errstate(over="ignore"):
        for idx, key in enumerate(sorted(shapes)):
            shape = tuple(shapes[key])
            n = int(np.prod(shape)) if shape else 1
            j = np.arange(n, dtype=np.uint64)
            c = np.uint64((salt << 48) + (idx << 32)) + j
            z = c * np.uint64(0x9E3779B97F4A7C15)
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            z = z ^ (z >> np.uint64(31))
            s = 2.0 * ((z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53) - 1.0
            if len(shape) >= 2:
                v = s / np.sqrt(float(np.prod(shape[1:])))
            elif key.endswith("weight"):
                v = 1.0 + 0.2 * s
            else:
                v = 0.1 * s
            out[key] = torch.from_numpy(v.astype(np.float32).reshape(shape))
    return out


def test_resampler_real_config_parity(fixtures_dir):
    d = fixtures_dir / "dynamicrafter"
    t, meta = _load(d / "resampler_real.safetensors")
    cfg = json.loads(meta["resampler_config"])
    check = json.load(open(d / "resampler_real_weights_check.json"))
    torch.manual_seed(0)
    model = Resampler(**cfg).eval()
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    sd = _splitmix_weights(shapes, int(meta["weight_salt"]))
    torch.testing.assert_close(sd["latents"][0, 0], t["check.latents_first_row"], atol=0, rtol=0)
    torch.testing.assert_close(sd["layers.0.0.to_q.weight"][0], t["check.layers.0.0.to_q.weight_first_row"],
                               atol=0, rtol=0)
    entries = check["sorted_keys_with_checksums"]
    assert sorted(entries) == sorted(sd), "our Resampler's keys differ from the official ones"
    for key, info in entries.items():
        assert list(sd[key].shape) == info["shape"], key
        assert abs(sd[key].double().sum().item() - info["sum"]) < 1e-5 * max(1.0, info["abs_sum"]), key
        torch.testing.assert_close(sd[key].flatten()[:3].double(), torch.tensor(info["first3"], dtype=torch.float64),
                                   atol=1e-7, rtol=0)
    model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        y = model(t["input.x"])
    assert y.shape == (1, 256, 1024)
    torch.testing.assert_close(y, t["output.y"], atol=1e-4, rtol=1e-4)
