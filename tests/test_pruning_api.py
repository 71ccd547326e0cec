"""The shared selection rule, the method registry and the adapter table (no model needed)."""

import math
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from covipal.pruning import Pruner, registry, RandomPruner, available_methods, get_method, n_keep, register, select


@pytest.mark.parametrize("n,ratio,expected", [(576, 0.25, 144), (16, 0.3, 5), (30, 0.1, 3), (10, 0.25, 3),
                                              (7, 0.01, 1), (5, 1.0, 5), (0, 0.5, 0), (1, 0.0625, 1)])
def test_n_keep_is_ceil_at_least_one(n, ratio, expected):
    assert n_keep(n, ratio) == expected


def test_n_keep_matches_ceil_on_a_grid():
    for n in range(1, 80):
        for ratio in (0.0625, 0.125, 0.25, 0.5, 0.75, 1.0):
            assert n_keep(n, ratio) == max(1, math.ceil(ratio * n))  # exact in binary for these ratios


def test_select_keeps_the_top_k_in_original_order():
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(4, 20, generator=gen)
    n_valid = torch.tensor([20, 13, 1, 0])
    kept = select(scores, n_valid, 0.3)
    for row, n, k in zip(scores, n_valid.tolist(), kept):
        assert len(k) == n_keep(n, 0.3)
        assert torch.equal(k, k.sort().values)
        assert set(k.tolist()) == set(row[:n].argsort(descending=True)[:len(k)].tolist())
        assert (k < max(n, 1)).all()  # never a padding slot


def test_registry():
    assert {"random", "covipal"} <= set(available_methods())
    pruner = get_method("random", reserve_ratio=0.5, seed=3)
    assert isinstance(pruner, RandomPruner) and pruner.name == "random" and pruner.seed == 3
    with pytest.raises(ValueError, match=r"unknown pruning method 'fastvv'; known methods: \[.*'random'"):
        get_method("fastvv")
    with pytest.raises(TypeError, match=r"has no parameters \['ratio'\]; its parameters are"):
        get_method("random", ratio=0.5)
    with pytest.raises(ValueError, match="already exists"):
        register("random")(type("Other", (Pruner,), {}))
    with pytest.raises(ValueError, match="lowercase"):
        register("FastV")


def test_register_a_new_method():
    @register("test_first_tokens")
    @dataclass
    class FirstTokens(Pruner):
        def score(self, ctx):
            return -ctx.vision_index.float()

    try:
        assert isinstance(get_method("test_first_tokens", reserve_ratio=0.5), FirstTokens)
    finally:
        registry._METHODS.pop("test_first_tokens")


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5])
def test_reserve_ratio_is_checked(ratio):
    with pytest.raises(ValueError, match="reserve_ratio must be in"):
        RandomPruner(reserve_ratio=ratio)


def test_import_stays_light():
    code = "import sys, covipal.pruning, covipal.ppm; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
