"""KV-cache sharing at decode (SPEC 5, the paper's Table 14): answers generated token by token with the
`full`, `last`, `first` and `average` cache policies.

    python -m experiments.kv_policies --out runs/experiments/adaptive   # --quick: a short smoke run

The model is the Stage I looped model of `experiments.adaptive_exit` (same OUT and seed: reused, else
trained here) on Mano with multi-token answers (the value's binary digits, `answer_base=2`): the engine
prefills the prompt at every step, then greedily generates `answer_len` tokens; the first comes from the
prefill (the same under every policy), each later one runs its recurrent steps against the policy's view of
the cache. Scored by exact match of the whole answer (`ouro_jax.evaluation.decode_task`). Also measures how
far apart the steps' keys and values of the prompts are (what a shared cache replaces them with). Writes
OUT/kv_policies.json and OUT/kv_policies.png.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from experiments.adaptive_exit import TASK
from experiments.common import experiment_args, looped_stage1, new_figure, write_json
from ouro_jax import Ouro
from ouro_jax.evaluation import decode_task, make_eval_task
from ouro_jax.inference import POLICIES
from ouro_jax.params_io import load_model


def main(argv=None) -> dict:
    a, seeds = experiment_args(
        __doc__, argv, out="runs/experiments/adaptive", task=TASK, quick_help="4 training steps",
        steps_help="Stage I steps (when the model is trained here)",
        add=lambda p: p.add_argument("--thresholds", default="1.0,0.5", help="Q-exit q of the decoder (1: full depth)"))
    result = {"task": a.task, "examples": a.examples, "seeds": {}, "kv_cosine_to_last_step": {}}
    for seed in seeds:
        params_dir, _ = looped_stage1(a.out, a.task, steps=a.steps, seed=seed)
        cfg, params = load_model(params_dir)
        task = make_eval_task(a.task, cfg.vocab_size)
        rows = [decode_task(cfg, params, task, num_examples=a.examples, batch_size=128, policy=policy,
                            exit_threshold=float(q))
                for q in a.thresholds.split(",") for policy in POLICIES]
        result["seeds"][seed] = rows
        cosine = result["kv_cosine_to_last_step"][seed] = kv_cosine(cfg, params, task.eval_set(a.examples).prompts)
        print(f"seed {seed} cosine of each step's keys / values to the last step's: {cosine}", flush=True)
        for r in rows:
            print(f"seed {seed} q={r['exit_threshold']:g} {r['policy']:8s} accuracy {r['accuracy']:.3f} "
                  f"per token {np.round(r['token_accuracy'], 3).tolist()} mean depth {r['mean_depth']:.2f}", flush=True)
    write_json(os.path.join(a.out, "kv_policies.json"), result)
    plot(result, os.path.join(a.out, "kv_policies.png"))
    return result


def kv_cosine(cfg, params, prompts: np.ndarray) -> dict[str, list[float]]:
    """Mean cosine similarity of each step's keys (values) to the last step's, over prompt tokens, layers, heads."""
    kv = Ouro(cfg).apply({"params": params}, jnp.asarray(prompts), return_kv=True).kv   # [T, N, B, S, KVH, hd]
    out = {}
    for name, x in zip(("keys", "values"), kv):
        x = np.asarray(x, np.float32)
        x = x / np.linalg.norm(x, axis=-1, keepdims=True)
        out[name] = [round(float(c), 3) for c in np.sum(x * x[-1:], -1).mean(axis=tuple(range(1, x.ndim - 1)))]
    return out


def plot(result: dict, path: str) -> None:
    """Grouped bars: answer accuracy per policy, one group per Q-exit threshold (mean over seeds, dots: seeds)."""
    fig, ax = new_figure()
    runs = list(result["seeds"].values())
    groups = sorted({r["exit_threshold"] for r in runs[0]}, reverse=True)
    for i, policy in enumerate(POLICIES):
        for j, q in enumerate(groups):
            accs = [r["accuracy"] for rows in runs for r in rows if r["policy"] == policy and r["exit_threshold"] == q]
            x = j * (len(POLICIES) + 1) + i
            ax.bar(x, np.mean(accs), color=f"C{i}", label=policy if j == 0 else None)
            ax.plot([x] * len(accs), accs, "k.", ms=4)
    ax.set_xticks([j * (len(POLICIES) + 1) + (len(POLICIES) - 1) / 2 for j in range(len(groups))],
                  [f"q = {q:g}" + (" (full depth)" if q >= 1 else " (early exit)") for q in groups])
    ax.set_ylabel("exact match of the generated answer")
    ax.set_title(f"KV-cache policy at decode\n{result['task']}", fontsize=10)
    ax.legend(fontsize=8)
    fig.savefig(path)


if __name__ == "__main__":
    main()
