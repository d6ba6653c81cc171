"""Fast tests of the example's parts: presets and flags, the data pipeline, the checkpoint files,
the routing record."""
from __future__ import annotations

import json
import os
import sys
import types

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import moe_checkpoint  # noqa: E402

CI_PRESET = os.path.join(ROOT, "configs", "pretrain_ci_tiny.yaml")
MAIN_PRESET = os.path.join(ROOT, "configs", "pretrain_tiny_cpu.yaml")


# ---------------------------------------------------------------- presets and flags

@pytest.fixture
def pretrain():
    pytest.importorskip("yaml")
    import pretrain_moe
    return pretrain_moe


@pytest.fixture
def config():
    pytest.importorskip("yaml")
    import moe_config
    return moe_config


def _error(pretrain, capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        pretrain.main(list(argv))
    assert e.value.code == 2
    return capsys.readouterr().err


def _resolve(config, *argv, world_size=1):
    return config.resolve_config(config.build_parser().parse_args(list(argv)), world_size=world_size)


@pytest.mark.parametrize("preset", [CI_PRESET, MAIN_PRESET])
def test_presets_resolve(config, preset):
    cfg, raw = _resolve(config, "--config", preset)
    m = cfg["model"]
    assert (m["num_experts"], m["moe_router_topk"], m["moe_grouped_gemm"], m["dtype"]) == (8, 2, True, "fp32")
    assert "gmm_plugin" in raw  # the plugin's settings for --use-gmm-plugin
    import gmm_plugin
    gmm_plugin.load_config(preset, env={})  # and they are valid for the plugin


def test_flags_override_preset(config):
    cfg, _ = _resolve(config, "--config", CI_PRESET, "--steps", "7", "--set", "train.lr=0.001",
                      "--set", "model.swiglu=false", "--expert-parallel-size", "2", world_size=2)
    assert cfg["train"]["steps"] == 7 and cfg["train"]["lr"] == 0.001 and cfg["model"]["swiglu"] is False
    assert cfg["train"]["expert_parallel_size"] == 2


def _preset(tmp_path, text: str) -> str:
    path = tmp_path / "preset.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text, expected", [
    ("model:\n  hiden_size: 64\n", "unknown key 'model.hiden_size' (did you mean 'model.hidden_size'?)"),
    ("modle:\n  hidden_size: 64\n", "unknown key 'modle' (did you mean 'model'?)"),
    ("model:\n  hidden_size: big\n", "'model.hidden_size' must be int, got 'big'"),
    ("model:\n  dtype: fp8\n", "'model.dtype' must be one of fp32, bf16, fp16, got 'fp8'"),
    ("train:\n  steps: 0\n", "'train.steps' must be positive"),
    ("model:\n  hidden_size: [1\n", "malformed YAML (line"),
    ("model:\n  hidden_size: 64\n  hidden_size: 32\n", "duplicate key 'hidden_size'"),
    ("- 1\n- 2\n", "expected a mapping of sections"),
    ("model:\n  hidden_size: 30\n  num_attention_heads: 4\n", "'model.hidden_size' (30) must be divisible"),
    ("train:\n  global_batch_size: 6\n  micro_batch_size: 4\n", "'train.global_batch_size' (6) must be a multiple"),
])
def test_bad_preset_is_a_clear_error_naming_file_and_key(pretrain, capsys, tmp_path, text, expected):
    path = _preset(tmp_path, text)
    err = _error(pretrain, capsys, "--config", path)
    assert path in err and expected in err, err


def test_missing_preset_and_bad_flags(pretrain, capsys, tmp_path):
    missing = str(tmp_path / "nope.yaml")
    assert f"{missing}: config file not found" in _error(pretrain, capsys, "--config", missing)
    err = _error(pretrain, capsys, "--config", CI_PRESET, "--set", "train.stepz=3")
    assert "--set train.stepz=3: unknown key 'train.stepz' (did you mean 'train.steps'?)" in err
    assert "expected SECTION.KEY=VALUE" in _error(pretrain, capsys, "--config", CI_PRESET, "--set", "train.steps")
    err = _error(pretrain, capsys, "--config", CI_PRESET, "--expert-parallel-size", "3")
    assert "'model.num_experts' (8) must be divisible by 'train.expert_parallel_size' (3)" in err


def test_bad_data_path_is_a_clear_error(pretrain, capsys, tmp_path):
    err = _error(pretrain, capsys, "--config", CI_PRESET, "--data-path", str(tmp_path / "missing.txt"))
    assert "missing.txt" in err and "does not exist" in err
    err = _error(pretrain, capsys, "--config", CI_PRESET, "--data-path", str(tmp_path))
    assert "is a directory" in err


def test_resume_refuses_a_different_run_before_starting(pretrain, config, capsys, tmp_path):
    cfg, _ = _resolve(config, "--config", CI_PRESET, "--out-dir", str(tmp_path))
    ckpt = tmp_path / "checkpoints"
    (ckpt / "step_000010").mkdir(parents=True)
    (ckpt / "step_000010" / "meta.json").write_text(json.dumps({"step": 10, "config": cfg, "world_size": 1}))
    (ckpt / "latest").write_text("step_000010\n")
    assert config.check_resume(cfg, str(ckpt), 1) == 10
    err = _error(pretrain, capsys, "--config", CI_PRESET, "--out-dir", str(tmp_path), "--resume", "--seed", "7",
                 "--set", "model.hidden_size=64")
    assert "belongs to a different run" in err
    assert "train.seed: checkpoint 1234, now 7" in err and "model.hidden_size: checkpoint 32, now 64" in err
    with pytest.raises(config.ConfigError, match="processes: checkpoint 1, now 2"):
        config.check_resume(cfg, str(ckpt), 2)


# ---------------------------------------------------------------- data

@pytest.fixture
def moe_data():
    pytest.importorskip("megatron.core")
    import moe_data
    return moe_data


def test_jsonl_and_text_become_megatron_gpt_samples(moe_data, tmp_path):
    docs = ["def f(x):\n    return x + 1\n" * 20, "Grüße, naïve café — 日本語 text. " * 30]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    txt = tmp_path / "docs.txt"
    txt.write_text("\n\n".join(docs), encoding="utf-8")
    tok = moe_data.ByteTokenizer()
    built = {}
    for src in (jsonl, txt):
        prefix = built[src] = moe_data.build_indexed_dataset(str(src), str(tmp_path / "cache"), max_bytes=10**6)
        from megatron.core.datasets.indexed_dataset import IndexedDataset
        ds = IndexedDataset(prefix)
        assert len(ds) == 2
        for i, doc in enumerate(docs):  # byte tokens + end-of-document, exactly
            if src is txt:  # the blank-line separator takes the paragraph's own final newline
                doc = doc.rstrip("\n")
            assert list(ds[i]) == list(doc.encode("utf-8")) + [moe_data.EOD]
            assert tok.detokenize(ds[i]) == doc
        gpt = moe_data.build_gpt_dataset(prefix, seq_length=16, num_samples=40, seed=3)
        sample = gpt[5]
        assert sample["tokens"].shape == (16,) and int(sample["tokens"].max()) < moe_data.VOCAB_SIZE
        assert (sample["tokens"][1:] == sample["labels"][:-1]).all()  # next-token labels
    # A finished build is reused, not rewritten.
    stamp = os.stat(built[jsonl] + ".idx").st_mtime_ns
    again = moe_data.build_indexed_dataset(str(jsonl), str(tmp_path / "cache"), max_bytes=10**6)
    assert again == built[jsonl] and os.stat(again + ".idx").st_mtime_ns == stamp
    # An existing indexed-dataset prefix is used as it is.
    assert moe_data.build_indexed_dataset(again, str(tmp_path / "other"), max_bytes=1) == again


def test_stdlib_corpus_is_capped_and_stable(moe_data, tmp_path):
    a = moe_data.build_indexed_dataset("stdlib", str(tmp_path), max_bytes=50_000)
    b = moe_data.build_indexed_dataset("stdlib", str(tmp_path), max_bytes=50_000)
    assert a == b
    size = os.path.getsize(a + ".bin") // 2  # uint16 tokens
    assert 50_000 <= size < 50_000 + max(os.path.getsize(f) for f in moe_data.stdlib_files()) * 4 + 100


@pytest.mark.parametrize("content, expected", [
    ('{"text": "ok"}\nnot json\n', "line 2: not valid JSON"),
    ('{"body": "x"}\n', "line 1: expected a JSON object with a 'text' key"),
    ('{"text": 5}\n', "line 1: 'text' is int, expected a string"),
    ("", "no text found"),
])
def test_bad_jsonl_is_a_clear_error(moe_data, tmp_path, content, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(moe_data.DataError, match="bad.jsonl") as e:
        moe_data.build_indexed_dataset(str(path), str(tmp_path / "c"), max_bytes=1000)
    assert expected in str(e.value)
    assert not [n for n in os.listdir(tmp_path / "c") if n.endswith(".idx") and ".tmp" not in n]


def test_indexed_prefix_with_foreign_token_ids_is_refused(moe_data, tmp_path):
    import numpy
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    prefix = str(tmp_path / "gpt2")
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.int32)
    b.add_document(numpy.array([50256, 11, 12], dtype=numpy.int32), [3])
    b.finalize(prefix + ".idx")
    with pytest.raises(moe_data.DataError, match="token id 50256 does not fit the byte tokenizer"):
        moe_data.build_indexed_dataset(prefix, str(tmp_path), max_bytes=10)


# ---------------------------------------------------------------- checkpoints

def _save(ckpt, step, **kw):
    moe_checkpoint.save(str(ckpt), step, 0, {"step": step}, barrier=lambda: None, **kw)


def test_checkpoints_latest_and_pruning(tmp_path):
    assert moe_checkpoint.latest_step(str(tmp_path)) is None
    for step in (10, 20, 30):
        _save(tmp_path, step, keep=2)
    assert moe_checkpoint.latest_step(str(tmp_path)) == 30
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_000020", "step_000030"]
    assert moe_checkpoint.load(str(tmp_path), 30, 0) == {"step": 30}


def test_a_write_killed_before_its_rename_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path, 10)

    class Killed(Exception):
        pass

    def die(tmp, path):  # where pretrain_faults.py's in-save SIGKILL lands
        assert os.path.isfile(tmp) and not os.path.exists(path)
        raise Killed

    monkeypatch.setattr(moe_checkpoint, "rename_into_place", die)
    with pytest.raises(Killed):
        _save(tmp_path, 20)
    monkeypatch.undo()
    assert moe_checkpoint.latest_step(str(tmp_path)) == 10
    leftovers = os.listdir(tmp_path / "step_000020")
    assert leftovers and all(".tmp" in n for n in leftovers)  # written, never renamed
    moe_checkpoint.clean_partial(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_000010"]
    assert moe_checkpoint.load(str(tmp_path), 10, 0) == {"step": 10}


def test_clean_partial_without_latest_drops_everything(tmp_path):
    (tmp_path / "step_000010").mkdir()
    (tmp_path / "step_000010" / "rank_00000.pt").write_bytes(b"half")
    moe_checkpoint.clean_partial(str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_latest_naming_garbage_is_an_error(tmp_path):
    (tmp_path / "latest").write_text("step_000099\n")
    with pytest.raises(RuntimeError, match="not a checkpoint"):
        moe_checkpoint.latest_step(str(tmp_path))


# ---------------------------------------------------------------- routing record

class _Router(torch.nn.Module):
    """Stands in for Megatron's TopKRouter: gating(x) -> logits, forward -> (probs, routing_map)."""

    def __init__(self, k: int):
        super().__init__()
        self.config = types.SimpleNamespace(moe_router_topk=k)

    def gating(self, x):
        return x * 1.0  # the tokens' "hidden states" are their logits

    def forward(self, x):
        logits = self.gating(x)
        top = logits.topk(self.config.moe_router_topk, dim=1)
        routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, top.indices, True)
        return torch.zeros_like(logits).scatter(1, top.indices, top.values.softmax(-1)), routing_map


def test_routing_record_digest_and_closest_call():
    import moe_metrics
    layers = [_Router(k=2), _Router(k=2)]
    record = moe_metrics.RoutingRecord(layers)
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [1.0, 0.5, 0.49, 0.0], [0.0, 1.0, 2.0, 4.0]])

    def step(*micro_batches):
        for x in micro_batches:
            h = x
            for router in layers:
                router(h)
                h = h.flip(1)  # the next layer sees other logits
        return record.step()

    other = logits.roll(1, dims=1)  # a second micro-batch with other choices
    digest, margin = step(logits, other)
    assert margin == pytest.approx(0.01, abs=1e-6)  # token 1: 0.5 against 0.49
    assert step(logits, other) == (digest, margin)  # the same decisions: the same record
    assert step(logits + 1, other)[0] == digest  # other logits, the same decisions
    flipped = logits.clone()
    flipped[1, 2] = 0.51  # token 1 now picks expert 2 over expert 1
    changed, closest = step(flipped, other)
    assert changed != digest and closest == pytest.approx(0.01, abs=1e-6)
    assert step(other, logits)[0] != digest  # micro-batch order matters (sample order)
    assert step(logits)[0] != digest
    every_expert = _Router(k=4)  # top-k = all experts: no decision, no closest call
    record = moe_metrics.RoutingRecord([every_expert])
    every_expert(logits)
    assert record.step()[1] is None


# ---------------------------------------------------------------- Megatron-LM launcher

LAUNCHER = os.path.join(ROOT, "examples", "megatron_lm_launch.py")
CPU_ADDED = ["--distributed-backend", "gloo", "--transformer-impl", "local", "--no-persist-layer-norm",
             "--no-gradient-accumulation-fusion", "--no-rope-fusion", "--no-masked-softmax-fusion"]


def _on_cpu():
    from patches import cpu_platform
    return not cpu_platform.accelerator_present()


def _launch(tmp_path, script, *argv, timeout=300):
    import subprocess
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("RANK", None)
    return subprocess.run([sys.executable, LAUNCHER, str(script), *argv], cwd=tmp_path, capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_megatron_lm_launcher_applies_the_plugin_and_hands_over_clean_argv(tmp_path):
    pytest.importorskip("megatron.core")
    script = tmp_path / "pretrain_gpt.py"  # a stand-in for Megatron-LM's script
    script.write_text("import json, sys, patches\n"
                      "print(json.dumps({'argv': sys.argv, 'applied': patches.is_applied(), 'name': __name__,\n"
                      "                  'file': __file__}))\n")
    proc = _launch(tmp_path, script, "--num-experts", "8", "--use-gmm-plugin", "--gmm-plugin-config",
                   os.path.join(ROOT, "configs", "gmm_cpu.yaml"), "--moe-grouped-gemm")
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    argv = [str(script), "--num-experts", "8", "--moe-grouped-gemm"] + (CPU_ADDED if _on_cpu() else [])
    assert seen == {"argv": argv, "applied": True, "name": "__main__", "file": str(script)}
    assert "experts: legacy GroupedMLP" in proc.stdout or "experts: GmmGroupedMLP" in proc.stdout
    if _on_cpu():  # one line says what was added
        said = [line for line in proc.stdout.splitlines() if "added --distributed-backend" in line]
        assert len(said) == 1 and said[0].endswith(" ".join(CPU_ADDED)), proc.stdout


def test_megatron_lm_launcher_without_the_plugin_keeps_megatrons_experts(tmp_path):
    script = tmp_path / "pretrain_gpt.py"
    script.write_text("import json, sys, patches\nprint(json.dumps({'argv': sys.argv[1:], 'applied': patches.is_applied()}))\n")
    proc = _launch(tmp_path, script, "--num-experts", "4", "--transformer-impl=local")
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    added = [a for a in CPU_ADDED if a not in ("--transformer-impl", "local")] if _on_cpu() else []
    assert seen == {"argv": ["--num-experts", "4", "--transformer-impl=local"] + added, "applied": False}


@pytest.mark.parametrize("flag, value", [("--distributed-backend", "nccl"), ("--transformer-impl", "transformer_engine")])
def test_megatron_lm_launcher_refuses_what_a_cpu_cannot_run(tmp_path, flag, value):
    if not _on_cpu():
        pytest.skip("an accelerator is present: nothing is refused")
    script = tmp_path / "pretrain_gpt.py"
    script.write_text("raise SystemExit('the script must not run')\n")
    for argv in ([flag, value], [f"{flag}={value}"]):
        proc = _launch(tmp_path, script, "--num-layers", "2", *argv)
        assert proc.returncode != 0 and f"{flag} {value} cannot run on this machine" in proc.stderr, proc.stderr
        assert "must not run" not in proc.stderr


SPAWN_SCRIPT = """\
import json, multiprocessing, sys, typing

MARK = "the script's module level ran"


def probe(queue):
    import __main__
    queue.put({"override": hasattr(typing, "override"), "mark": getattr(__main__, "MARK", None)})


if __name__ == "__main__":
    ctx = multiprocessing.get_context("spawn")  # what torch_dist saving uses for its Manager
    queue = ctx.Queue()
    child = ctx.Process(target=probe, args=(queue,))
    child.start()
    seen = queue.get(timeout=120)
    child.join(timeout=120)
    print(json.dumps(dict(seen, exitcode=child.exitcode, parent_override=hasattr(typing, "override"))))
"""


def test_megatron_lm_launcher_spawned_children_get_typing_override_and_the_script(tmp_path):
    """Megatron 0.19's training code imports typing.override (Python 3.12); torch_dist saving starts
    a 'spawn' child that re-imports the main module: it must have override, and the script's names."""
    script = tmp_path / "spawning.py"
    script.write_text(SPAWN_SCRIPT)
    proc = _launch(tmp_path, script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen == {"override": True, "mark": "the script's module level ran", "exitcode": 0, "parent_override": True}


def test_megatron_lm_launcher_usage(tmp_path):
    import subprocess
    proc = subprocess.run([sys.executable, LAUNCHER, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "usage: megatron_lm_launch.py PATH/TO/pretrain_gpt.py" in proc.stderr
