"""The experiment drivers (`experiments/`) run end to end in their --quick mode and write the expected JSON."""

import json
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # experiments/ and configs/ are imported from the repository root

from experiments import adaptive_exit, iso_mano, kv_policies, multihop_efficiency  # noqa: E402


def test_iso_mano_quick(tmp_path):
    iso_mano.main(["--quick", "--out", str(tmp_path), "--task", "mano:max_len=3,modulus=23", "--lrs", "3e-3"])
    result = json.loads((tmp_path / "results.json").read_text())
    runs = result["runs"]
    assert [(r["layers"], r["loops"]) for r in runs.values()] == [(1, 4), (1, 1), (4, 1)]
    looped = runs["looped 1x4"]
    assert list(looped["runs"]) == ["lr=0.003,seed=0"] and looped["best_run"] == "lr=0.003,seed=0"
    assert len(looped["best_step_accuracy"]) == 4 and len(runs["iso-FLOP 4x1"]["mean_step_accuracy"]) == 1
    assert runs["iso-param 1x1"]["params"] < runs["iso-FLOP 4x1"]["params"]
    assert (tmp_path / "iso_mano.png").stat().st_size > 0


def test_iso_mano_reports_the_best_run_and_the_mean_beside_it():
    run = lambda lr, seed, acc: {"lr": lr, "seed": seed, "params": 10, "step_accuracy": acc}
    result = {"runs": {"looped 1x2": {"runs": {"a": run(1e-3, 0, [0.2, 0.5]), "b": run(3e-3, 0, [0.4, 0.7]),
                                               "c": run(1e-2, 0, [0.1, 0.3])}}}}
    entry = iso_mano.summarize(result)["runs"]["looped 1x2"]
    assert entry["best_run"] == "lr=0.003,seed=0" and entry["best_step_accuracy"] == [0.4, 0.7]
    np.testing.assert_allclose(entry["mean_step_accuracy"], [0.7 / 3, 0.5])


def test_adaptive_exit_quick(tmp_path):
    adaptive_exit.main(["--quick", "--out", str(tmp_path)])
    seed = json.loads((tmp_path / "results.json").read_text())["seeds"]["0"]
    assert len(seed["step_accuracy"]) == 4
    assert set(seed["sweep"]["curves"]) == {"static", "q_exit:model", "q_exit:trained"}
    assert len(seed["gain_over_static"]["q_exit:trained"]) == len(seed["sweep"]["curves"]["q_exit:trained"])
    assert os.path.getsize(seed["plot"]) > 0


def test_kv_policies_quick(tmp_path):
    kv_policies.main(["--quick", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "kv_policies.json").read_text())
    rows = result["seeds"]["0"]
    assert [(r["policy"], r["exit_threshold"]) for r in rows[:4]] == [(p, 1.0) for p in ("full", "last", "first",
                                                                                          "average")]
    assert all(len(r["token_accuracy"]) == 3 and 0 <= r["accuracy"] <= 1 for r in rows)
    cosine = result["kv_cosine_to_last_step"]["0"]
    assert len(cosine["keys"]) == 4 and cosine["values"][-1] == 1.0
    assert (tmp_path / "kv_policies.png").stat().st_size > 0


def test_multihop_efficiency_quick(tmp_path):
    multihop_efficiency.main(["--quick", "--out", str(tmp_path), "--fractions", "0.5"])
    result = json.loads((tmp_path / "results.json").read_text())
    assert set(result["final_accuracy"]) == {"looped 1x4", "iso-param 1x1"}
    assert set(result["final_accuracy"]["looped 1x4"]) == {"0.5"}
    run = result["runs"]["looped 1x4"]["0.5"]["0"]
    assert len(run["step_accuracy"]) == 4 and 0 <= run["step_accuracy"][-1] <= 1
    assert (tmp_path / "multihop_efficiency.png").stat().st_size > 0
