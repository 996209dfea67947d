"""Tokenize plain text, JSONL and Parquet files into ArrayRecord shards (see `shards.py`).

    ouro-prepare corpus/ extra.jsonl.gz --output /data/tok --tokenizer /models/Ouro-1.4B

Inputs are files or directories (searched recursively, sorted). Formats by extension: `.txt`,
`.md` (plain text), `.jsonl`, `.ndjson` (one JSON object per line), `.parquet`; `.gz` for text
and JSONL. Plain text splits into documents at blank lines (`--text-split paragraph`, default),
at every line, or not at all (`file`); JSONL and Parquet take the string field `--text-field`.
Each document gets `<|endoftext|>` appended (unless `--no-eos`); empty or null JSONL/Parquet
records are skipped and counted. The manifest records counts per input and shard, the tokenizer
and SHA-256 hashes. The same inputs and options give byte-identical shards.

Chats for SFT (`--chat`, JSONL only):

    ouro-prepare chats.jsonl --chat --output /data/sft --tokenizer /models/Ouro-1.4B

Each line is `{"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": "..."}, ...]}`
(other keys are ignored). A conversation is rendered by the tokenizer directory's own chat template,
exactly as generation renders prompts (ChatML without one, e.g. for `--tokenizer byte`; `--enable-thinking`
/ `--no-enable-thinking` set the template's thinking switch), and stored with its assistant-only target
mask (`chat_data.py`): the content an assistant writes and its end-of-turn token are learned, system,
user and template tokens are not. Chats without an assistant message are skipped and counted as empty. A
bad line (invalid JSON, no "messages" list, a malformed message, a chat the template cannot render or
mask) stops the run with one error naming FILE:LINE and exit status 2; nothing is written.

Shards are written into a hidden `.NAME.tmp-*` directory beside the output and swapped in at the end,
so `--overwrite` keeps the old dataset until the new one is complete; a killed run leaves only that
hidden directory, which the next run reports as incomplete and removes. Inputs and output may be on an
object store (`gs://`): the shards are then written into a local temporary directory and copied up, the
manifest last (`paths.replace_tree`).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence

import numpy as np

from ouro_jax import paths
from ouro_jax.data import shards as shards_lib
from ouro_jax.data.chat_data import ChatEncoder
from ouro_jax.data.chatml import check_messages
from ouro_jax.data.tokenizer import load_tokenizer
from ouro_jax.errors import OuroError, one_line
from ouro_jax.paths import Path, as_path, is_local

FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "jsonl", ".ndjson": "jsonl",
           ".parquet": "parquet"}
TEXT_SPLITS = ("paragraph", "line", "file")
CHAT_FIELD = "messages"


class PrepareError(OuroError, ValueError):
    """Unreadable or malformed input, or an unusable output directory."""


def input_format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
        if suffixes and FORMATS.get(suffixes[-1]) == "parquet":
            raise PrepareError(f"{path}: gzipped Parquet is not supported (Parquet compresses internally)")
    fmt = FORMATS.get(suffixes[-1]) if suffixes else None
    if fmt is None:
        raise PrepareError(f"{path}: unknown input type; expected one of {sorted(FORMATS)} (optionally .gz)")
    return fmt


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Files as given; directories expanded to their files of known types, recursively and sorted."""
    found = []
    for item in inputs:
        p = as_path(item)
        if p.is_dir():
            known = [f for f in paths.files(p) if _known(f)]
            if not known:
                raise PrepareError(f"{p}: directory holds no files of a known type {sorted(FORMATS)}")
            found.extend(known)
        elif p.exists():
            found.append(p)
        else:
            raise PrepareError(f"{p}: no such file or directory")
    return found


def _known(path: Path) -> bool:
    try:
        input_format(path)
        return True
    except PrepareError:
        return False


class _Input:
    """One input file: yields documents, hashes its bytes, reports bytes read for the progress bar."""

    def __init__(self, path: Path, text_field: str, text_split: str):
        self.path, self.text_field, self.text_split = path, text_field, text_split
        self.format = input_format(path)
        self.size = path.stat().length
        self.bytes_done = 0
        self.documents = self.tokens = self.skipped_empty = 0

    def _lines(self) -> Iterator[tuple[int, str]]:
        with self.path.open("rb") as raw_file:
            f = gzip.GzipFile(fileobj=raw_file) if self.path.suffix.lower() == ".gz" else raw_file
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise PrepareError(f"{self.path}:{lineno}: invalid UTF-8 at byte {e.start} of the line "
                                       f"({e.reason})") from None
                self.bytes_done = raw_file.tell()
                yield lineno, line

    @contextlib.contextmanager
    def _reading(self):
        """Read failures of this file as one PrepareError naming it."""
        try:
            yield
        except (OSError, EOFError) as e:
            if isinstance(e, PermissionError):
                raise PrepareError(f"{self.path}: permission denied") from None
            raise PrepareError(f"{self.path}: cannot read ({e})") from None

    def documents_iter(self) -> Iterator[str]:
        with self._reading():
            yield from {"text": self._text, "jsonl": self._jsonl, "parquet": self._parquet}[self.format]()

    def _text(self) -> Iterator[str]:
        """Documents of a plain-text file; blank lines separate, they are never documents themselves."""
        if self.text_split == "line":
            for _, line in self._lines():
                if line.strip():
                    yield line.rstrip("\r\n")
            return
        paragraph: list[str] = []
        for _, line in self._lines():
            if self.text_split == "paragraph" and not line.strip():
                if paragraph:
                    yield "".join(paragraph).rstrip("\r\n")
                paragraph = []
            else:
                paragraph.append(line)
        if paragraph:
            yield "".join(paragraph).rstrip("\r\n") if self.text_split == "paragraph" else "".join(paragraph)

    def _records(self) -> Iterator[tuple[int, object]]:
        """(line number, parsed JSON) of every non-blank line of a JSONL file."""
        for lineno, line in self._lines():
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise PrepareError(f"{self.path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None

    def chats(self, encode) -> Iterator[tuple[np.ndarray, np.ndarray] | None]:
        """`encode(messages)` of each line of a chat JSONL file (None: a chat without an assistant message)."""
        if self.format != "jsonl":
            raise PrepareError(f"{self.path}: --chat reads chat JSONL (one {{\"messages\": [...]}} per line), "
                               f"not {self.format}")
        with self._reading():
            for lineno, record in self._records():
                if not isinstance(record, dict) or not isinstance(record.get(CHAT_FIELD), list):
                    found = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise PrepareError(f"{self.path}:{lineno}: expected {{\"{CHAT_FIELD}\": [...]}} (found {found})")
                messages = record[CHAT_FIELD]
                try:
                    check_messages(messages)
                    yield encode(messages) if any(m["role"] == "assistant" for m in messages) else None
                except ValueError as e:
                    raise PrepareError(f"{self.path}:{lineno}: {one_line(e)}") from None

    def _jsonl(self) -> Iterator[str]:
        for lineno, record in self._records():
            if not isinstance(record, dict) or self.text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise PrepareError(f"{self.path}:{lineno}: no field {self.text_field!r} (found {keys}); "
                                   "choose the field with --text-field")
            text = record[self.text_field]
            if text is None:
                yield ""
            elif not isinstance(text, str):
                raise PrepareError(f"{self.path}:{lineno}: field {self.text_field!r} is "
                                   f"{type(text).__name__}, not a string")
            else:
                yield text

    def _parquet(self) -> Iterator[str]:
        with self.path.open("rb") as f:  # a file object: local or an object store
            yield from self._parquet_rows(f)

    def _parquet_rows(self, f) -> Iterator[str]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowException, OSError) as e:
            raise PrepareError(f"{self.path}: not a readable Parquet file ({e})") from None
        names = pf.schema_arrow.names
        if self.text_field not in names:
            raise PrepareError(f"{self.path}: no column {self.text_field!r} (columns: {names}); "
                               "choose the column with --text-field")
        kind = pf.schema_arrow.field(self.text_field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise PrepareError(f"{self.path}: column {self.text_field!r} has type {kind}, not string")
        rows, done = max(pf.metadata.num_rows, 1), 0
        try:
            for batch in pf.iter_batches(batch_size=1024, columns=[self.text_field]):
                for text in batch.column(0).to_pylist():
                    yield text or ""
                done += batch.num_rows
                self.bytes_done = self.size * done // rows
        except pa.ArrowException as e:
            raise PrepareError(f"{self.path}: corrupt Parquet data ({e})") from None

    def record(self) -> dict:
        return {"path": str(self.path), "format": self.format, "bytes": self.size,
                "sha256": shards_lib.file_sha256(self.path), "documents": self.documents, "tokens": self.tokens,
                "skipped_empty": self.skipped_empty}


def read_documents(path: str | os.PathLike, text_field: str = "text", text_split: str = "paragraph") -> Iterator[str]:
    """The documents of one input file (text, JSONL or Parquet, optionally gzipped); PrepareError names
    the file (and line) of anything unreadable."""
    return _Input(as_path(path), text_field, text_split).documents_iter()


def _ours(path: Path) -> bool:
    return path.name == shards_lib.MANIFEST or path.suffix == ".array_record"


def _check_output(output: Path, overwrite: bool, sources: Sequence[Path]) -> None:
    """Refuses an output that is a file, or holds shards without --overwrite; removes leftovers of killed runs."""
    if output.exists() and not output.is_dir():
        raise PrepareError(f"output {output} exists and is not a directory")
    # the old shards are replaced below; files of other kinds are kept
    paths.check_output(output, kind="prepared shards", marker=shards_lib.MANIFEST, sources=sources, overwrite=True,
                       other_files=True)
    paths.remove_leftovers(output, shards_lib.MANIFEST, "prepare")
    ours = [p for p in output.iterdir() if _ours(p)] if output.is_dir() else []
    if ours and not overwrite:
        complete = (output / shards_lib.MANIFEST).is_file()
        what = "prepared shards" if complete else f"shards without a {shards_lib.MANIFEST} (an incomplete prepare)"
        raise PrepareError(f"output {output} already holds {what}; pass --overwrite to replace them")


def _publish(tmp: Path, output: Path) -> None:
    """Swaps the finished `tmp` in as `output`; files of the old output that are not shards stay (moved
    locally, copied on an object store, where the old output must stay whole until it is replaced)."""
    if paths.exists(output):
        for p in output.iterdir():
            if _ours(p):
                continue
            if is_local(output):
                p.rename(tmp / p.name)
            else:
                paths.copy_tree(p, tmp / p.name)
    paths.replace_tree(tmp, output, shards_lib.MANIFEST)


def prepare(inputs: Sequence[str], output: str | os.PathLike, *, tokenizer: str = "byte",
            text_field: str = "text", text_split: str = "paragraph", append_eos: bool = True,
            max_shard_tokens: int = 1 << 27, batch_docs: int = 1024, progress: bool = True,
            overwrite: bool = False, chat: bool = False, enable_thinking: bool | None = None) -> dict:
    """Tokenizes `inputs` into shards under `output`; returns the manifest (also written as JSON).

    chat: the inputs are chat JSONL, rendered by the tokenizer's chat template (`chat_data.ChatEncoder`,
    `enable_thinking` passed to it) and stored with their assistant-only target mask; no `<|endoftext|>`
    is appended (a chat ends with the template's end-of-turn token)."""
    if text_split not in TEXT_SPLITS:
        raise PrepareError(f"text_split must be one of {TEXT_SPLITS}, got {text_split!r}")
    if max_shard_tokens < 1 or batch_docs < 1:
        raise PrepareError("max_shard_tokens and batch_docs must be >= 1")
    if enable_thinking is not None and not chat:
        raise PrepareError("enable_thinking applies to chats only (--chat)")
    files = expand_inputs(inputs)
    tok = load_tokenizer(tokenizer)
    append_eos = append_eos and not chat
    if append_eos and tok.eos_id is None:
        raise PrepareError("the tokenizer has no <|endoftext|> token; pass --no-eos to store documents without one")
    encoder = _chat_encoder(tok, enable_thinking) if chat else None
    sources = [_Input(f, text_field, text_split) for f in files]
    output = as_path(output)
    paths.check_bucket(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    _check_output(output, overwrite, files)
    # ArrayRecord writes local files: beside a local output, in a local temporary directory for a remote one
    tmp = paths.make_temp_dir(output.parent if is_local(output) else tempfile.gettempdir(), f".{output.name}.tmp-")
    try:
        try:
            manifest = _tokenize(sources, tok, tmp, dict(text_split=text_split, text_field=text_field,
                                 append_eos=append_eos, max_shard_tokens=max_shard_tokens, batch_docs=batch_docs,
                                 progress=progress), encoder)
        except RuntimeError as e:  # ArrayRecord reports failed writes (a full disk) as RuntimeError
            raise OSError(f"{output}: writing the shards failed ({one_line(e).split('; ')[0]})") from None
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        _publish(tmp, output)
    except BaseException:  # KeyboardInterrupt too: the old output stays as it was
        tmp.rmtree(missing_ok=True)
        raise
    return manifest


def _chat_encoder(tok, enable_thinking: bool | None) -> ChatEncoder:
    """The chat encoder of the tokenizer's own directory (its chat template; ChatML for the byte tokenizer)."""
    tokenizer_dir = tok.path.parent if hasattr(tok, "path") else None
    try:
        return ChatEncoder(tok, tokenizer_dir, enable_thinking=enable_thinking)
    except ValueError as e:
        raise PrepareError(one_line(e)) from None


def _tokenize(sources: list[_Input], tok, output: Path, options: dict, encoder: ChatEncoder | None) -> dict:
    """Writes the shards and the manifest of `sources` into `output`; returns the manifest."""
    from tqdm import tqdm

    dtype = shards_lib.token_dtype(tok.vocab_size)
    writer = shards_lib.ShardWriter(output, dtype, options["max_shard_tokens"])
    bar = tqdm(total=sum(s.size for s in sources), unit="B", unit_scale=True, disable=not options["progress"],
               desc="tokenizing", file=sys.stderr)
    try:
        for src in sources:
            bar.set_description(src.path.name)
            base = bar.n

            def advance(src=src, base=base):
                bar.update(base + src.bytes_done - bar.n)
                bar.set_postfix(docs=sum(s.documents for s in sources), tokens=_total_tokens(writer))

            if encoder is None:
                _write_texts(src, tok, writer, options, advance)
            else:
                _write_chats(src, encoder, writer, advance)
            bar.update(base + src.size - bar.n)
        shard_records = writer.close()
    except BaseException:
        writer.close()
        raise
    finally:
        bar.close()
    append_eos = options["append_eos"]
    manifest = {
        "format": shards_lib.FORMAT, "version": shards_lib.VERSION,
        "tokenizer": tok.fingerprint(), "token_dtype": dtype.str,
        "append_eos": append_eos, "eos_id": tok.eos_id if append_eos else None,
        "text_split": options["text_split"], "text_field": options["text_field"],
        "target_mask": encoder is not None,
        "chat": None if encoder is None else {"template": str(encoder.where),
                                              "enable_thinking": encoder.enable_thinking},
        "documents": sum(s.documents for s in sources), "tokens": sum(s.tokens for s in sources),
        "skipped_empty": sum(s.skipped_empty for s in sources),
        "inputs": [s.record() for s in sources], "shards": shard_records,
    }
    (output / shards_lib.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _total_tokens(writer: shards_lib.ShardWriter) -> int:
    return sum(s["tokens"] for s in writer.shards)


def _write_texts(src: _Input, tok, writer: shards_lib.ShardWriter, options: dict, advance) -> None:
    """Tokenizes the documents of `src` in batches of `batch_docs`; empty ones are counted, not written."""
    batch: list[str] = []
    for text in src.documents_iter():
        if not text:
            src.skipped_empty += 1
            continue
        batch.append(text)
        if len(batch) >= options["batch_docs"]:
            _write_batch(tok, batch, src, writer, options["append_eos"])
            batch = []
            advance()
    _write_batch(tok, batch, src, writer, options["append_eos"])


def _write_chats(src: _Input, encoder: ChatEncoder, writer: shards_lib.ShardWriter, advance) -> None:
    """Writes each chat of `src` with its target mask; chats without an assistant message are counted as empty."""
    for i, chat in enumerate(src.chats(encoder)):
        if chat is None:
            src.skipped_empty += 1
            continue
        ids, mask = chat
        writer.write(ids, mask)
        src.documents += 1
        src.tokens += len(ids)
        if i % 1024 == 1023:
            advance()


def _write_batch(tok, texts: list[str], src: _Input, writer: shards_lib.ShardWriter, append_eos: bool) -> None:
    for ids in tok.encode_batch(texts):
        if append_eos:
            ids = np.append(ids, np.int32(tok.eos_id))
        writer.write(ids)
        src.documents += 1
        src.tokens += len(ids)
