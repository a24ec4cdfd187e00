"""Plans are immutable values, numeric targets map to the closest plan, FLOPs are right, and
one model serves different plans from several threads at once."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch
from conftest import build_vilt, build_vision, pixels, vilt_inputs

from models import NO_REDUCTION, LayerSpec, ReductionPlan, named_plan, plan_for_target, reducible, resolve
from models.levels import candidate_plans
from models.reduction.flops import LayerCost, encoder_flops


def test_plans_are_frozen_and_hashable():
    a = ReductionPlan("tome", (LayerSpec(r=3),) * 4, level="low")
    b = ReductionPlan("tome", (LayerSpec(r=3),) * 4, level="low")
    assert a == b and hash(a) == hash(b) and len({a, b, NO_REDUCTION}) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.method = "evit"
    with pytest.raises(ValueError):
        ReductionPlan("magic")


def test_flops_of_a_small_config_by_hand():
    # D = 64, MLP 128; q,k,v,o weights 4 * 64 * 64 = 16384 MACs/token; MLP 2 * 64 * 128 = 16384.
    rm = reducible(build_vision("vit-cls"))
    assert rm.costs[0] == LayerCost(attn_weights=16384, attn_dim=64, mlp_weights=16384)
    # 65 tokens in, 60 out: 2 * (1_064_960 + 540_800 + 983_040) = 5_177_600
    assert rm.costs[0].flops(65, 60) == 5_177_600
    assert encoder_flops(rm.costs[:2], [65, 60, 60]) == 5_177_600 + 2 * (60 * 16384 * 2 + 2 * 60 * 60 * 64)
    plan = ReductionPlan("tome", (LayerSpec(r=5),) + (LayerSpec(),) * 3)
    out = rm(pixels(1), plan=plan)
    assert out.trace.tokens == (65, 60, 60, 60, 60)
    assert out.trace.flops == 5_177_600 + 3 * 2 * (60 * 16384 * 2 + 2 * 60 * 60 * 64)
    assert out.trace.full_flops == 4 * 2 * (65 * 16384 * 2 + 2 * 65 * 65 * 64)


@pytest.mark.parametrize(
    "builder,methods",
    [
        (lambda: build_vision("vit-cls"), ("tome", "tcvit", "evit")),
        (lambda: build_vilt("vilt-vqa"), ("pumer", "tome", "prune")),
    ],
)
def test_numeric_target_picks_the_plan_with_the_closest_flops(builder, methods):
    rm = reducible(builder())
    full = rm.flops(NO_REDUCTION)
    for method in methods:
        achievable = sorted(1 - rm.flops(p) / full for p in candidate_plans(rm, method))
        for target in (0.1, 0.25, 0.4):
            plan = plan_for_target(rm, target, method)
            saved = 1 - rm.flops(plan) / full
            assert abs(saved - target) == pytest.approx(min(abs(a - target) for a in achievable))
            assert plan.level == f"{target:g}"
        assert plan_for_target(rm, 0.0, method) == NO_REDUCTION
    # stronger targets never save less
    saved = [1 - rm.flops(plan_for_target(rm, t)) / full for t in (0.1, 0.2, 0.3, 0.4)]
    assert saved == sorted(saved)


def test_resolve_accepts_names_and_numbers_and_rejects_the_rest():
    rm = reducible(build_vision("vit-cls"))
    assert resolve(rm, "medium") == named_plan(rm, "medium", "tome")
    assert resolve(rm, "0.3") == resolve(rm, 0.3)
    assert resolve(rm, "none") == NO_REDUCTION
    for bad in ("extreme", 0.95, -0.1):
        with pytest.raises(ValueError):
            resolve(rm, bad)
    with pytest.raises(ValueError):
        resolve(rm, "medium", method="pumer")


def test_levels_get_stronger():
    for rm in (reducible(build_vision("deit-cls")), reducible(build_vilt("vilt-vqa"))):
        for method in rm.methods:
            flops = [rm.flops(named_plan(rm, level, method)) for level in ("none", "low", "medium", "high")]
            assert flops == sorted(flops, reverse=True) and len(set(flops)) == 4, (rm.family, method, flops)


def _run_concurrently(call, plans, iterations=25):
    expected = {plan: call(plan) for plan in plans}
    failures: list[str] = []

    def worker(plan):
        with torch.inference_mode():
            for _ in range(iterations):
                if not torch.equal(call(plan), expected[plan]):
                    failures.append(plan.level)

    threads = [threading.Thread(target=worker, args=(p,)) for p in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


def test_two_threads_one_model_different_plans_match_serial_runs():
    rm = reducible(build_vision("vit-cls"))
    px = pixels(2)
    plans = [named_plan(rm, "high", "tome"), NO_REDUCTION, named_plan(rm, "medium", "evit")]
    _run_concurrently(lambda plan: rm(px, plan=plan).logits, plans)

    vilt = reducible(build_vilt("vilt-vqa"))
    inputs = vilt_inputs()
    _run_concurrently(
        lambda plan: vilt(**inputs, plan=plan).logits,
        [named_plan(vilt, "medium", "pumer"), named_plan(vilt, "high", "tome")],
    )
