"""Token shards streamed from an object store (the `gcs_bucket` fixture): two processes read disjoint shards
that together cover the corpus, local disk stays within two windows of shards, the stream resumes exactly
from its iterator state, and a corrupted shard is refused when it is read."""

import json
import os
import subprocess
import textwrap

import numpy as np
import pytest
from helpers import PYTHON, REPO, subprocess_env

from ouro_jax import paths
from ouro_jax.data import TokenShards, make_batch_iterator
from ouro_jax.data.prepare import prepare
from ouro_jax.data.streaming import ShardCache, ShardFile, StreamedDocuments
from ouro_jax.errors import ShardCorruptError

TEXTS = [f"document number {i}: " + "lorem ipsum " * (i % 13) for i in range(240)]
READER = textwrap.dedent("""
    import json, sys
    import numpy as np
    from ouro_jax.data import TokenShards, make_batch_iterator
    from ouro_jax.data import streaming

    fetched, peak = [], [0]
    download = streaming.ShardCache._download
    def spy(cache, key):
        reader = download(cache, key)
        fetched.append(cache.shards[key].path)
        peak[0] = max(peak[0], cache.peak_bytes)
        return reader
    streaming.ShardCache._download = spy
    src = TokenShards(sys.argv[1])
    batches = list(make_batch_iterator(src, seq_len=64, batch_size=2, num_epochs=1, seed=5,
                                       process_index=int(sys.argv[2]), process_count=2, prefetch=1))
    tokens = np.concatenate([b["input_ids"][b["segment_ids"] > 0] for b in batches])
    print(json.dumps({"tokens": np.bincount(tokens, minlength=259).tolist(), "fetched": fetched, "peak": peak[0]}))
""")


@pytest.fixture(scope="module")
def remote_shards(gcs_bucket, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("corpus")
    (tmp / "corpus.txt").write_text("\n\n".join(TEXTS) + "\n")
    data = f"{gcs_bucket}/streamed"
    prepare([str(tmp / "corpus.txt")], data, max_shard_tokens=1500, progress=False)
    return data


@pytest.mark.subprocess
def test_two_processes_stream_disjoint_shards_with_a_bounded_cache(remote_shards):
    src = TokenShards(remote_shards)
    assert src.streamed and len(src.paths) >= 8
    shard_bytes = max(s["bytes"] for s in src.manifest["shards"])
    procs = [subprocess.Popen([PYTHON, "-c", READER, remote_shards, str(p)], cwd=REPO, env=subprocess_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    fetched = [set(r["fetched"]) for r in results]
    assert fetched[0] == set(src.paths[0::2]) and fetched[1] == set(src.paths[1::2])  # its own shards, once each
    assert all(len(r["fetched"]) == len(f) for r, f in zip(results, fetched))
    assert all(0 < r["peak"] <= 2 * src.stream_window * shard_bytes for r in results)
    counts = np.sum([r["tokens"] for r in results], axis=0)
    local = TokenShards(_download(remote_shards, src))
    expected = np.bincount(np.concatenate([d["input_ids"] for d in local.documents(0)]), minlength=259)
    assert np.array_equal(counts, expected)  # every token of the corpus, exactly once
    assert not [p for p in os.listdir(paths.cache_dir()) if p.startswith("streamed-")]  # removed at exit


def _download(remote, src):
    local = paths.cache_dir() / "local-copy"
    paths.copy_tree(remote, local)
    return local


def test_stream_keeps_at_most_two_windows_and_resumes_exactly(remote_shards):
    src = TokenShards(remote_shards)
    options = dict(seq_len=32, batch_size=2, seed=1, process_index=0, process_count=1, prefetch=0)
    straight = make_batch_iterator(src, **options)
    expected = [next(straight) for _ in range(30)]
    resumed = make_batch_iterator(src, **options)
    for _ in range(12):
        next(resumed)
    state = json.loads(json.dumps(resumed.get_state()))
    again = make_batch_iterator(src, **options)
    again.set_state(state)
    for want in expected[12:]:
        got = next(again)
        assert all(np.array_equal(got[k], want[k]) for k in want)

    files = [ShardFile(p, s["sha256"], s["documents"], s["bytes"]) for p, s in zip(src.paths, src.manifest["shards"])]
    docs = StreamedDocuments(files, seed=0, shuffle=True, num_epochs=2, window=2)
    on_disk = []
    for i in range(len(docs)):
        docs[i]
        on_disk.append(len(os.listdir(docs.cache.directory)))
    assert max(on_disk) <= 4 and len(docs.cache.downloaded) >= 2 * len(files)  # both epochs streamed
    docs.cache.close()


def test_corrupt_remote_shard_is_refused_when_read(gcs_bucket, tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo\n" * 20)
    data = paths.as_path(gcs_bucket) / "corrupt-stream"
    prepare([str(tmp_path / "a.txt")], data, progress=False)
    shard = data / "shard-00000.array_record"
    raw = bytearray(shard.read_bytes())
    raw[40] ^= 0x01
    shard.write_bytes(bytes(raw))
    with pytest.raises(ShardCorruptError, match="shard-00000.array_record: does not match the SHA-256"):
        next(make_batch_iterator(TokenShards(data), seq_len=16, batch_size=2, process_index=0, process_count=1,
                                 prefetch=0))
    files = [ShardFile(str(shard), "0" * 64, 1, 1)]
    with pytest.raises(ValueError, match="cannot be streamed by 2 processes"):
        TokenShards(data).stream(0, process_index=0, process_count=2, shuffle=True, num_epochs=None)
    ShardCache(files).close()


def test_chat_shards_stream_with_their_mask(gcs_bucket, tmp_path):
    from helpers import CHATS, assistant_texts, write_chats

    from ouro_jax.data import ByteTokenizer

    data = f"{gcs_bucket}/chats"
    prepare([str(write_chats(tmp_path / "chats.jsonl"))], data, chat=True, max_shard_tokens=200, progress=False)
    tok, learned = ByteTokenizer(), []
    for p in range(2):  # each process streams its own shards; the masks arrive with the tokens
        src = TokenShards(data)
        assert src.streamed and src.target_mask
        for b in make_batch_iterator(src, seq_len=128, batch_size=2, num_epochs=1, seed=2, process_index=p,
                                     process_count=2, prefetch=0):
            seg = b["segment_ids"]
            for r, start in zip(*np.nonzero(np.diff(seg, prepend=0, axis=1) > 0)):  # each chat, whole in its row
                chat = seg[r] == seg[r, start]
                learned.append(tok.decode(b["targets"][r][chat & (b["loss_mask"][r] > 0)]))
    assert sorted(learned) == sorted(assistant_texts(c) for c in CHATS if any(m["role"] == "assistant" for m in c))
