"""The experiment drivers (`experiments/`) run end to end in their --quick mode and write the expected JSON."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # experiments/ and configs/ are imported from the repository root

from configs import demo  # noqa: E402
from experiments import (  # noqa: E402
    adaptive_exit,
    capo_capacity,
    iso_mano,
    kv_policies,
    multihop_efficiency,
    real_text,
    refresh_numbers,
    results_tables,
)


# Slow (3 models): train_and_evaluate runs in test_multihop_efficiency_quick, the summary and the table in
# test_iso_mano_reports_the_best_run_and_the_mean_beside_it and test_results_md_tables_are_rendered_...
@pytest.mark.slow
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
    assert "best (lr=0.003,seed=0) / mean at lr=0.003 / mean" in results_tables.iso_mano(result)


def test_iso_mano_reports_the_best_run_and_the_mean_beside_it():
    run = lambda lr, seed, acc: {"lr": lr, "seed": seed, "params": 10, "step_accuracy": acc}
    result = {"runs": {"looped 1x2": {"runs": {"a": run(1e-3, 0, [0.2, 0.5]), "b": run(3e-3, 0, [0.4, 0.7]),
                                               "c": run(1e-2, 0, [0.1, 0.3]), "d": run(1e-3, 1, [0.3, 0.6]),
                                               "e": run(3e-3, 1, [0.2, 0.3])}}}}
    entry = iso_mano.summarize(result)["runs"]["looped 1x2"]
    assert entry["best_run"] == "lr=0.003,seed=0" and entry["best_step_accuracy"] == [0.4, 0.7]
    # the best learning rate by the mean over seeds is 1e-3 (0.55), not the best run's 3e-3 (0.5)
    assert entry["best_lr"] == "0.001" and set(entry["lr_mean_step_accuracy"]) == {"0.001", "0.003", "0.01"}
    np.testing.assert_allclose(entry["lr_mean_step_accuracy"]["0.001"], [0.25, 0.55])
    np.testing.assert_allclose(entry["mean_step_accuracy"], [1.2 / 5, 2.4 / 5])


@pytest.mark.slow  # its training runs under make test-all; its tables render in test_results_md_tables_*
def test_adaptive_exit_quick(tmp_path):
    adaptive_exit.main(["--quick", "--out", str(tmp_path)])
    seed = json.loads((tmp_path / "results.json").read_text())["seeds"]["0"]
    assert len(seed["step_accuracy"]) == 4
    assert set(seed["sweep"]["curves"]) == {"static", "q_exit:model", "q_exit:trained"}
    assert len(seed["gain_over_static"]["q_exit:trained"]) == len(seed["sweep"]["curves"]["q_exit:trained"])
    assert os.path.getsize(seed["plot"]) > 0


@pytest.mark.slow  # (make test-all) the KV policies themselves run in test_generate_decode.py
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


@pytest.mark.slow  # its training runs under make test-all; its tables render in test_results_md_tables_*
def test_multihop_efficiency_quick(tmp_path):
    multihop_efficiency.main(["--quick", "--out", str(tmp_path), "--fractions", "0.5"])
    result = json.loads((tmp_path / "results.json").read_text())
    assert set(result["final_accuracy"]) == {"looped 1x4", "iso-param 1x1"}
    assert set(result["final_accuracy"]["looped 1x4"]) == {"0.5"}
    run = result["runs"]["looped 1x4"]["0.5"]["0"]
    assert len(run["step_accuracy"]) == 4 and 0 <= run["step_accuracy"][-1] <= 1
    assert (tmp_path / "multihop_efficiency.png").stat().st_size > 0
    assert "| looped 1x4 |" in results_tables.multihop_efficiency(result)


@pytest.mark.slow  # its training runs under make test-all; its tables render in test_results_md_tables_*
def test_capo_capacity_quick(tmp_path):
    result = capo_capacity.main(["--quick", "--out", str(tmp_path), "--hidden", "32"])
    saved = json.loads((tmp_path / "results.json").read_text())
    looped, flat = saved["runs"]["looped 1x4"]["0"], saved["runs"]["non-looped 1x1"]["0"]
    assert looped["params"] == flat["params"] and len(looped["bits"]) == 4 and len(flat["bits"]) == 1
    assert saved["hidden"] == 32 and "d = 32" in results_tables.capo_capacity(saved)
    assert 0 <= looped["bits"][-1] <= looped["total_bits"] == 50 * 4 * 5
    assert looped["bits_per_param"][-1] == looped["bits"][-1] / looped["params"]
    assert result["runs"]["looped 1x4"]["0"]["value_loss"] == looped["value_loss"]
    assert "(of 1000)" in results_tables.capo_capacity(saved)


def _numbers():
    return json.loads((pathlib.Path(REPO) / "docs" / "numbers.json").read_text())


def test_readme_demo_numbers_are_the_regenerated_ones():
    """README's demo line and demo evaluation are exactly what refresh_numbers wrote into docs/numbers.json."""
    readme, numbers = (pathlib.Path(REPO) / "README.md").read_text(), _numbers()
    assert refresh_numbers.marked(readme, "demo") == f"`{numbers['demo']['line']}`"
    assert refresh_numbers.marked(readme, "demo_eval") == refresh_numbers.eval_paragraph(numbers["demo_eval"])
    line = numbers["demo"]["line"]
    assert line.endswith("  ".join(f"t={i + 1}: {a:.3f}" for i, a in enumerate(numbers["demo"]["accuracy"])))
    assert numbers["demo_eval"]["static"] == numbers["demo"]["accuracy"]  # the same checkpoint, the same examples
    assert numbers["demo"]["command"] in readme and numbers["demo"]["seed"] == demo.get_config().seed


def test_refresh_numbers_rewrites_only_the_marked_spans():
    text = "a <!--numbers:x-->old<!--/numbers--> b <!--numbers:y-->keep<!--/numbers-->"
    assert refresh_numbers.replace_marked(text, "x", "new") == "a <!--numbers:x-->new<!--/numbers--> b " \
        "<!--numbers:y-->keep<!--/numbers-->"
    with pytest.raises(ValueError, match="numbers:z"):
        refresh_numbers.replace_marked(text, "z", "new")


@pytest.mark.slow
@pytest.mark.subprocess
def test_the_demo_prints_the_readme_line(tmp_path):
    """`make demo`'s command (configs/demo.py, 3000 steps: minutes) prints exactly the README's line."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # as `make demo`: one CPU device, default XLA
    out = subprocess.run([sys.executable, "-m", "ouro_jax.cli.train", "--config", os.path.join(REPO, "configs/demo.py"),
                          "--workdir", str(tmp_path / "demo")], env={**env, "JAX_PLATFORMS": "cpu"}, cwd=REPO,
                         capture_output=True, text=True, timeout=3600, check=True).stdout
    printed = next(line for line in out.splitlines() if "held-out accuracy" in line)
    assert f"`{printed}`" == refresh_numbers.marked((pathlib.Path(REPO) / "README.md").read_text(), "demo")


@pytest.mark.slow  # a demo and a Stage II run (make test-all); the marked spans and the README line are checked above
def test_refresh_numbers_quick(tmp_path):
    numbers = refresh_numbers.main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "numbers.json").read_text())
    assert saved["demo"]["steps"] == 4 and saved["demo"]["line"].startswith("mano held-out accuracy")
    assert len(saved["demo_eval"]["static"]) == 4 and set(saved["demo_eval"]["q_exit"]) == {"q_exit:model",
                                                                                           "q_exit:trained"}
    assert numbers["demo"]["wall_s"] > 0 and "python -m experiments.refresh_numbers" == saved["refreshed_by"]
    assert refresh_numbers.eval_paragraph(saved["demo_eval"]).startswith("16 held-out Mano examples")


@pytest.mark.slow  # its training runs under make test-all; its tables render in test_results_md_tables_*
def test_real_text_quick(tmp_path):
    result = real_text.main(["--quick", "--out", str(tmp_path)])
    corpus = result["corpus"]
    assert corpus["train_files"] > 0 and corpus["heldout_files"] > 0 and corpus["train_bytes"] <= 200_000
    train = {json.loads(line)["text"] for line in (tmp_path / "corpus" / "train.jsonl").open()}
    held = {json.loads(line)["text"] for line in (tmp_path / "corpus" / "heldout.jsonl").open()}
    assert not train & held                                           # whole files held out
    looped = result["runs"]["looped 1x4"]["0"]
    assert len(looped["step_perplexity"]) == 4 and len(result["runs"]["iso-FLOP 4x1"]["0"]["step_perplexity"]) == 1
    assert abs(sum(looped["exit_pdf"]) - 1) < 1e-5 and looped["q_exit"][-1]["layer_applications"] == 4
    assert looped["tokens"] >= 2048 and looped["params"] == result["runs"]["iso-param 1x1"]["0"]["params"]
    assert "Q-exit of the looped model, seed 0" in results_tables.real_text(result)


def test_results_md_tables_are_rendered_from_the_saved_results():
    """Every table of docs/results.md is what results_tables renders from docs/results/NAME.json; a driver
    without saved results says so instead of showing numbers."""
    text = (pathlib.Path(REPO) / "docs" / "results.md").read_text()
    rendered, written = results_tables.render_docs(text)
    assert rendered == text
    for name in set(results_tables.SOURCES) - set(written):
        assert refresh_numbers.marked(text, name).strip().startswith("(not run")
