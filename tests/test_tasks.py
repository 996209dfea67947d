"""Synthetic tasks: answers checked by the independent evaluators; difficulty controls the distribution."""

import random

import numpy as np
import pytest

from ouro_jax.data import Mano, MultiHopQA, make_source, make_task
from ouro_jax.data.tasks import ANS, BOS


def training_examples(task, n, seed=0):
    """The first `n` training documents exactly as the pipeline source yields them."""
    docs = task.documents(seed)
    out = []
    for i in range(n):
        d = docs[i]
        cut = len(d["input_ids"]) - task.answer_len
        assert d["target_weight"][:cut].sum() == 0 and d["target_weight"][cut:].all()  # loss on answers only
        out.append((d["input_ids"][:cut], d["input_ids"][cut:]))
    return out


def mano_prompt(task, text):
    """The prompt of an expression written as text, e.g. "* + 3 4 5"."""
    names = {task.token_name(t): t for t in range(task.vocab_size)}
    tokens = [names[w] for w in text.split()]
    return np.array([BOS, task.len_base + sum(w in "+-*" for w in text.split()) - 1, *tokens, ANS])


def test_mano_known_expressions():
    task = Mano(max_len=4)
    assert task.vocab_size == 3 + 23 + 3 + 4
    for text, value in [("* + 3 4 5", 12), ("- 3 5", 21), ("* 22 22", 1), ("+ - 0 1 * 2 3", 5)]:
        assert task.solve(mano_prompt(task, text)).tolist() == [task.value_base + value]


def test_mano_answer_digits():
    """answer_base=B: the value's base-B digits, most significant first, padded to the width of p - 1."""
    task = Mano(max_len=3, modulus=5, answer_base=2)
    assert task.answer_len == 3 and task.max_example_len == 2 * 3 + 4 + 3
    one_token = Mano(max_len=3, modulus=5)
    for text, value in [("* + 3 4 2", 4), ("- 3 4", 4), ("+ 1 2", 3), ("* 0 4", 0)]:
        digits = [value >> 2 & 1, value >> 1 & 1, value & 1]
        assert task.solve(mano_prompt(task, text)).tolist() == [task.value_base + d for d in digits]
        assert one_token.solve(mano_prompt(one_token, text)).tolist() == [task.value_base + value]
    examples = training_examples(task, 200)
    assert all(np.array_equal(task.solve(p), a) for p, a in examples)
    ev = task.eval_set(50)
    assert ev.answers.shape == (50, 3) and task.evaluate(ev.prompts, ev.answers) == 1.0
    assert np.array_equal(ev.prompts, one_token.eval_set(50).prompts)  # same expressions, other answer format
    assert Mano(max_len=2, modulus=23, answer_base=5).answer_len == 2
    assert make_source("mano:max_len=2,modulus=5,answer_base=2").answer_len == 3
    with pytest.raises(ValueError, match="answer_base"):
        Mano(modulus=5, answer_base=7)


def test_mano_answers_verified_by_evaluator():
    task = Mano(max_len=8)
    examples = training_examples(task, 3000)
    prompts = [p for p, _ in examples]
    answers = np.stack([a for _, a in examples])
    assert all(np.array_equal(task.solve(p), a) for p, a in examples)
    assert task.evaluate(prompts, answers) == 1.0
    wrong = answers.copy()
    wrong[::4] = task.value_base + (wrong[::4] - task.value_base + 1) % 23  # every 4th answer off by one
    assert task.evaluate(prompts, wrong) == pytest.approx(0.75)
    ev = task.eval_set(1000)
    assert task.evaluate(ev.prompts, ev.answers) == 1.0
    assert task.evaluate(ev.prompts, ev.answers[:, 0]) == 1.0  # [n] predictions accepted too


def test_mano_length_distribution():
    L = 6
    task = Mano(max_len=L)
    examples = training_examples(task, 6000)
    lengths = np.array([task.num_ops(p) for p, _ in examples])
    for (p, _), length in zip(examples, lengths):
        ops = sum(task.op_base <= t < task.len_base for t in p)
        assert ops == length and len(p) == 2 * length + 4  # operators, 2 * length + 1 expression tokens
    counts = np.bincount(lengths, minlength=L + 1)[1:]
    assert counts.sum() == 6000 and len(counts) == L
    expected = 6000 / L
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 25.0, counts  # uniform on [1, L] (df=5: p ~ 1e-4)
    ops = np.concatenate([p[2:-1][(p[2:-1] >= task.op_base) & (p[2:-1] < task.len_base)] for p, _ in examples])
    assert np.allclose(np.bincount(ops - task.op_base) / len(ops), 1 / 3, atol=0.03)  # + - * uniform
    ev = task.eval_set(200)  # evaluation always at l = L
    assert ev.prompts.shape == (200, 2 * L + 4) and all(task.num_ops(p) == L for p in ev.prompts)
    assert task.max_example_len == 2 * L + 5


def test_mano_determinism_and_streams():
    a, b = Mano(max_len=5, seed=3), Mano(max_len=5, seed=3)
    assert all(np.array_equal(a.documents(7)[i]["input_ids"], b.documents(7)[i]["input_ids"]) for i in range(50))
    assert any(not np.array_equal(a.documents(7)[i]["input_ids"], a.documents(8)[i]["input_ids"]) for i in range(50))
    assert np.array_equal(a.eval_set(20).prompts, b.eval_set(20).prompts)
    assert not np.array_equal(a.eval_set(20).prompts, Mano(max_len=5, seed=4).eval_set(20).prompts)


def test_mano_evaluator_rejects_malformed():
    task = Mano(max_len=4)
    with pytest.raises(ValueError, match="malformed"):
        task.solve(mano_prompt(task, "+ 3"))  # operator missing an operand
    bad_len = mano_prompt(task, "+ 3 4")
    bad_len[1] += 1
    with pytest.raises(ValueError, match="wrong length token"):
        task.solve(bad_len)
    with pytest.raises(ValueError, match="expected predictions"):
        task.evaluate([mano_prompt(task, "+ 3 4")], np.zeros((1, 2)))


def test_multihop_answers_verified_by_evaluator():
    task = MultiHopQA(num_train_questions=3000)
    assert task.vocab_size == 3 + 20 + 500 and task.num_facts == 400 * 20
    assert task.num_train_examples == 8000 + 3000
    # Documents: all atomic facts, then the training questions (the pipeline shuffles them).
    examples = training_examples(task, task.num_train_examples)
    assert all(np.array_equal(task.solve(p), a) for p, a in examples[::2])
    assert sum(len(p) == 4 for p, _ in examples) == 8000 and sum(len(p) == 6 for p, _ in examples) == 3000
    ev = task.eval_set(2000)
    assert task.evaluate(ev.prompts, ev.answers) == 1.0
    shuffled = np.roll(ev.answers, 1, axis=0)
    assert task.evaluate(ev.prompts, shuffled) == pytest.approx(np.mean(shuffled[:, 0] == ev.answers[:, 0]))


def test_multihop_heldout_split():
    task = MultiHopQA(num_train_questions=5000, test_fraction=0.2, seed=1)
    assert not task.is_heldout(task.train_questions).any()
    train_prompts = {tuple(p) for p, _ in training_examples(task, task.num_train_examples)}
    ev = task.eval_set(3000)
    assert not train_prompts & {tuple(p) for p in ev.prompts}  # no held-out question is trained on
    assert len({tuple(p) for p in ev.prompts}) == 3000
    rng = np.random.default_rng(0)
    assert task.is_heldout(rng.integers(0, task.num_questions, 20000)).mean() == pytest.approx(0.2, abs=0.015)
    train_ev = task.eval_set(100, split="train")
    assert {tuple(p) for p in train_ev.prompts} <= train_prompts


@pytest.mark.parametrize("hops", [2, 3, 4])
def test_multihop_hops_control_the_questions(hops):
    task = MultiHopQA(hops=hops, num_layers=5, entities_per_layer=30, num_relations=6, num_train_questions=100,
                      test_fraction=0.5)
    ev = task.eval_set(300)
    assert ev.prompts.shape == (300, hops + 3) and task.max_example_len == hops + 4
    start_layers = np.array([task.layer_of(p[-2]) for p in ev.prompts])
    answer_layers = np.array([task.layer_of(a[0]) for a in ev.answers])
    assert (start_layers < 5 - hops).all() and np.array_equal(answer_layers, start_layers + hops)
    assert task.evaluate(ev.prompts, ev.answers) == 1.0


def test_multihop_graph_and_errors():
    task = MultiHopQA(num_layers=3, entities_per_layer=10, num_relations=4, hops=2, num_train_questions=50)
    layers = np.arange(len(task.edges)) // 10
    assert np.array_equal(task.edges // 10, np.broadcast_to(layers[:, None] + 1, task.edges.shape))
    assert task.detokenize(task.eval_set(1).prompts[0]).startswith("<bos> r")
    for hops in (1, 5):
        with pytest.raises(ValueError, match="hops must be"):
            MultiHopQA(hops=hops, num_layers=5)
    with pytest.raises(ValueError, match="num_train_questions"):
        MultiHopQA(num_layers=3, entities_per_layer=10, num_relations=4, hops=2, num_train_questions=10**6)
    with pytest.raises(ValueError, match="not a multi-hop QA prompt"):
        task.solve(np.array([BOS, 3, ANS]))


def test_task_registry():
    assert isinstance(make_task("mano", max_len=3), Mano)
    assert make_source("mano:max_len=7,seed=2").max_len == 7
    assert make_source({"kind": "multihop_qa", "hops": 2, "num_train_questions": 10}).hops == 2
    with pytest.raises(ValueError, match="unknown task"):
        make_task("no_such_task")


def test_multihop_paper_setup_counts_determinism_and_disjoint_split():
    # SPEC 7: one start layer of 100 entities, 20 relations: 100 * 20^3 = 8e5 3-hop questions, 3000 held out.
    task = MultiHopQA(start_layers=1, num_heldout=3000, train_fraction=0.05, seed=2)
    assert task.num_questions == 800_000 and len(task.heldout_questions) == 3000
    assert len(task.train_questions) == 40_000 and task.num_train_examples == 400 * 20 + 40_000
    heldout, trained = set(task.heldout_questions.tolist()), set(task.train_questions.tolist())
    assert len(heldout) == 3000 and len(trained) == 40_000 and not heldout & trained
    assert task.is_heldout(task.heldout_questions).all() and not task.is_heldout(task.train_questions).any()
    ev = task.eval_set(3000)
    assert len({tuple(p) for p in ev.prompts}) == 3000 and task.evaluate(ev.prompts, ev.answers) == 1.0
    assert {task.layer_of(p[-2]) for p in ev.prompts} == {0} and {task.layer_of(a[0]) for a in ev.answers} == {3}
    docs = task.documents(0)
    question_prompts = {tuple(docs[task.num_facts + i]["input_ids"][:-1]) for i in range(0, 40_000, 20)}
    assert len(question_prompts) == 2000 and not question_prompts & {tuple(p) for p in ev.prompts}
    with pytest.raises(ValueError, match="only 3000 held-out questions"):
        task.eval_set(3001)
    again = MultiHopQA(start_layers=1, num_heldout=3000, train_fraction=0.05, seed=2)
    assert np.array_equal(again.train_questions, task.train_questions)
    assert np.array_equal(again.eval_set(50).prompts, ev.prompts[:50])
    other = MultiHopQA(start_layers=1, num_heldout=3000, train_fraction=0.05, seed=3)
    assert not np.array_equal(other.heldout_questions, task.heldout_questions)
    # An absolute count: every question that is not held out.
    full = MultiHopQA(start_layers=1, num_heldout=3000, num_train_questions=797_000)
    assert len(np.union1d(full.train_questions, full.heldout_questions)) == 800_000
    for kwargs, match in [(dict(num_train_questions=797_001), "num_train_questions"),
                          (dict(num_train_questions=10, train_fraction=0.1), "not both"),
                          (dict(start_layers=3), "start_layers")]:
        with pytest.raises(ValueError, match=match):
            MultiHopQA(**{"start_layers": 1, "num_heldout": 3000, **kwargs})
    assert make_source("multihop_qa:start_layers=1,num_heldout=3000,train_fraction=0.01").num_train_examples == 16_000


@pytest.mark.parametrize("spec", ["mano:max_len=2,modulus=5", "mano:max_len=1,modulus=5,seed=3,heldout_fraction=0.5"])
def test_mano_eval_expressions_are_never_trained_on(spec):
    """Held out by construction: no evaluation expression occurs in the training stream, of any seed."""
    task = make_source(spec)
    ev = task.eval_set(300)
    held = {p.tobytes() for p in ev.prompts}
    assert all(task.is_heldout(p) for p in ev.prompts)
    for seed in (0, 1):
        trained = {task.train_example(seed, i)[0].tobytes() for i in range(5000)}
        assert not held & trained
    assert len(held) > 10  # a real split: many distinct held-out expressions
    every = [task._generate(random.Random(i), task.max_len)[0] for i in range(2000)]  # unfiltered draws
    share = np.mean([task.is_heldout(p) for p in every])
    assert abs(share - task.heldout_fraction) < 0.1


def test_mano_heldout_split_errors():
    with pytest.raises(ValueError, match="heldout_fraction"):
        Mano(heldout_fraction=1.0)
    with pytest.raises(ValueError, match="too small"):
        Mano(max_len=1, modulus=2, heldout_fraction=1e-9).eval_set(1)


def test_multihop_eval_questions_are_never_trained_on():
    task = make_source("multihop_qa:start_layers=1,num_heldout=3000,train_fraction=0.05")
    trained = {task.document(0, i)["input_ids"][:-1].tobytes() for i in range(task.num_train_examples)}
    ev = task.eval_set(3000)
    assert not {p.tobytes() for p in ev.prompts} & trained


def test_capo_facts_answers_and_capacity_bits():
    task = make_source("capo:num_people=40,num_attributes=3,values_per_attribute=8,seed=1")
    assert task.num_train_examples == 120 and task.vocab_size == 3 + 3 + 24 + 32
    assert len({n.tobytes() for n in task.names}) == 40                       # distinct names
    ev = task.eval_set(120)
    assert task.evaluate(ev.prompts, ev.answers) == 1.0
    for i in (0, 7, 119):
        prompt, answer = task.train_example(5, i)
        assert np.array_equal(prompt, ev.prompts[i]) and task.attribute_of(prompt) == i % 3
        assert answer[0] - task.value_base == (i % 3) * 8 + task.values[i // 3, i % 3]
    assert task.capacity_bits(np.zeros(3)) == pytest.approx(task.total_bits) == pytest.approx(40 * 3 * 3)
    assert task.capacity_bits(np.full(3, np.log(8))) == pytest.approx(0.0)    # chance loss: nothing stored
    assert task.capacity_bits(np.array([0.0, np.log(8), 5.0])) == pytest.approx(40 * 3)  # floored per attribute
    with pytest.raises(ValueError, match="distinct names"):
        make_source("capo:num_people=10,name_tokens=1,name_vocab=4")
    with pytest.raises(ValueError, match="not a Capo fact"):
        task.solve(ev.prompts[0][:-1])
