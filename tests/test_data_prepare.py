"""The preparation CLI: text / JSONL / Parquet -> ArrayRecord shards + manifest; errors; determinism."""

import gzip
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ouro_jax.cli.prepare import main
from ouro_jax.data import ByteTokenizer, HFTokenizer, TokenShards
from ouro_jax.data.prepare import PrepareError, prepare

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT_DOCS = ["First paragraph,\nwith two lines.", "Second: ünïcødé ✓", "Third one."]
JSON_DOCS = ["json doc one", "", "json doc three 🤖", None]  # empty and null documents are skipped
PARQUET_DOCS = [f"parquet row {i} " + "x" * i for i in range(50)]


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.txt").write_text("\n\n".join(TEXT_DOCS) + "\n\n\n")
    with gzip.open(d / "b.jsonl.gz", "wt") as f:
        for i, t in enumerate(JSON_DOCS):
            f.write(json.dumps({"id": i, "text": t}) + "\n")
        f.write("\n")  # blank lines are ignored
    pq.write_table(pa.table({"text": PARQUET_DOCS, "n": list(range(50))}), d / "c.parquet", row_group_size=7)
    return d


def read_back(out):
    src = TokenShards(out)
    src.verify()
    return [d["input_ids"] for d in src.documents(0)], src


def test_prepare_text_jsonl_parquet(corpus, tmp_path):
    manifest = prepare([str(corpus)], tmp_path / "out", max_shard_tokens=500, progress=False)
    expected = TEXT_DOCS + ["json doc one", "json doc three 🤖"] + PARQUET_DOCS
    tok = ByteTokenizer()
    docs, src = read_back(tmp_path / "out")
    assert len(docs) == len(expected) == manifest["documents"]
    for ids, text in zip(docs, expected):  # inputs in sorted order, documents in file order
        assert ids[-1] == 0 and tok.decode(ids[:-1]) == text
    assert manifest["tokens"] == sum(len(d) for d in docs) == src.num_tokens
    assert manifest["skipped_empty"] == 2 and len(manifest["shards"]) > 1
    assert [i["format"] for i in manifest["inputs"]] == ["text", "jsonl", "parquet"]
    assert [i["documents"] for i in manifest["inputs"]] == [3, 2, 50]
    for i in manifest["inputs"]:
        assert i["sha256"] == hashlib.sha256(open(i["path"], "rb").read()).hexdigest()
    assert manifest["tokenizer"] == {"kind": "byte", "vocab_size": 259} and manifest["token_dtype"] == "<u2"
    assert manifest == json.loads((tmp_path / "out" / "manifest.json").read_text())


def test_rerun_is_byte_identical(corpus, tmp_path):
    a = prepare([str(corpus)], tmp_path / "a", max_shard_tokens=400, progress=False)
    b = prepare([str(corpus)], tmp_path / "b", max_shard_tokens=400, progress=False)
    assert a == b
    for shard in a["shards"]:
        assert (tmp_path / "a" / shard["path"]).read_bytes() == (tmp_path / "b" / shard["path"]).read_bytes()
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()


def test_text_split_modes(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("l1\nl2\n\nl3\n")
    counts = {}
    for mode in ("paragraph", "line", "file"):
        counts[mode] = prepare([str(f)], tmp_path / mode, text_split=mode, progress=False)["documents"]
    assert counts == {"paragraph": 2, "line": 3, "file": 1}
    docs, _ = read_back(tmp_path / "file")
    assert ByteTokenizer().decode(docs[0][:-1]) == "l1\nl2\n\nl3\n"


def test_hf_tokenizer_and_no_eos(corpus, tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(PARQUET_DOCS + TEXT_DOCS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.save(str(tmp_path / "tokenizer.json"))
    m = prepare([str(corpus / "c.parquet")], tmp_path / "out", tokenizer=str(tmp_path), append_eos=False,
                progress=False)
    hf = HFTokenizer(tmp_path)
    assert m["tokenizer"]["kind"] == "hf" and m["tokenizer"]["sha256"] == hf.sha256 and m["eos_id"] is None
    docs, _ = read_back(tmp_path / "out")
    assert [hf.decode(d) for d in docs] == PARQUET_DOCS


@pytest.mark.subprocess
def test_cli_progress_and_manifest(corpus, tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "ouro_jax.cli.prepare", str(corpus / "a.txt"), str(corpus / "c.parquet"),
                        "--output", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "wrote 53 documents" in r.stdout
    assert "100%" in r.stderr and "B/s" in r.stderr  # the progress bar, on stderr
    assert json.loads((out / "manifest.json").read_text())["documents"] == 53
    r = subprocess.run([sys.executable, "-m", "ouro_jax.cli.prepare", str(corpus / "a.txt"), "--output", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "already holds prepared shards" in r.stderr and "Traceback" not in r.stderr


def write(path, data: bytes):
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("name,data,message", [
    ("bad.txt", b"fine line\nbad \xff byte\n", r"bad.txt:2: invalid UTF-8 at byte 4"),
    ("bad.jsonl", b'{"text": "ok"}\n{"text": oops}\n', r"bad.jsonl:2: invalid JSON"),
    ("field.jsonl", b'{"body": "x"}\n', r"field.jsonl:1: no field 'text' \(found \['body'\]\)"),
    ("type.jsonl", b'{"text": 5}\n', r"type.jsonl:1: field 'text' is int, not a string"),
    ("fake.parquet", b"this is not parquet", r"fake.parquet: not a readable Parquet file"),
    ("trunc.jsonl.gz", gzip.compress(b'{"text": "x"}\n' * 100, mtime=0)[:40], r"trunc.jsonl.gz: cannot read"),
    ("data.csv", b"a,b\n", r"data.csv: unknown input type"),
])
def test_unreadable_inputs_give_clear_errors(tmp_path, name, data, message):
    path = write(tmp_path / name, data)
    with pytest.raises(PrepareError, match=message):
        prepare([path], tmp_path / "out", progress=False)
    assert not any((tmp_path / "out").glob("*"))  # nothing half-written


def test_more_errors(tmp_path, capsys):
    pq.write_table(pa.table({"content": ["a"]}), tmp_path / "c.parquet")
    with pytest.raises(PrepareError, match=r"no column 'text' \(columns: \['content'\]\)"):
        prepare([str(tmp_path / "c.parquet")], tmp_path / "out", progress=False)
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "n.parquet")
    with pytest.raises(PrepareError, match="has type int64, not string"):
        prepare([str(tmp_path / "n.parquet")], tmp_path / "out", progress=False)
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "missing.txt"), "--output", str(tmp_path / "o"), "--no-progress"])
    assert exit_.value.code == 2
    assert "missing.txt: no such file or directory" in capsys.readouterr().err
    good = write(tmp_path / "g.txt", b"hello\n")
    prepare([good], tmp_path / "ok", progress=False)
    with pytest.raises(PrepareError, match="already holds prepared shards"):
        prepare([good], tmp_path / "ok", progress=False)
    prepare([good], tmp_path / "ok", progress=False, overwrite=True)
    shard = tmp_path / "ok" / "shard-00000.array_record"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match the SHA-256"):
        TokenShards(tmp_path / "ok").verify()
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        TokenShards(tmp_path)


# ---- chats (--chat): the tokenizer's chat template and the assistant-only target mask -------------------

def test_chat_prepare_masks_exactly_the_assistant_turns(tmp_path):
    from helpers import CHATS, assistant_texts, write_chats

    from ouro_jax.data.chatml import render_chatml

    manifest = prepare([str(write_chats(tmp_path / "chats.jsonl"))], tmp_path / "sft", chat=True,
                       max_shard_tokens=300, progress=False)
    assert manifest["version"] == 2 and manifest["target_mask"] and manifest["chat"]["template"] == "ChatML"
    assert manifest["documents"] == len(CHATS) - 1 and manifest["skipped_empty"] == 1 and not manifest["append_eos"]
    src = TokenShards(tmp_path / "sft")
    assert src.target_mask and len(src.paths) > 1
    tok = ByteTokenizer()
    docs = list(src.documents(0))
    kept = [c for c in CHATS if any(m["role"] == "assistant" for m in c)]
    for doc, chat in zip(docs, kept):
        ids, mask = doc["input_ids"], doc["target_weight"]
        assert tok.decode(ids) == render_chatml(chat)  # the whole chat, as the template renders it
        assert set(mask.tolist()) == {0, 1} and tok.decode(ids[mask > 0]) == assistant_texts(chat)
    assert manifest["tokens"] == sum(len(d["input_ids"]) for d in docs)
    from ouro_jax.data.shards import ShardWriter

    records = []
    for name, mask in (("a", [0, 1, 1]), ("b", [0, 0, 1])):  # the same tokens, another mask
        writer = ShardWriter(tmp_path / name, np.dtype("<u2"), 100)
        (tmp_path / name).mkdir()
        writer.write(np.array([5, 6, 7]), np.array(mask))
        records.append(writer.close()[0])
    assert records[0]["sha256"] != records[1]["sha256"]  # the manifest's checksum covers the mask


def test_token_only_shards_of_version_1_still_load(tmp_path):
    path = write(tmp_path / "t.txt", b"one\n\ntwo\n")
    prepare([path], tmp_path / "v1", progress=False)
    manifest_path = tmp_path / "v1" / "manifest.json"
    old = json.loads(manifest_path.read_text())
    del old["target_mask"], old["chat"]
    old["version"] = 1  # what earlier builds wrote
    manifest_path.write_text(json.dumps(old))
    src = TokenShards(tmp_path / "v1")
    docs = list(src.documents(0))
    assert not src.target_mask and [ByteTokenizer().decode(d["input_ids"]) for d in docs] == [
        "one<|endoftext|>", "two<|endoftext|>"]
    assert all((d["target_weight"] == 1).all() for d in docs)
    old["version"] = 3
    manifest_path.write_text(json.dumps(old))
    with pytest.raises(ValueError, match="version 1 or 2, got 'ouro_jax.token_shards' version 3"):
        TokenShards(tmp_path / "v1")


def _bpe_with_chat_template(directory):
    """A byte-level BPE tokenizer.json whose directory has a thinking chat template (helpers.THINKING_TEMPLATE)."""
    from helpers import CHATS, with_chat_template
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    texts = [m["content"] for c in CHATS for m in c] * 3
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    return with_chat_template(directory)


def test_chat_prepare_with_the_tokenizers_chat_template(tmp_path, capsys):
    from helpers import CHATS, assistant_texts, write_chats

    from ouro_jax.data.chat_template import render_chat

    model = _bpe_with_chat_template(tmp_path / "model")
    chats = write_chats(tmp_path / "chats.jsonl")
    assert main([str(chats), "--chat", "--no-enable-thinking", "--output", str(tmp_path / "sft"),
                 "--tokenizer", str(model), "--no-progress"]) == 0
    assert f"wrote {len(CHATS) - 1} chats" in capsys.readouterr().out
    src = TokenShards(tmp_path / "sft")
    assert src.manifest["chat"] == {"template": str(model), "enable_thinking": False}
    hf = HFTokenizer(model)
    kept = [c for c in CHATS if any(m["role"] == "assistant" for m in c)]
    for doc, chat in zip(src.documents(0), kept):
        ids, mask = doc["input_ids"], doc["target_weight"]
        text = render_chat(chat, model, add_generation_prompt=False, enable_thinking=False)
        assert ids.tolist() == hf.encode(text, allow_special=True).tolist()  # tokenized as generation does
        assert hf.decode(ids[mask > 0]) == assistant_texts(chat, strip_thinking=True)  # the template drops thinking
    assert len(hf.encode("Hello there!")) < len("Hello there!")  # real merges, not one token per byte
    assert main([str(chats), "--chat", "--enable-thinking", "--output", str(tmp_path / "think"),
                 "--tokenizer", str(model), "--no-progress"]) == 0
    assert TokenShards(tmp_path / "think").manifest["chat"]["enable_thinking"] is True
    with pytest.raises(PrepareError, match="enable_thinking needs a chat template"):  # ChatML has no switch
        prepare([str(chats)], tmp_path / "byte", chat=True, enable_thinking=True, progress=False)
    with pytest.raises(PrepareError, match="enable_thinking applies to chats only"):
        prepare([str(chats)], tmp_path / "text", enable_thinking=True, progress=False)


@pytest.mark.parametrize("line,message", [
    ('{"messages": [{"role": "user", "content": "x"}, oops]}', r"chats.jsonl:2: invalid JSON"),
    ('{"text": "not a chat"}', r"""chats.jsonl:2: expected \{"messages": \[...\]\} \(found \['text'\]\)"""),
    ('{"messages": "hi"}', r"""chats.jsonl:2: expected \{"messages": \[...\]\} \(found \['messages'\]\)"""),
    ('[1, 2]', r"""chats.jsonl:2: expected \{"messages": \[...\]\} \(found list\)"""),
    ('{"messages": []}', r"chats.jsonl:2: a chat needs at least one message"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', r"chats.jsonl:2: message 0: unknown role 'robot'"),
    ('{"messages": [{"role": "user", "content": 5}]}', r"chats.jsonl:2: message 0: content must be a string"),
    ('{"messages": [{"role": "user"}]}', r"chats.jsonl:2: message 0 must be a mapping with exactly"),
    ('{"messages": [{"role": "assistant", "content": "hi"}]}', r"chats.jsonl:2: message 0: an assistant message "
                                                               "needs a prompt before it"),
])
def test_bad_chat_lines_are_refused_with_one_line(tmp_path, capsys, line, message):
    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    path = write(tmp_path / "chats.jsonl", (good + "\n" + line + "\n").encode())
    with pytest.raises(SystemExit) as exit_:
        main([path, "--chat", "--output", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*"))  # nothing written
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": ["a"]}), parquet)
    with pytest.raises(PrepareError, match="--chat reads chat JSONL"):
        prepare([str(parquet)], tmp_path / "p", chat=True, progress=False)


def test_a_chat_the_template_refuses_names_its_line(tmp_path, capsys):
    from helpers import write_char_tokenizer

    write_char_tokenizer(tmp_path / "model")
    config_path = tmp_path / "model" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system "
                               "role') }}{% endif %}{{ m['content'] + '<|im_end|>' }}{% endfor %}")
    config_path.write_text(json.dumps(config))
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    path = write(tmp_path / "c.jsonl", (json.dumps({"messages": chat}) + "\n" +
                                        json.dumps({"messages": [{"role": "system", "content": "s"}] + chat})).encode())
    with pytest.raises(SystemExit):
        main([path, "--chat", "--tokenizer", str(tmp_path / "model"), "--output", str(tmp_path / "o"), "--no-progress"])
    assert capsys.readouterr().err.strip().endswith("c.jsonl:2: chat template: no system role")
