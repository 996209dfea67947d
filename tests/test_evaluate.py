"""ouro_jax.evaluation: per-step CE on text, task accuracy per step, the Q-exit sweep, plots, the CLI,
held-out text evaluation in training, and tokenizer files in exports."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import forward, golden_with_tokenizer

from ouro_jax import Ouro, exit_pdf, q_exit_step
from ouro_jax.cli.eval import main as cli_main
from ouro_jax.data.tokenizer import load_tokenizer
from ouro_jax.evaluation import (
    MODEL_GATE,
    EvalInputError,
    StepForward,
    TextEvaluation,
    decode_task,
    evaluate_model,
    score_task,
    score_text,
    sweep,
    text_source,
)
from ouro_jax.evaluation.sweep import ce_quality
from ouro_jax.evaluation.tasks import make_eval_task

REPO = pathlib.Path(__file__).resolve().parents[1]
TEXT = ["Looped models reuse one stack of layers.", "An exit gate picks the depth of each token.", "Short text."]


@pytest.fixture(scope="module")
def model_dir(golden_dir, tmp_path_factory):
    return golden_with_tokenizer(golden_dir, tmp_path_factory.mktemp("eval") / "golden")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "held_out.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXT))
    return path


def _reference_step_ce(cfg, params, ids):
    """Per-step next-token CE from materialized per-step logits (the slow, obvious way)."""
    out = forward(cfg, params, ids[None, :-1])
    logits = forward(cfg, params, out.hidden_states, method=Ouro.logits)[:, 0]   # [T, S, V]
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    ce = -np.take_along_axis(np.asarray(log_probs), ids[None, 1:, None], axis=-1)[..., 0]
    return ce, np.asarray(out.gate_logits[:, 0])


def test_text_step_ce_matches_materialized_logits(model_dir, text_file, golden_model):
    cfg, params = golden_model
    source = text_source(text_file, cfg.vocab_size, model_dir=str(model_dir))
    scores = score_text(StepForward(cfg), params, source, seq_len=128, batch_size=2, progress=False)
    tok = load_tokenizer(model_dir)
    ce, gates = [], []
    for text in TEXT:   # all documents fit one row: every next token inside it is scored once
        doc_ce, doc_gate = _reference_step_ce(cfg, params, np.append(tok.encode(text), tok.eos_id))
        ce.append(doc_ce)
        gates.append(doc_gate[:, :])
    want = np.concatenate(ce, axis=1)
    assert scores.step_ce.shape == want.shape == (cfg.total_ut_steps, sum(len(t) for t in TEXT))
    np.testing.assert_allclose(scores.step_ce, want, atol=2e-4)
    np.testing.assert_allclose(scores.gate_logits[MODEL_GATE], np.concatenate(gates, axis=1), atol=2e-4)
    summary = scores.summary()
    np.testing.assert_allclose(summary["step_perplexity"], np.exp(want.mean(axis=1)), rtol=1e-4)


def test_sweep_points_follow_the_exit_rule():
    rng = np.random.default_rng(0)
    step_ce = rng.uniform(0, 5, (4, 50)).astype(np.float32)
    gate = rng.normal(0, 2, (4, 50)).astype(np.float32)
    result = sweep({"model": gate}, ce_quality(step_ce), metric="ce", num_layers=3, thresholds=[0.0, 0.5, 1.0])
    static = result["curves"]["static"]
    assert [p["mean_depth"] for p in static] == [1, 2, 3, 4]
    np.testing.assert_allclose([p["value"] for p in static], step_ce.mean(axis=1), rtol=1e-6)
    q = result["curves"]["q_exit:model"]
    steps = np.asarray(q_exit_step(gate, 0.5))
    assert q[1]["mean_depth"] == pytest.approx(np.mean(steps + 1))
    assert q[1]["layer_applications"] == pytest.approx(3 * np.mean(steps + 1))
    assert q[1]["value"] == pytest.approx(step_ce[steps, np.arange(50)].mean(), rel=1e-6)
    assert q[0]["mean_depth"] == 1.0 and q[2]["mean_depth"] == 4.0   # q=0 exits at once, q=1 runs every step
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sweep({"model": gate}, ce_quality(step_ce), metric="ce", num_layers=3, thresholds=[1.5])


def test_task_accuracy_per_step_and_second_gate(golden_model):
    cfg, params = golden_model
    task = make_eval_task("mano:max_len=2,modulus=5", cfg.vocab_size)
    other_gate = jax.tree.map(lambda x: -x + 0.3, params["exit_gate"])
    step_forward = StepForward(cfg, gates={"trained": other_gate}, predictions=True)
    scores = score_task(step_forward, params, task, num_examples=20, batch_size=8, progress=False)
    ev = task.eval_set(20)
    ids = np.concatenate([ev.prompts, ev.answers], axis=1)
    model = Ouro(cfg)
    out = forward(cfg, params, ids)
    logits = forward(cfg, params, out.hidden_states, method=Ouro.logits)
    answer = slice(ev.prompts.shape[1] - 1, ids.shape[1] - 1)
    want = np.asarray(logits.argmax(-1))[:, :, answer]
    np.testing.assert_array_equal(scores.predictions, want)
    assert scores.step_accuracy() == [task.evaluate(ev.prompts, p) for p in want]
    trained = np.asarray(model.apply({"params": {**params, "exit_gate": other_gate}}, out.hidden_states,
                                     method=lambda m, h: m.exit_gate(h)))[:, :, answer]
    np.testing.assert_allclose(scores.gate_logits["trained"], trained, atol=1e-5)
    assert not np.allclose(scores.gate_logits["trained"], scores.gate_logits[MODEL_GATE])


def test_decode_task_generates_answers_token_by_token(golden_model):
    """Full cache at full depth = greedy decoding with the full forward pass; a shared cache gives the fields."""
    cfg, params = golden_model
    task = make_eval_task("mano:max_len=2,modulus=5,answer_base=2", cfg.vocab_size)
    ev = task.eval_set(6)
    ids = ev.prompts

    @jax.jit
    def next_token(ids):   # the full forward pass, as one program per length
        out = Ouro(cfg).apply({"params": params}, ids)
        return Ouro(cfg).apply({"params": params}, out.hidden_states[-1, :, -1], method=Ouro.logits).argmax(-1)

    for _ in range(task.answer_len):
        ids = np.concatenate([ids, np.asarray(next_token(ids))[:, None]], axis=1)
    tokens = ids[:, ev.prompts.shape[1]:]
    want = np.stack([task.solve(p) for p in ev.prompts])
    full = decode_task(cfg, params, task, num_examples=6, batch_size=3)
    assert full["accuracy"] == task.evaluate(ev.prompts, tokens)
    assert full["token_accuracy"] == pytest.approx((tokens == want).mean(0).tolist())
    assert full["mean_depth"] == cfg.total_ut_steps
    shared = decode_task(cfg, params, task, num_examples=6, batch_size=6, policy="first", exit_threshold=0.5)
    assert shared["policy"] == "first" and len(shared["token_accuracy"]) == 3
    assert 1 <= shared["mean_depth"] <= cfg.total_ut_steps


def test_evaluate_model_writes_json_and_plots(model_dir, text_file, golden_dir, tmp_path):
    result = evaluate_model(str(model_dir), text=[str(text_file)], task="mano:max_len=2,modulus=5",
                            gate_from=str(golden_dir), thresholds=[0.3, 0.7], seq_len=128, batch_size=4,
                            num_examples=16, output_dir=str(tmp_path), progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["text"][str(text_file)]["tokens"] == sum(len(t) for t in TEXT)
    assert len(saved["task"]["step_accuracy"]) == 4
    assert set(saved["task"]["sweep"]["curves"]) == {"static", "q_exit:model", "q_exit:trained"}
    # the golden checkpoint's own gate, passed as the "trained" gate, gives the model's curve
    assert saved["task"]["sweep"]["curves"]["q_exit:trained"] == saved["task"]["sweep"]["curves"]["q_exit:model"]
    for png in result["plots"].values():
        assert pathlib.Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(result["plots"]) == 2


def test_cli_prints_steps_and_writes_outputs(model_dir, text_file, tmp_path, capsys):
    assert cli_main([str(model_dir), "--text", str(text_file), "--thresholds", "0.5,1", "--seq-len", "64",
                     "--output", str(tmp_path), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "step 4: CE" in printed and "q_exit:model" in printed
    assert (tmp_path / "results.json").is_file() and list(tmp_path.glob("sweep_text_*.png"))


@pytest.mark.parametrize("args, message", [
    (["/no/such/dir", "--task", "mano"], "no such directory"),
    (["{golden}", "--task", "sudoku"], "unknown task 'sudoku'"),
    (["{golden}", "--task", "mano", "--thresholds", "0.5,1.5"], "[0, 1]"),
    (["{golden}", "--text", "{bad}"], "invalid JSON"),
    (["{golden}", "--text", "/no/such/file.jsonl"], "no such file"),
    (["{golden}"], "nothing to evaluate"),
    (["{golden}", "--text", "{text}", "--tokenizer", "byte"], "do not fit the model's vocabulary"),
])
def test_cli_bad_input_is_one_line(args, message, golden_dir, text_file, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    argv = [a.format(golden=golden_dir, bad=bad, text=text_file) for a in args]
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def _exit_code(argv) -> int:
    try:
        return cli_main(argv)
    except SystemExit as e:  # argparse rejects bad flag values itself
        return e.code


@pytest.mark.subprocess
def test_python_m_evaluate_bad_directory_exits_nonzero():
    proc = subprocess.run([sys.executable, "-m", "ouro_jax.cli.eval", "/no/such/model", "--task", "mano"],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["ouro-eval: error: /no/such/model: no such directory"]


def test_text_evaluation_for_training(golden_model, text_file, model_dir):
    from ouro_jax import sharding as shd

    cfg, params = golden_model
    mesh = shd.make_mesh(dict(data=-1, fsdp=1, tensor=1))

    class Program:  # the train program's evaluate contract: per-step CE sums over the loss mask
        @staticmethod
        def evaluate(p, batch):
            out = Ouro(cfg).apply({"params": p}, batch["input_ids"], positions=batch["positions"],
                                  segment_ids=batch["segment_ids"], targets=batch["targets"])
            mask = batch["loss_mask"]
            return {"step_ce_sum": (out.step_ce * mask).sum(axis=(1, 2)), "tokens": mask.sum(),
                    "predictions": np.zeros((1,))}

    evaluation = TextEvaluation(str(text_file), cfg.vocab_size, 64, 2, mesh, max_tokens=10_000,
                                tokenizer=str(model_dir))
    got = evaluation(Program, params)
    scores = score_text(StepForward(cfg), params, text_source(text_file, cfg.vocab_size, model_dir=str(model_dir)),
                        seq_len=64, batch_size=8, progress=False)
    np.testing.assert_allclose(got["step_ce"], scores.mean_ce(), rtol=1e-4)
    np.testing.assert_allclose(got["perplexity"], np.exp(scores.mean_ce()), rtol=1e-4)


def test_exit_pdf_of_sweep_inputs_is_a_distribution(golden_model):
    cfg, params = golden_model   # the model gate returned by StepForward is the model's own
    ids = np.arange(3, 19, dtype=np.int32)[None]
    batch = {"input_ids": ids, "targets": np.roll(ids, -1, 1), "segment_ids": np.ones_like(ids),
             "positions": np.arange(16, dtype=np.int32)[None]}
    out = StepForward(cfg)(params, batch)
    want = forward(cfg, params, ids).gate_logits
    np.testing.assert_allclose(out["gate_logits"][MODEL_GATE], want, atol=1e-5)
    np.testing.assert_allclose(np.asarray(exit_pdf(out["gate_logits"][MODEL_GATE])).sum(0), 1.0, atol=1e-5)


def test_export_of_hf_directory_carries_its_tokenizer(model_dir, tmp_path):
    from ouro_jax.params_io import export_checkpoint

    out = pathlib.Path(export_checkpoint(model_dir, tmp_path / "export"))
    assert (out / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()
    assert (out / "tokenizer_config.json").is_file()


def test_bad_text_inputs_raise_eval_input_error(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(EvalInputError, match="unknown input type"):
        text_source(tmp_path / "x.csv", 128)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(EvalInputError, match="no documents"):
        text_source(tmp_path / "empty.jsonl", 300)
