"""Settings under activation recomputation: a region checkpointed inside a `with settings()`
block and backpropagated outside it (on this thread or another one, as autograd's device thread
does on CUDA/NPU) is recomputed under the block's settings, so it gives the numbers of the same
run without checkpointing (issue 21 item 2)."""
from __future__ import annotations

import threading

import pytest
import torch
import torch.utils.checkpoint as torch_checkpoint

import gmm_plugin
from gmm_plugin import settings
from gmm_plugin.ops import gmm

E, K, N, M = 4, 64, 32, 256
COUNTS = [100, 0, 60, 96]


def _inputs():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(E, K, N, generator=g).bfloat16()
    x = torch.randn(M, K, generator=g).bfloat16()
    dy = torch.randn(M, N, generator=g).bfloat16()
    return w, x, dy


def _region(p, counts):
    def f(x):  # a fused GMM, then an op that saves the GMM's output (recomputed under checkpointing)
        y = gmm.npu_gmm_v2(x, p, group_list=counts, gemm_fusion=True, original_weight=p)
        return y * y.float().sigmoid().to(y.dtype)
    return f


def checkpointed(mode, f, x):
    if mode == "plain":
        return f(x)
    return torch_checkpoint.checkpoint(f, x, use_reentrant=mode == "reentrant")


def run(mode, *, block, other_thread=False):
    """(main_grad, x.grad, backends chosen by every call) of one fused bf16 GMM region."""
    w, x0, dy = _inputs()
    p = torch.nn.Parameter(w)
    p.main_grad, p.grad_added_to_main_grad = torch.zeros(E, K, N), False
    x = x0.clone().requires_grad_()
    with gmm_plugin.settings(**block):
        out = checkpointed(mode, _region(p, torch.tensor(COUNTS)), x)
    if other_thread:  # a fresh thread has none of this thread's context variables
        errors = []
        t = threading.Thread(target=lambda: _backward(out, dy, errors))
        t.start()
        t.join(60)
        assert not t.is_alive() and not errors, errors
    else:
        out.backward(dy)
    return p.main_grad, x.grad


def _backward(out, dy, errors):
    try:
        out.backward(dy)
    except BaseException as e:  # reported by the test's thread
        errors.append(e)


@pytest.fixture
def chosen(monkeypatch):
    """The backend name every npu_gmm call chose (recomputations included)."""
    names = []
    real = gmm.select_backend

    def spy(device, name="auto"):
        names.append(name)
        return real(device, name)
    monkeypatch.setattr(gmm, "select_backend", spy)
    return names


@pytest.mark.parametrize("other_thread", [False, True], ids=["same_thread", "other_thread"])
@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_recomputation_uses_the_settings_of_the_forward(mode, other_thread, chosen):
    block = dict(fused_wgrad_dtype="fp32")
    want = run("plain", block=block)
    got = run(mode, block=block, other_thread=other_thread)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    # The test can fail: the other choice of the setting gives another main_grad.
    other = run("plain", block=dict(fused_wgrad_dtype="input"))
    assert not torch.equal(other[0], want[0])
    chosen.clear()
    run(mode, block=dict(backend="reference"), other_thread=other_thread)
    assert chosen == ["reference"] * 2  # the forward and its recomputation


def test_a_block_inside_the_region_still_applies(chosen):
    w, x0, dy = _inputs()
    x = x0.clone().requires_grad_()

    def f(x):
        with gmm_plugin.settings(backend="reference"):
            return gmm.npu_gmm_v2(x, w, group_list=COUNTS)
    with gmm_plugin.settings(backend="torch"):
        y = torch_checkpoint.checkpoint(f, x, use_reentrant=True)
    y.backward(dy)
    assert chosen == ["reference", "reference"]


def test_bound_runs_under_the_settings_it_was_given():
    before = settings.current()
    with gmm_plugin.settings(fused_wgrad_dtype="input"):
        fn = settings.bound(settings.current)
    assert settings.current() == before
    assert fn().fused_wgrad_dtype == "input"
    seen = []
    t = threading.Thread(target=lambda: seen.append(fn()))
    t.start()
    t.join()
    assert seen[0].fused_wgrad_dtype == "input"


# ---- item 4: settings read their own environment variables only -------------------------------

@pytest.fixture
def fresh_settings(monkeypatch):
    before = settings.configure()
    settings.reset()
    yield monkeypatch
    monkeypatch.undo()  # the environment first: configure() reads it for the value it returns
    settings.configure(before)


def test_an_unrelated_bad_variable_does_not_break_the_settings(fresh_settings):
    fresh_settings.setenv("GMM_PLUGIN_CPU_SHIM", "sometimes")  # config's key, not a setting
    fresh_settings.setenv("GMM_PLUGIN_GEMM_FUSION", "maybe")
    previous = settings.configure(gmm_plugin.Settings(backend="torch"))
    assert previous == gmm_plugin.Settings()
    with gmm_plugin.settings(backend="reference") as value:
        assert settings.current() is value and value.backend == "reference"
    settings.reset()
    assert settings.current() == gmm_plugin.Settings()


@pytest.mark.parametrize("var,raw,rule", [
    ("GMM_PLUGIN_BACKEND", "gpu", "key 'backend' must be one of auto, reference, torch, npu, aclnn"),
    ("GMM_PLUGIN_FUSED_WGRAD_DTYPE", "bf16", "key 'fused_wgrad_dtype' must be one of auto, fp32, input"),
    ("GMM_PLUGIN_CHECK_GROUP_LIST", "maybe", "key 'check_group_list' must be a boolean"),
])
def test_a_bad_settings_variable_names_itself(fresh_settings, var, raw, rule):
    fresh_settings.setenv(var, raw)
    with pytest.raises(ValueError, match=f"environment variable {var}: {rule}"):
        settings.current()
    with pytest.raises(ValueError, match=f"environment variable {var}: {rule}"):
        settings.configure(backend="torch")


def test_settings_and_config_parse_the_settings_variables_alike(fresh_settings):
    from gmm_plugin.config import ConfigError, load_config
    env = {"GMM_PLUGIN_BACKEND": " Reference ", "GMM_PLUGIN_CHECK_GROUP_LIST": "off",
           "GMM_PLUGIN_FUSED_WGRAD_DTYPE": "FP32"}
    assert settings.from_environment(env) == load_config(env=env).settings()
    with pytest.raises(ConfigError, match="environment variable GMM_PLUGIN_BACKEND: key 'backend'"):
        load_config(env={"GMM_PLUGIN_BACKEND": "gpu"})


def test_settings_never_imports_the_config_loader():
    import ast
    import inspect
    tree = ast.parse(inspect.getsource(settings))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    assert not any(name and name.endswith("config") for name in imported), imported
