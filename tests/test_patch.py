"""gradstats.patch_torch() / unpatch_torch(): torch.nn.utils' clipping functions swapped for
gradstats' and back, globally or in a block, under torch.compile; and clip_grad_norm_'s
return_stats, which the integrations build on."""

from __future__ import annotations

import ast
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.utils.clip_grad as clip_grad_module
from helpers import child_env

import gradstats

# torch's functions under every name patch_torch() replaces: torch.nn.utils exports them, and its
# clip_grad module keeps two of them under private names (which its clip_grad_norm_ calls).
TORCH = {
    (torch.nn.utils, "clip_grad_norm_"): clip_grad_module.clip_grad_norm_,
    (torch.nn.utils, "get_total_norm"): clip_grad_module._get_total_norm,
    (torch.nn.utils, "clip_grads_with_norm_"): clip_grad_module._clip_grads_with_norm_,
    (torch.nn.utils, "clip_grad_value_"): clip_grad_module.clip_grad_value_,
    (clip_grad_module, "clip_grad_norm_"): clip_grad_module.clip_grad_norm_,
    (clip_grad_module, "_get_total_norm"): clip_grad_module._get_total_norm,
    (clip_grad_module, "_clip_grads_with_norm_"): clip_grad_module._clip_grads_with_norm_,
    (clip_grad_module, "clip_grad_value_"): clip_grad_module.clip_grad_value_,
}
OURS = {
    "clip_grad_norm_": gradstats.clip_grad_norm_,
    "get_total_norm": gradstats.get_total_norm,
    "clip_grads_with_norm_": gradstats.clip_grads_with_norm_,
    "clip_grad_value_": gradstats.clip_grad_value_,
}


@pytest.fixture(autouse=True)
def _torch_restored():
    """Every test starts and ends with torch's own functions in place."""
    gradstats.unpatch_torch()
    yield
    gradstats.unpatch_torch()
    assert_torch()


def assert_torch():
    for (module, attr), function in TORCH.items():
        assert getattr(module, attr) is function, f"{module.__name__}.{attr} is not torch's"


def assert_gradstats():
    for (module, attr), _ in TORCH.items():
        assert getattr(module, attr) is OURS[attr.lstrip("_")], f"{module.__name__}.{attr}"


def fp16_param():
    """A float16 gradient whose norm (1.2e5) exceeds float16: torch's norm is Inf (and it zeroes
    the gradient), gradstats' is right and float32, so the two are told apart."""
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    p.grad = torch.full((4,), 6e4, dtype=torch.float16)
    return p


def test_global_patch_and_unpatch():
    gradstats.patch_torch()
    assert_gradstats()
    norm = torch.nn.utils.clip_grad_norm_([fp16_param()], 1.0)
    assert norm.dtype == torch.float32 and norm.item() == pytest.approx(1.2e5)
    gradstats.unpatch_torch()
    assert_torch()
    assert torch.nn.utils.clip_grad_norm_([fp16_param()], 1.0).item() == math.inf


def test_idempotent():
    gradstats.patch_torch()
    gradstats.patch_torch()
    assert_gradstats()
    gradstats.unpatch_torch()
    assert_torch()


def test_context_manager_restores_what_was_there():
    with gradstats.patch_torch() as patch:
        assert patch.active
        assert_gradstats()
    assert not patch.active
    assert_torch()
    gradstats.patch_torch()
    with gradstats.patch_torch():
        pass
    assert_gradstats()  # the enclosing global patch stays


def test_context_manager_restores_on_error():
    with pytest.raises(KeyError), gradstats.patch_torch():
        raise KeyError
    assert_torch()


def test_a_function_replaced_since_is_left_alone():
    patch = gradstats.patch_torch()
    gradstats.unpatch_torch()
    mine = gradstats.patch_torch(clip_grad_norm_=lambda *a, **k: None)
    patch.restore()  # the older patch's functions are no longer in place: nothing to undo
    assert torch.nn.utils.clip_grad_norm_ is not TORCH[(torch.nn.utils, "clip_grad_norm_")]
    mine.restore()
    assert_torch()


def two_libraries():
    """Two patches, each with its own clip_grad_norm_ (two libraries calling patch_torch())."""

    def first(*args, **kwargs):
        return None

    def second(*args, **kwargs):
        return None

    return first, second


def test_restoring_an_earlier_patch_keeps_the_later_one():
    """Non-nested lifetimes: A, then B, then A restored. B's functions stay in place (all of
    them, also those both install) and B is still active; restoring B then gives torch's back."""
    first, second = two_libraries()
    a = gradstats.patch_torch(clip_grad_norm_=first)
    b = gradstats.patch_torch(clip_grad_norm_=second)
    a.restore()
    assert (a.active, b.active) == (False, True)
    assert torch.nn.utils.clip_grad_norm_ is second
    assert torch.nn.utils.get_total_norm is gradstats.get_total_norm
    assert clip_grad_module._get_total_norm is gradstats.get_total_norm
    b.restore()
    assert not b.active
    assert_torch()


def test_restoring_a_middle_patch_removes_only_its_layer():
    first, second = two_libraries()
    a = gradstats.patch_torch(clip_grad_norm_=first)
    b = gradstats.patch_torch()
    c = gradstats.patch_torch(clip_grad_norm_=second)
    b.restore()
    assert torch.nn.utils.clip_grad_norm_ is second
    c.restore()
    assert torch.nn.utils.clip_grad_norm_ is first and a.active
    a.restore()
    assert_torch()


def test_unpatch_torch_ends_every_patch():
    a, b = gradstats.patch_torch(), gradstats.patch_torch()
    gradstats.unpatch_torch()
    assert (a.active, b.active) == (False, False)
    assert "restored" in repr(a)
    a.restore()  # nothing left to undo
    assert_torch()


def test_a_function_set_by_someone_else_under_a_later_patch_is_kept():
    """A function installed by hand while a patch was active is what the later patch replaced:
    it comes back when both patches are gone, in whatever order they go."""
    first, foreign = two_libraries()
    a = gradstats.patch_torch(clip_grad_norm_=first)
    torch.nn.utils.clip_grad_norm_ = foreign
    b = gradstats.patch_torch()
    a.restore()
    assert torch.nn.utils.clip_grad_norm_ is gradstats.clip_grad_norm_
    b.restore()
    assert torch.nn.utils.clip_grad_norm_ is foreign
    torch.nn.utils.clip_grad_norm_ = TORCH[(torch.nn.utils, "clip_grad_norm_")]


def test_a_replacement_function():
    calls = []

    def recording(parameters, max_norm, *args, **kwargs):
        calls.append(max_norm)
        return gradstats.clip_grad_norm_(parameters, max_norm, *args, **kwargs)

    with gradstats.patch_torch(clip_grad_norm_=recording):
        torch.nn.utils.clip_grad_norm_([fp16_param()], 2.0)
        with pytest.warns(FutureWarning):  # torch's deprecated alias calls clip_grad_norm_
            torch.nn.utils.clip_grad.clip_grad_norm([fp16_param()], 3.0)
        assert torch.nn.utils.get_total_norm is gradstats.get_total_norm
    assert calls == [2.0, 3.0]
    with pytest.raises(TypeError, match="clip_grad_value_ must be a function"):
        gradstats.patch_torch(clip_grad_value_=1.0)
    assert_torch()


@pytest.mark.parametrize("name", sorted(OURS))
def test_each_function_matches_torch(name):
    """Each patched function gives torch's result on ordinary gradients."""
    torch.manual_seed(0)
    grads = [torch.randn(5, 3), torch.randn(7)]

    def run():
        params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        fn = getattr(torch.nn.utils, name)
        if name == "get_total_norm":
            out = fn([p.grad for p in params])
        elif name == "clip_grads_with_norm_":
            out = fn(params, 1.0, torch.tensor(4.0))
        elif name == "clip_grad_value_":
            out = fn(params, 0.5)
        else:
            out = fn(params, 1.0)
        return out, [p.grad for p in params]

    expected, expected_grads = run()
    with gradstats.patch_torch():
        assert getattr(torch.nn.utils, name) is OURS[name]
        got, got_grads = run()
    if expected is not None:
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    for a, b in zip(got_grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_under_torch_compile():
    """A compiled function that calls torch.nn.utils.clip_grad_norm_ traces gradstats' op while
    patched, torch's otherwise (dynamo guards on the function, so each state gets its graph)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(any("gradstats" in str(node.target) for node in gm.graph.nodes))
        return gm.forward

    p = fp16_param()

    def clip():
        p.grad = torch.full((4,), 6e4, dtype=torch.float16)
        return torch.nn.utils.clip_grad_norm_([p], 1.0)

    compiled = torch.compile(clip, backend=backend)
    assert compiled().item() == math.inf
    with gradstats.patch_torch():
        norm = compiled()
    assert norm.dtype == torch.float32 and norm.item() == pytest.approx(1.2e5)
    assert compiled().item() == math.inf
    assert graphs == [False, True]


# --------------------------------------------------------------------------- return_stats


def test_return_stats_is_the_same_pass():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(5))]
    params.append(torch.nn.Parameter(torch.zeros(2)))  # no gradient: left out, as torch does
    grads = [torch.randn(3, 4) * 3, torch.randn(5)]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    stats = gradstats.clip_grad_norm_(params, 1.0, return_stats=True)
    total = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
    torch.testing.assert_close(stats.total_norm, total, rtol=1e-6, atol=0)
    torch.testing.assert_close(
        stats.norms, torch.stack([g.norm() for g in grads]), rtol=1e-6, atol=0
    )
    torch.testing.assert_close(stats.clip_coef, 1.0 / (total + 1e-6), rtol=1e-6, atol=0)
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad, g * stats.clip_coef, rtol=1e-6, atol=0)
    assert stats.num_tensors == 2 and int(stats.nan_count) == 0


def test_return_stats_counts_and_skip():
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([1.0, math.nan, math.inf, math.nan])
    stats = gradstats.clip_grad_norm_([p], 1.0, on_nonfinite="skip", return_stats=True)
    assert (int(stats.nan_count), int(stats.inf_count), bool(stats.any_nonfinite)) == (2, 1, True)
    assert stats.clip_coef.item() == 1.0  # skipped: nothing scaled
    assert p.grad[0].item() == 1.0


def test_return_stats_of_nothing():
    stats = gradstats.clip_grad_norm_([], 1.0, return_stats=True)
    assert stats.total_norm.item() == 0.0 and stats.num_tensors == 0
    assert not bool(stats.any_nonfinite)


# ------------------------------------------------------------------------------------ imports


FRAMEWORKS = ("transformers", "accelerate", "lightning", "pytorch_lightning")


def frameworks_loaded(module: str) -> list[str]:
    """The frameworks in sys.modules after importing `module` in a fresh process."""
    code = f"import sys, {module}; print(sorted(set(sys.modules) & set({FRAMEWORKS!r})))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=child_env()
    )
    assert result.returncode == 0, result.stderr
    return ast.literal_eval(result.stdout.strip())


@pytest.mark.parametrize("module", ["gradstats", "gradstats.integrations"])
def test_import_gradstats_imports_no_framework(module):
    assert frameworks_loaded(module) == []


def test_the_import_check_sees_a_framework():
    """Negative control: importing the Hugging Face integration does load transformers."""
    pytest.importorskip("transformers", reason="needs transformers")
    assert "transformers" in frameworks_loaded("gradstats.integrations.transformers")
