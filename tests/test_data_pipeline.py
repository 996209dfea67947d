"""grain pipeline: packing invariants, per-process sharding, mixtures, and exact resume (also with workers)."""

import json

import numpy as np
import pytest

from ouro_jax.data import ByteTokenizer, InMemoryDocuments, Mano, MultiHopQA, TokenShards, make_batch_iterator
from ouro_jax.data.prepare import prepare

KEYS = ("input_ids", "targets", "segment_ids", "positions", "loss_mask")


def unique_docs(n, seed=0, max_len=90):
    """Documents whose tokens are globally unique and consecutive within a document."""
    lengths = np.random.default_rng(seed).integers(1, max_len, size=n)
    starts = np.concatenate([[10], 10 + np.cumsum(lengths)[:-1]])
    return [np.arange(s, s + n_, dtype=np.int32) for s, n_ in zip(starts, lengths)]


def take(it, n):
    return [next(it) for _ in range(n)]


def drain(it):
    batches = list(it)
    it.close()
    return batches


def run(sources, n=None, **kw):
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    it = make_batch_iterator(sources, **kw)
    if n is None:
        return drain(it)
    out = take(it, n)
    it.close()
    return out


def check_contract(batch, batch_size, seq_len):
    for k in KEYS:
        assert batch[k].shape == (batch_size, seq_len), k
    assert batch["loss_mask"].dtype == np.float32 and all(batch[k].dtype == np.int32 for k in KEYS[:4])
    ids, seg, pos, tgt, mask = (batch[k] for k in ("input_ids", "segment_ids", "positions", "targets", "loss_mask"))
    for r in range(batch_size):
        real = seg[r] > 0
        n = real.sum()
        assert real[:n].all() and not real[n:].any(), "padding only at the end of a row"
        assert (ids[r, n:] == 0).all() and (pos[r, n:] == 0).all() and (mask[r, n:] == 0).all()
        if n == 0:
            continue  # an empty row pads the last batch of a finite run
        s = seg[r, :n]
        assert s[0] == 1 and set(np.diff(s)) <= {0, 1}, "segments numbered 1, 2, ... in order"
        for sid in np.unique(s):
            assert np.array_equal(pos[r, :n][s == sid], np.arange((s == sid).sum())), "positions restart per segment"
        same = np.zeros(batch["input_ids"].shape[1], bool)
        same[:-1] = (seg[r, 1:] == seg[r, :-1]) & real[:-1]
        assert np.array_equal(tgt[r, :-1][same[:-1]], ids[r, 1:][same[:-1]]), "target = next token, same document"
        assert (tgt[r][~same] == 0).all() and (mask[r][~same] == 0).all(), "no target across documents"
    return ids, seg


def real_tokens(batches):
    return np.concatenate([b["input_ids"][b["segment_ids"] > 0] for b in batches])


def test_concat_packing_loses_and_duplicates_nothing():
    docs = unique_docs(300)
    batches = run(InMemoryDocuments(docs), seq_len=64, batch_size=4, num_epochs=1, seed=5)
    for b in batches:
        check_contract(b, 4, 64)
        assert np.array_equal(b["loss_mask"] > 0, b["targets"] > 0)  # text: every in-document next token counts
    flat = real_tokens(batches)
    assert np.array_equal(np.sort(flat), np.concatenate(docs))  # every token exactly once
    # Rows are the concatenated stream cut every seq_len: every document stays contiguous.
    doc_starts = {int(d[0]) for d in docs}
    breaks = np.flatnonzero(np.diff(flat) != 1) + 1
    assert all(int(flat[i]) in doc_starts for i in breaks)
    assert sum(b["segment_ids"].astype(bool).sum() for b in batches[:-1]) == 64 * 4 * (len(batches) - 1)  # no padding
    # Documents crossing a row end continue in the next row (as segment 1, positions from 0: checked above).
    row_heads = [int(b["input_ids"][r, 0]) for b in batches for r in range(4) if b["segment_ids"][r, 0] > 0]
    assert sum(h not in doc_starts for h in row_heads) > len(row_heads) // 2


def test_first_fit_packs_whole_task_examples_with_loss_on_answers_only():
    task = MultiHopQA(num_layers=4, entities_per_layer=20, num_relations=5, hops=2, num_train_questions=300)
    batches = run(task, seq_len=16, batch_size=8, num_epochs=1, seed=1)
    examples = []
    for b in batches:
        ids, seg = check_contract(b, 8, 16)
        for r in range(8):
            for sid in np.unique(seg[r][seg[r] > 0]):
                cols = np.flatnonzero(seg[r] == sid)
                ex = ids[r, cols]
                assert ex[0] == 1 and ex[-2] == 2, "a whole example: <bos> ... <ans> answer"
                assert np.array_equal(task.solve(ex[:-1]), ex[-1:])
                loss_cols = cols[b["loss_mask"][r, cols] > 0]
                assert loss_cols.tolist() == [cols[-2]], "loss only where the target is the answer"
                assert b["targets"][r, cols[-2]] == ex[-1]
                examples.append(tuple(ex))
    # Every training document (facts + questions) exactly once.
    expected = sorted(tuple(task.document(0, i)["input_ids"]) for i in range(task.num_train_examples))
    assert sorted(examples) == expected


def test_first_fit_splits_only_documents_longer_than_a_row():
    docs = unique_docs(60, max_len=40)
    batches = run(InMemoryDocuments(docs), seq_len=16, batch_size=4, num_epochs=1, packing="first_fit")
    for b in batches:
        check_contract(b, 4, 16)
    assert np.array_equal(np.sort(real_tokens(batches)), np.concatenate(docs))
    for b in batches:  # every segment is a contiguous piece of one document
        for r in range(4):
            for sid in np.unique(b["segment_ids"][r][b["segment_ids"][r] > 0]):
                assert (np.diff(b["input_ids"][r][b["segment_ids"][r] == sid]) == 1).all()


def test_mano_stream_batches():
    task = Mano(max_len=5)
    for b in run(task, 5, seq_len=32, batch_size=8, seed=2):
        ids, seg = check_contract(b, 8, 32)
        assert (b["loss_mask"].sum(1) == np.array([len(np.unique(s[s > 0])) for s in seg])).all()
        answer_pos = np.argwhere(b["loss_mask"] > 0)
        assert (ids[answer_pos[:, 0], answer_pos[:, 1]] == 2).all()  # loss where <ans> predicts the answer
        assert (seg > 0).mean() > 0.6  # first-fit packs rows densely


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shards")
    texts = [f"document number {i}: " + "lorem ipsum " * (i % 17) for i in range(400)]
    (tmp / "corpus.txt").write_text("\n\n".join(texts) + "\n")
    prepare([str(tmp / "corpus.txt")], tmp / "out", max_shard_tokens=3000, progress=False)
    return TokenShards(tmp / "out"), texts


def test_token_shards_pipeline_round_trip(shards):
    src, texts = shards
    assert len(src.paths) > 1 and src.num_documents == 400
    batches = run(src, seq_len=128, batch_size=4, num_epochs=1, shuffle=False)
    expected = np.concatenate([np.append(ByteTokenizer().encode(t), 0) for t in texts])  # <|endoftext|> = 0
    assert np.array_equal(real_tokens(batches), expected)


@pytest.mark.parametrize("source", ["shards", "task"])
def test_two_processes_are_disjoint_and_cover_the_data(source, shards):
    if source == "shards":
        src, kw = shards[0], dict(seq_len=64, batch_size=4)
        every = [tuple(d["input_ids"]) for d in src.documents(0)]
    else:
        src = MultiHopQA(num_layers=4, entities_per_layer=10, num_relations=4, hops=2, num_train_questions=100)
        kw = dict(seq_len=16, batch_size=4)
        every = [tuple(src.document(0, i)["input_ids"]) for i in range(src.num_train_examples)]
    per_process = []
    for p in range(2):
        batches = run(src, num_epochs=1, seed=3, process_index=p, process_count=2, **kw)
        docs = []
        for b in batches:
            check_contract(b, kw["batch_size"], kw["seq_len"])
            for r in range(kw["batch_size"]):
                seg = b["segment_ids"][r]
                docs += [tuple(b["input_ids"][r][seg == s]) for s in np.unique(seg[seg > 0])]
        per_process.append(docs)
    if source == "shards":  # concat may cut documents across rows: compare token multisets
        toks = [np.sort(np.concatenate([np.array(d) for d in docs])) for docs in per_process]
        assert abs(len(toks[0]) - len(toks[1])) < 0.2 * len(toks[0])  # balanced halves
        assert np.array_equal(np.sort(np.concatenate(toks)), np.sort(np.concatenate([np.array(d) for d in every])))
    else:
        assert not set(per_process[0]) & set(per_process[1])
        assert sorted(per_process[0] + per_process[1]) == sorted(every)


def test_shuffle_and_epochs():
    docs = unique_docs(40, max_len=10)
    in_order = run(InMemoryDocuments(docs), seq_len=32, batch_size=2, num_epochs=1, shuffle=False)
    assert np.array_equal(real_tokens(in_order), np.concatenate(docs))
    two_epochs = real_tokens(run(InMemoryDocuments(docs), seq_len=32, batch_size=2, num_epochs=2, seed=0))
    n = sum(len(d) for d in docs)
    first, second = two_epochs[:n], two_epochs[n:]
    assert np.array_equal(np.sort(first), np.sort(second)) and not np.array_equal(first, second)
    assert not np.array_equal(first, real_tokens(in_order))


def test_mixture_weights_and_determinism():
    a = InMemoryDocuments([np.full(4, 5, np.int32)] * 50)
    b = InMemoryDocuments([np.full(4, 7, np.int32)] * 50)
    batches = run([a, b], 10, seq_len=16, batch_size=8, weights=[3, 1])
    toks = real_tokens(batches)
    assert (toks == 5).mean() == pytest.approx(0.75, abs=0.03)
    again = run([a, b], 10, seq_len=16, batch_size=8, weights=[3, 1], prefetch=0, read_threads=2)
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(batches, again) for k in KEYS)


def assert_same(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        for k in KEYS:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize("kind", ["concat", "first_fit_mixture"])
def test_resume_gives_identical_batches(kind):
    if kind == "concat":
        sources, kw = InMemoryDocuments(unique_docs(50)), dict(seq_len=64, batch_size=4)  # crosses an epoch
    else:
        sources = [Mano(max_len=6), InMemoryDocuments(unique_docs(30, max_len=30))]
        kw = dict(seq_len=32, batch_size=4, weights=[2, 1], packing="first_fit")
    it = make_batch_iterator(sources, process_index=0, process_count=1, seed=11, **kw)
    take(it, 5)
    state = json.loads(json.dumps(it.get_state()))  # the state is JSON (what orbax writes)
    if kind == "concat":
        assert state["token"] > 0  # resumes in the middle of a document
    expected = take(it, 8)
    it.close()
    fresh = make_batch_iterator(sources, process_index=0, process_count=1, seed=11, **kw)
    fresh.set_state(state)
    assert_same(take(fresh, 8), expected)
    fresh.close()


@pytest.mark.slow  # grain worker processes (make test-all); test_resume_gives_identical_batches is the default's
def test_resume_with_workers_through_orbax(tmp_path):
    import grain.checkpoint
    import orbax.checkpoint as ocp

    sources = [Mano(max_len=6), InMemoryDocuments(unique_docs(80))]
    kw = dict(seq_len=32, batch_size=4, weights=[1, 1], num_workers=2, process_index=0, process_count=1, seed=4)
    it = make_batch_iterator(sources, **kw)
    take(it, 3)
    manager = ocp.CheckpointManager(tmp_path / "ckpt")
    manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    expected = take(it, 4)  # the uninterrupted run continues
    it.close()
    fresh = make_batch_iterator(sources, **kw)
    manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert_same(take(fresh, 4), expected)
    fresh.close()
    manager.close()


def test_pipeline_errors():
    task = Mano(max_len=10)
    docs = InMemoryDocuments(unique_docs(5))
    common = dict(batch_size=2, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="shorter than the longest example"):
        make_batch_iterator(task, seq_len=16, **common)
    with pytest.raises(ValueError, match="would split task examples"):
        make_batch_iterator(task, seq_len=64, packing="concat", **common)
    with pytest.raises(ValueError, match="weights must be 2"):
        make_batch_iterator([task, docs], seq_len=64, weights=[1], **common)
    with pytest.raises(ValueError, match="needs a finite source"):
        make_batch_iterator(task, seq_len=64, num_epochs=1, **common)
    with pytest.raises(ValueError, match="process_index"):
        make_batch_iterator(docs, seq_len=64, batch_size=2, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="neither a prepared directory nor a task"):
        make_batch_iterator("no/such/dir", seq_len=64, **common)
    with pytest.raises(ValueError, match="one weight per token"):
        InMemoryDocuments([np.arange(3)], [np.ones(2)])


def test_chat_documents_carry_loss_on_assistant_tokens_only():
    from ouro_jax.data import encode_chat

    tok = ByteTokenizer()
    chats = [[{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": f"answer {i}."}]
             for i in range(20)]
    ids, masks = zip(*[encode_chat(tok, chat) for chat in chats])
    source = InMemoryDocuments(ids, masks, keep_whole=True)
    batches = run(source, seq_len=128, batch_size=2, num_epochs=1, shuffle=False)
    learned = "".join(tok.decode(b["targets"][b["loss_mask"] > 0]) for b in batches)
    assert learned == "".join(f"answer {i}.<|im_end|>" for i in range(20))


def test_chat_shards_carry_the_mask_through_packing_and_resume(tmp_path):
    from helpers import CHATS, assistant_texts, write_chats

    prepare([str(write_chats(tmp_path / "chats.jsonl"))], tmp_path / "sft", chat=True, progress=False)
    source, tok = TokenShards(tmp_path / "sft"), ByteTokenizer()
    batches = run(source, seq_len=128, batch_size=2, num_epochs=1, shuffle=False, seed=3)  # auto: first_fit
    learned = []
    for b in batches:
        ids, seg = check_contract(b, 2, 128)
        for r in range(2):
            for sid in np.unique(seg[r][seg[r] > 0]):  # each chat whole in one row: its answers in order
                learned.append(tok.decode(b["targets"][r][(seg[r] == sid) & (b["loss_mask"][r] > 0)]))
    assert learned == [assistant_texts(c) for c in CHATS if any(m["role"] == "assistant" for m in c)]
    options = dict(seq_len=48, batch_size=2, seed=4, process_index=0, process_count=1, prefetch=0)
    it = make_batch_iterator(source, packing="concat", **options)  # chats split across rows keep their mask
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 6)
    fresh = make_batch_iterator(source, packing="concat", **options)
    fresh.set_state(state)
    assert_same(take(fresh, 6), expected)
    assert any((b["loss_mask"] == 0).any() and (b["loss_mask"] > 0).any() for b in expected)
    it.close()
    fresh.close()
