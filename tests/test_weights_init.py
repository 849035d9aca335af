"""New layers get PyTorch's default initialisation from a local generator: the host's global RNG
is neither read nor seeded (pipelines/weights_init.py and its users)."""
import math

import pytest
import torch
import torch.nn as nn

from kinema.pipelines.story_video.predictor import PredictorConfig, new_predictor
from kinema.pipelines.weights_init import default_init


def _net():
    with torch.device("meta"):
        return nn.Sequential(nn.Linear(400, 300), nn.LayerNorm(300), nn.Conv2d(3, 8, 5), nn.Embedding(50, 6))


def test_default_init_draws_pytorchs_distributions_from_the_generator_only():
    state = torch.get_rng_state()
    a = default_init(_net(), torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), state)            # the global RNG was not used
    b = default_init(_net(), torch.Generator().manual_seed(3))
    c = default_init(_net(), torch.Generator().manual_seed(4))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a[0].weight, c[0].weight)
    # nn.Linear / nn.Conv2d's reset_parameters: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias
    for layer, fan_in in ((a[0], 400), (a[2], 3 * 5 * 5)):
        bound = 1 / math.sqrt(fan_in)
        assert layer.bias.abs().max() <= bound
        assert bound >= layer.weight.abs().max() > 0.95 * bound
        assert abs(layer.weight.std().item() - bound / math.sqrt(3)) < 0.03 * bound
    assert torch.equal(a[1].weight, torch.ones(300)) and torch.equal(a[1].bias, torch.zeros(300))
    assert abs(a[3].weight.std().item() - 1.0) < 0.2 and a[3].weight.device.type == "cpu"


def test_parameters_without_a_default_are_refused_unless_left_to_the_caller():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.empty(3))
            self.lin = nn.Linear(2, 2)

    with torch.device("meta"):
        odd = Odd()
    with pytest.raises(TypeError, match=r"\['table'\] of Odd"):
        default_init(odd, torch.Generator())
    with torch.device("meta"):
        odd = Odd()
    default_init(odd, torch.Generator(), leave=("table",))
    assert odd.lin.weight.device.type == "cpu"


def test_a_new_predictor_follows_its_seed_and_leaves_the_global_rng_alone():
    cfg = PredictorConfig(tokens=5, token_width=16, width=32, depth=1, heads=2)
    state = torch.get_rng_state()
    p1, p2, p3 = new_predictor(cfg, 7), new_predictor(cfg, 7), new_predictor(cfg, 8)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(p1.state_dict().values(), p2.state_dict().values()))
    assert not torch.equal(p1.token_pos, p3.token_pos)
    assert abs(p1.token_pos.std().item() - 0.02) < 0.01
    assert not p1.proj_out.weight.any() and not p1.proj_out.bias.any()      # starts as the interpolation
    assert not any(t.is_meta for t in p1.state_dict().values())
