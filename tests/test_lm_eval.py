"""The lm-eval backend `ouro_jax` against lm-eval's own `hf` backend on our export of the same weights."""

import os
import pathlib
import subprocess
import sys

import jax
import lm_eval
import numpy as np
import pytest
from helpers import LM_EVAL_TASKS, golden_with_tokenizer, subprocess_env, task_manager

from ouro_jax.evaluation.lm_eval_adapter import OuroJaxLM  # noqa: E402

TASKS = ["ouro_tiny_mc", "ouro_tiny_ppl", "ouro_tiny_gen"]


@pytest.fixture(scope="module")
def dirs(golden_dir, tmp_path_factory):
    from ouro_jax.params_io import export_checkpoint

    tmp = tmp_path_factory.mktemp("lm_eval")
    source = golden_with_tokenizer(golden_dir, tmp / "golden")
    return source, pathlib.Path(export_checkpoint(source, tmp / "export", dtype="float32"))


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.chdir(LM_EVAL_TASKS)  # the task YAMLs name their JSONL files relative to it
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))


def _scores(resps) -> list[float]:
    flat = []
    for r in resps:
        value = r[0]
        flat.append(float(value[0] if isinstance(value, (tuple, list)) else value))
    return flat


@pytest.mark.slow  # lm-eval's hf backend in torch (make test-all); test_exit_settings_* runs our backend by default
@pytest.mark.torch
def test_loglikelihoods_and_metrics_match_hf_backend(dirs, offline):
    source, export = dirs
    manager = task_manager()
    ours = lm_eval.simple_evaluate(model="ouro_jax", model_args=f"pretrained={source},batch_size=4", tasks=TASKS,
                                   task_manager=manager, log_samples=True)
    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={export},trust_remote_code=True,dtype=float32",
                                     tasks=TASKS, task_manager=manager, log_samples=True, batch_size=4, device="cpu")
    diffs = []
    for task in ("ouro_tiny_mc", "ouro_tiny_ppl"):
        for a, b in zip(ours["samples"][task], theirs["samples"][task], strict=True):
            diffs.append(np.max(np.abs(np.subtract(_scores(a["resps"]), _scores(b["resps"])))))
    assert max(diffs) < 1e-4, f"max |loglikelihood difference| {max(diffs)}"
    for task in TASKS:
        for key, value in ours["results"][task].items():
            if key.endswith(",none") and "stderr" not in key:
                assert value == pytest.approx(theirs["results"][task][key], rel=1e-4), (task, key)
    gen = [s["resps"] for s in ours["samples"]["ouro_tiny_gen"]]
    assert gen == [s["resps"] for s in theirs["samples"]["ouro_tiny_gen"]]


def test_exit_settings_select_the_released_modes(dirs, golden):
    """Loglikelihoods under exit_at_step / Q-exit equal log-softmax of the released code's logits."""
    source, _ = dirs
    ids = golden["input_ids"][0].tolist()
    for args, key in [({"exit_at_step": 1}, "logits_exit_at_step_1"), ({"exit_threshold": 0.5},
                                                                        "logits_exit_threshold_0p5"),
                      ({}, "logits_default")]:
        lm = OuroJaxLM(str(source), batch_size=2, **args)
        (logprob, greedy), = lm._score_batch([(ids[:-1], ids[-3:])])
        log_probs = np.asarray(jax.nn.log_softmax(golden[key][0, :-1]))
        want = sum(log_probs[i, ids[i + 1]] for i in range(len(ids) - 4, len(ids) - 1))
        assert logprob == pytest.approx(float(want), abs=1e-4), key
    with pytest.raises(ValueError, match="exit_threshold"):
        OuroJaxLM(str(source), exit_threshold=1.5)


@pytest.mark.subprocess
@pytest.mark.slow   # the lm_eval command in a subprocess (make test-all); the backend itself runs in-process above
def test_lm_eval_cli_finds_the_backend(dirs, tmp_path):
    """`lm_eval --model ouro_jax` works: the package's .pth hook registers the backend."""
    source, _ = dirs
    cli = pathlib.Path(sys.executable).parent / "lm_eval"
    env = {**subprocess_env(devices=8), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(LM_EVAL_TASKS.parents[1]), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([str(cli), "--model", "ouro_jax", "--model_args",
                           f"pretrained={source},exit_threshold=0.5,depth=4", "--batch_size", "4",
                           "--tasks", "ouro_tiny_mc", "--include_path", str(LM_EVAL_TASKS)],
                          capture_output=True, text=True, cwd=LM_EVAL_TASKS, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ouro_tiny_mc" in proc.stdout and "acc" in proc.stdout
