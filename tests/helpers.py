"""Helpers shared by the tests: the tiny training config, random batches of the data contract, training
subprocesses, and a char-level HF tokenizer that fits the golden model's 128 ids."""

from __future__ import annotations

import functools
import json
import os
import pathlib
import shutil
import sys

import numpy as np

from ouro_jax import config as model_presets
from ouro_jax.train.config import base_config, model_fields

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LM_EVAL_TASKS = pathlib.Path(__file__).resolve().parent / "lm_eval_task"  # the tiny lm-eval tasks of the tests


# Tests compile many small programs: XLA's backend optimizations would dominate their run time.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
# XLA_FLAGS of the test processes and their subprocesses (conftest): FAST_COMPILE and the classic emitters.
TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
# The session's shared persistent compilation cache (set by conftest), where tiny_train_config's runs cache.
TEST_CACHE_ENV = "OURO_JAX_TEST_COMPILATION_CACHE"


def tiny_train_config(**model_overrides):
    c = base_config()
    c.model = model_fields(model_presets.tiny(vocab_size=64, hidden_size=32, intermediate_size=64,
                                              num_attention_heads=2,
                                              num_key_value_heads=2, total_ut_steps=3, **model_overrides))
    c.data.update(sources="mano:max_len=3", seq_len=16, batch_size=8, eval_examples=16, eval_batch_size=16)
    c.optim.update(peak_lr=1e-2, init_lr=1e-3, warmup_steps=2, decay="cosine", decay_steps=5, end_lr=1e-3)
    c.train.update(steps=20, ce_chunk_size=8, progress_bar=False, log_every=5, checkpoint_every=5,
                   compilation_cache_dir=os.environ.get(TEST_CACHE_ENV, ""), compilation_cache_min_secs=0.0)
    return c


def forward(cfg, params, ids, method=None, **kwargs):
    """`Ouro(cfg).apply` (or one of its methods) as one compiled program: op-by-op dispatch would dominate
    the tests' time. Integer keyword arguments are static."""
    import jax

    from ouro_jax.model import Ouro

    static = {k: v for k, v in kwargs.items() if isinstance(v, int)}
    static.update({"method": method} if method else {})
    arrays = {k: v for k, v in kwargs.items() if k not in static}

    def apply(p, x, a):
        return Ouro(cfg).apply({"params": p}, x, **a, **static)
    return jax.jit(apply)(params, ids, arrays)


def task_manager():
    """lm-eval's TaskManager of the tests' tasks only: indexing all of lm-eval's own takes ~10 s."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(LM_EVAL_TASKS), include_defaults=False)


def random_batch(cfg, seed=0, vocab=None):
    """A batch of the data contract: two packed documents per row, random tokens, random loss mask."""
    rng = np.random.default_rng(seed)
    b, s = cfg.data.batch_size, cfg.data.seq_len
    vocab = vocab or cfg.model.vocab_size
    ids = rng.integers(3, vocab, (b, s + 1)).astype(np.int32)
    cut = rng.integers(2, s - 2, b)
    segment_ids = np.where(np.arange(s)[None] < cut[:, None], 1, 2).astype(np.int32)
    positions = np.where(segment_ids == 1, np.arange(s)[None], np.arange(s)[None] - cut[:, None]).astype(np.int32)
    loss_mask = (rng.random((b, s)) > 0.3).astype(np.float32)
    return dict(input_ids=ids[:, :-1], targets=ids[:, 1:], segment_ids=segment_ids, positions=positions,
                loss_mask=loss_mask)


def subprocess_env(devices=1):
    """Environment of a subprocess: CPU, `devices` fake devices, fast XLA compilation, the session's cache."""
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu",
               XLA_FLAGS=" ".join([f"--xla_force_host_platform_device_count={devices}", *TEST_XLA_FLAGS]))
    if os.environ.get(TEST_CACHE_ENV):  # programs outside the training loop share the session's cache
        env.update(JAX_COMPILATION_CACHE_DIR=os.environ[TEST_CACHE_ENV], JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


PYTHON = sys.executable


@functools.cache
def reference_run(steps=5):
    """The tiny config trained `steps` steps on one device with random batches 0..steps-1 (compiled
    once per test process and shared by the tests that compare against it)."""
    import jax

    from ouro_jax import sharding as shd
    from ouro_jax.train.step import build_train_program

    cfg = tiny_train_config()
    mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    program = build_train_program(cfg, mesh, FAST_COMPILE)
    state = program.init(jax.random.key(0))
    initial = jax.tree.map(np.array, jax.device_get(state.params))
    history = []
    for i in range(steps):
        state, metrics = program.step(state, shd.global_batch(random_batch(cfg, seed=i), mesh))
        history.append(jax.device_get(metrics))
    return dict(config=cfg, program=program, initial_params=initial, history=history,
                params=jax.tree.map(np.array, jax.device_get(state.params)))


# A thinking template in the style of the Ouro-Thinking / Qwen3 ones: past assistant turns lose their thinking,
# `enable_thinking=false` pre-fills an empty think block.
THINKING_TEMPLATE = (
    "{% for m in messages %}"
    "{% set content = m['content'] %}"
    "{% if m['role'] == 'assistant' and '</think>' in content %}"
    "{% set content = content.split('</think>')[-1].lstrip('\\n') %}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + content + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{% else %}{{ '<think>\\n' }}{% endif %}{% endif %}")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHARS = ["\n"] + [chr(c) for c in range(32, 127)] + [chr(c) for c in range(0xC0, 0xC0 + 28)]  # ids 3..126
VOCAB_SIZE = len(SPECIALS) + len(CHARS) + 1  # with <unk>: 128, the golden model's vocabulary


def write_char_tokenizer(directory: str | pathlib.Path) -> pathlib.Path:
    """Writes tokenizer.json (+ tokenizer_config.json) of a char-level tokenizer into `directory`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS + ["<unk>"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "unk_token": "<unk>", "model_max_length": 512}))
    return directory / "tokenizer.json"


def golden_with_tokenizer(golden_dir: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
    """A copy of the golden HF directory with the char-level tokenizer added."""
    shutil.copytree(golden_dir, target)
    write_char_tokenizer(target)
    return target


def with_chat_template(directory: pathlib.Path, eos_ids=(2, 0)) -> pathlib.Path:
    """Adds THINKING_TEMPLATE to a tokenizer directory's tokenizer_config.json, and a generation_config.json."""
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = THINKING_TEMPLATE
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": list(eos_ids)}))
    return directory


# Chats for SFT tests: multi-turn, a system prompt, a tool turn, non-ASCII text, a thinking block, and one
# chat without an assistant message (skipped by `ouro-prepare --chat`).
CHATS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"},
     {"role": "assistant", "content": "2"}, {"role": "user", "content": "and 2+2?"},
     {"role": "assistant", "content": "4, of course."}],
    [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hello there!"}],
    [{"role": "user", "content": "only a question"}],
    [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "Let me look."},
     {"role": "tool", "content": "sunny, 21C"}, {"role": "assistant", "content": "Sunny: 21 degrees."}],
    [{"role": "user", "content": "Grüße?"}, {"role": "assistant", "content": "<think>\npolite</think>\nHallo, schön!"}],
] + [[{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": f"answer {i}."}]
     for i in range(8)]


def write_chats(path: pathlib.Path, chats=CHATS) -> pathlib.Path:
    """Chat JSONL: one {"messages": [...]} per line (with an extra key, ignored)."""
    path.write_text("".join(json.dumps({"id": i, "messages": chat}) + "\n" for i, chat in enumerate(chats)))
    return path


def assistant_texts(chat, end="<|im_end|>", strip_thinking=False) -> str:
    """What the assistant writes in `chat` as the masked-in tokens decode: each answer and its end token."""
    out = []
    for m in chat:
        if m["role"] == "assistant":
            content = m["content"].split("</think>")[-1].lstrip("\n") if strip_thinking else m["content"]
            out.append(content + end)
    return "".join(out)
