"""Imported models keep their own tokenizer: Llama/TinyLlama's SentencePiece-style BPE with byte fallback,
SmolLM2's byte-level BPE with a digit split, Qwen2's NFC + regex split + byte-level BPE (kind "hf"), and the
GPT-2-shaped byte-level BPE of the released SmolLM2-135M-Instruct (kind "bpe", its side files kept). Each encodes
exactly as transformers' tokenizer does, samples the same greedy text as transformers' generate (the same BOS),
streams the same text it prints, stops at the eos token and exports back unchanged.

The hub folders are made here at a tiny size with the `tokenizers` library (no network, no downloads).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import cli, english_text, export_import_export, steer_greedy_to_words, tiny_flags
from scratchgpt import UserError
from scratchgpt.checkpoint import load_run
from scratchgpt.generate import complete
from scratchgpt.hf import import_hf

transformers = pytest.importorskip("transformers")
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402

TRICKY = [
    "Hello world, it's 2024!\n\n  Indented line\twith a tab.   \n",
    " leading space and trailing  ",
    "digits 1234567 and 3.14159, x=42",
    "我们的模型 naïve café — “quotes” ½ Ⅻ x² 🙂🚀 \u200b\u3000end",
    "e\u0301 (decomposed é) \r\n\r\n\n   \t  x",
    "special strings: <s> </s> <|endoftext|> <|im_end|> <unk>",
    "",
]
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _corpus() -> list[str]:
    return english_text(30_000).split("\n")


def llama_tokenizer() -> tuple[Tokenizer, dict]:
    """TinyLlama's layout: <unk> <s> </s>, then <0x00>..<0xFF> as ordinary vocabulary (byte fallback), a
    normalizer that prepends "▁" and turns spaces into it, no pre-tokenizer, a decoder that undoes both."""
    specials = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials + [f"<0x{b:02X}>" for b in range(256)], show_progress=False))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in specials]  # bytes: plain vocab
    return Tokenizer.from_str(json.dumps(spec)), dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _byte_level_bpe(pre_tokenizer, normalizer=None) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def smollm_tokenizer() -> tuple[Tokenizer, dict]:
    """SmolLM2's: digits split one by one, then GPT-2's byte-level split; <|im_end|> ends a turn (Instruct)."""
    tok = _byte_level_bpe(pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]))
    return tok, dict(bos_token="<|im_start|>", eos_token="<|im_end|>", chat_template=CHAT_TEMPLATE)


def smollm2_tokenizer() -> tuple[Tokenizer, dict]:
    """The released SmolLM2-135M-Instruct's tokenizer.json: GPT-2's byte-level split alone (no digit split),
    so scratchgpt reads it as its own kind "bpe"; <|im_end|> still ends a turn, <|im_start|> is its bos."""
    tok = _byte_level_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    return tok, dict(bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
                     chat_template=CHAT_TEMPLATE)


def qwen_tokenizer() -> tuple[Tokenizer, dict]:
    """Qwen2's: NFC, its own split regex (single digits, no contractions' case), byte-level without a regex.
    Its tokenizer_config names no eos here: import takes config.json's eos_token_id."""
    tok = _byte_level_bpe(pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), normalizers.NFC())
    return tok, {}


STYLES = {"llama": llama_tokenizer, "smollm": smollm_tokenizer, "qwen": qwen_tokenizer, "smollm2": smollm2_tokenizer}
EOS = {"llama": "</s>", "smollm": "<|im_end|>", "qwen": "<|endoftext|>", "smollm2": "<|im_end|>"}


def hub_folder(folder: Path, style: str) -> Path:
    """A tiny LlamaForCausalLM (GQA, rms_norm_eps 1e-5) saved with save_pretrained, with the tokenizer saved by
    PreTrainedTokenizerFast.save_pretrained. The eos token's output row is a scaled copy of the row of a token
    greedy decoding picks new after a few steps (its constant-unit weight kept), so that it reaches eos by then."""
    tok, special = STYLES[style]()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    eos = tok.token_to_id(EOS[style])
    vocab = tok.get_vocab_size() + 3  # a few unused rows, as hub models pad theirs
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=1, rms_norm_eps=1e-5,
                                      max_position_embeddings=128, tie_word_embeddings=False,
                                      bos_token_id=fast.bos_token_id, eos_token_id=eos)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # weights far from init, so logits are large and greedy choices clear-cut
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.3 * noise if p.dim() == 1 else 0.3 * noise)
    steer_greedy_to_words(model, tok.get_vocab())
    with torch.no_grad():
        ids = fast("Once upon a time", return_tensors="pt").input_ids
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                             eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
        pick = next(t for k, t in enumerate(out) if k >= 3 and t not in out[:k])
        head = model.lm_head.weight
        head[eos] = head[pick] * 1.02
        head[eos, 0] = 2.0  # (the constant unit's share unscaled: eos outranks that token where it leads)
    model.save_pretrained(folder, safe_serialization=True)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=list(STYLES))
def hub(request, tmp_path_factory) -> tuple[str, Path, Path]:
    """(style, hub folder, imported run)."""
    folder = hub_folder(tmp_path_factory.mktemp(request.param), request.param)
    run = import_hf(folder, tmp_path_factory.mktemp("runs") / request.param)
    return request.param, folder, run


def auto_tokenizers(folder: Path):
    """transformers' tokenizer for the folder as AutoTokenizer loads it, and with split_special_tokens."""
    return (transformers.AutoTokenizer.from_pretrained(folder),
            transformers.AutoTokenizer.from_pretrained(folder, split_special_tokens=True))


def check_same_ids(ours, auto, split, text: str) -> None:
    ids = ours.encode(text)
    # special-token strings in text are plain characters to scratchgpt, as with split_special_tokens
    assert split(text, add_special_tokens=False)["input_ids"] == ids, text
    assert split(text)["input_ids"] == ours.bos_ids + ids  # what tokenizer(text) gives: BOS included
    if not any(s in text for s in ("<s>", "</s>", "<|", "<unk>")):
        assert auto(text)["input_ids"] == ours.bos_ids + ids
    assert ours.decode(ids) == auto.decode(ids)
    assert ours.stream_decoder().decode(ids) == auto.decode(ids)  # streamed, nothing held back at the end
    # the bytes each token stands for (what the UTF-8 guard reads) spell the text (Llama's decoder strips a space)
    raw = b"".join(ours.token_bytes_table()[i] for i in ids).decode("utf-8")
    assert raw == auto.decode(ids) or (raw[:1] == " " and raw[1:] == auto.decode(ids))


def test_imported_tokenizers_encode_as_transformers(hub):
    style, folder, run = hub
    loaded = load_run(run)
    ours = loaded.tokenizer
    kind = "bpe" if style == "smollm2" else "hf"
    assert ours.kind == kind and loaded.config["tokenizer"] == kind
    assert ours.to_json() == (folder / "tokenizer.json").read_text()  # kept byte for byte
    auto, split = auto_tokenizers(folder)
    assert ours.eot_token == EOS[style]
    assert ours.bos_ids == ([auto.bos_token_id] if style == "llama" else [])
    for text in TRICKY:
        check_same_ids(ours, auto, split, text)
    if style == "llama":  # characters the vocabulary lacks are their UTF-8 bytes, <0xF0><0x9F>...
        assert ours.encode("🙂")[-4:] == [ours.token_to_id(f"<0x{b:02X}>") for b in "🙂".encode()]
    # a template's text: its special strings are the special tokens, as in transformers' tokenizer(text); the
    # plain encoding of the same text, before and after, keeps them characters (no flag of a shared object flipped)
    for text in TRICKY[-1:] + ["<|im_start|>user\nHi <s> x</s><|im_end|>\n<|endoftext|>y <unk>", TRICKY[0]]:
        plain = ours.encode(text)
        assert ours.encode_with_special_tokens(text) == auto(text, add_special_tokens=False)["input_ids"], text
        assert ours.encode(text) == plain == split(text, add_special_tokens=False)["input_ids"]
    # the byte-level kind honours them with its one `tokenizers` object (a second one is ~30 MiB at 49k tokens)
    assert (ours._hf_specials is ours._hf) == (kind == "bpe")


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> dict:
    folder = hub_folder(tmp_path_factory.mktemp("llama"), "llama")
    run = import_hf(folder, tmp_path_factory.mktemp("runs") / "llama")
    auto, split = auto_tokenizers(folder)
    return dict(folder=folder, run=run, ours=load_run(run).tokenizer, auto=auto, split=split)


@settings(max_examples=120, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.characters(codec="utf-8"), st.sampled_from([" ", "  ", "\n", "▁", "12", "<s>", "é"])),
                max_size=25).map("".join))
def test_byte_fallback_tokenizer_matches_transformers_on_any_text(llama, text):
    check_same_ids(llama["ours"], llama["auto"], llama["split"], text)


def test_sample_is_transformers_greedy_text_and_stops_at_eos(hub, capsys):
    style, folder, run = hub
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    prompt = "Once upon a time"
    ids = auto(prompt, return_tensors="pt").input_ids  # BOS first where the tokenizer puts it (Llama's <s>)
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                          eos_token_id=auto.convert_tokens_to_ids(load_run(run).tokenizer.eot_token),
                          pad_token_id=0)[0, ids.shape[1]:].tolist()
    loaded = load_run(run)
    eos = loaded.tokenizer.eot_id
    assert out[-1] == eos and 3 < len(out) <= 9  # transformers stopped at eos (the row made for it)
    new = out[:-1]
    prompt_ids = ids[0].tolist()
    # the continuation's text: what the new ids add to the prompt's (Llama's decoder drops a text's first space)
    cont = auto.decode(prompt_ids + new)[len(auto.decode(prompt_ids)):]
    assert cont and "\ufffd" not in cont
    [c] = complete(loaded.gpt, loaded.tokenizer, [prompt], temperature=0, max_new_tokens=12)
    assert (c.token_ids, c.finish_reason, c.text, c.prompt_tokens) == (new, "stop", cont, len(prompt_ids))
    code, text, err = cli(capsys, "sample", run, "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "12",
                          "--device", "cpu")
    assert code == 0, err
    assert text == prompt + cont + "\n"
    code, streamed, err = cli(capsys, "sample", run, "--prompt", prompt, "--temperature", "0",
                              "--max-new-tokens", "12", "--device", "cpu", "--stream")
    assert code == 0, err
    assert streamed == text


@pytest.mark.slow
def test_the_utf8_guard_reads_imported_byte_tokens(hub):
    """Byte-level (GPT-2 alphabet) and byte-fallback (<0xNN>) vocabularies: hot sampling never breaks a
    character with the guard; without it the same seeds do (the tiny model knows little of UTF-8)."""
    from scratchgpt.utf8guard import utf8_tables

    style, folder, run = hub
    loaded = load_run(run)
    assert utf8_tables(loaded.tokenizer) is not None
    found = {}
    for guard in (False, True):
        done = complete(loaded.gpt, loaded.tokenizer, ["Once", "我们", "🙂", "x"], max_new_tokens=100, temperature=3.0,
                        top_k=None, seed=3, stop_tokens=(), utf8_guard=guard)
        found[guard] = sum(c.text.count("\ufffd") for c in done)
    assert found[True] == 0 and found[False] > 0, found


def test_streaming_never_splits_a_byte_fallback_character(llama):
    """🙂 is four <0x..> tokens: the stream shows nothing until the last, then the whole character; an
    unfinished character at the end is dropped, as scratchgpt's own streamer drops incomplete UTF-8."""
    ours, auto = llama["ours"], llama["auto"]
    context = ours.bos_ids + ours.encode("Hi")
    ids = ours.encode("a🙂b🚀")  # (its normalizer starts a text with "▁": a space after the context)
    dec = ours.stream_decoder(context)
    pieces = [dec.push([i]) for i in ids]
    assert not any("\ufffd" in p for p in pieces)
    assert any("🙂" in p for p in pieces) and any("🚀" in p for p in pieces)  # each emoji comes out whole
    assert "".join(pieces) + dec.flush() == auto.decode(context + ids)[len(auto.decode(context)):] == " a🙂b🚀"
    dec = ours.stream_decoder(context)
    assert dec.push(ours.encode("ok🙂")[:-2]) == " ok" and dec.flush() == "" and dec.dropped_bytes == 2


def test_streaming_bytes_that_are_not_utf8(llama):
    """A model sampled without the UTF-8 guard may write byte-fallback ids that are not UTF-8: the stream shows
    them as U+FFFD, as transformers' decode does, and goes on. (Neighbouring byte ids decode as one group there,
    so "]" = <0x5D> before <0xED><0xCE> turns into U+FFFD too, after the stream has shown it; tokenizers'
    DecodeStream gives up at that point.)"""
    ours, auto = llama["ours"], llama["auto"]
    byte = lambda b: ours.token_to_id(f"<0x{b:02X}>")  # noqa: E731
    context = ours.bos_ids + ours.encode("Hi")
    ids = ours.encode("it is") + [byte(0x5D), byte(0xED), byte(0xCE)] + ours.encode(" there") + [byte(0xF0)] \
        + ours.encode("ok, 🙂 and") + [byte(0x35), byte(0x8B)] + ours.encode("end")
    dec = ours.stream_decoder(context)
    streamed = "".join(dec.push([i]) for i in ids) + dec.flush()
    expected = auto.decode(context + ids)[len(auto.decode(context)):]
    assert len(streamed) == len(expected) and streamed.endswith("end") and streamed.count("\ufffd") >= 4
    assert all(a == b or b == "\ufffd" for a, b in zip(streamed, expected)), (streamed, expected)


def test_streaming_without_decode_stream_prefill(llama, monkeypatch):
    """tokenizers < 0.22 has DecodeStream without `ids`: stepping through the context instead gives the same text."""
    from tokenizers import decoders

    real = decoders.DecodeStream

    def old_decode_stream(*args, **kwargs):
        if "ids" in kwargs:
            raise TypeError("DecodeStream() got an unexpected keyword argument 'ids'")
        return real(*args, **kwargs)

    monkeypatch.setattr(decoders, "DecodeStream", old_decode_stream)
    ours = llama["ours"]
    context = ours.bos_ids + ours.encode("Hi there")
    ids = ours.encode("a🙂b, 12 🚀")
    dec = ours.stream_decoder(context)
    assert "".join(dec.push([i]) for i in ids) + dec.flush() == " a🙂b, 12 🚀"


def test_export_gives_back_the_hub_tokenizer_files(hub, tmp_path, capsys):
    style, folder, run = hub
    export_import_export(capsys, run, tmp_path)  # hf1, and hf2 exported from its import: the same bytes
    assert (tmp_path / "hf1" / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    if style != "qwen":  # (qwen's had no eos_token: the run's names the one config.json gives)
        assert (tmp_path / "hf1" / "tokenizer_config.json").read_bytes() == \
            (folder / "tokenizer_config.json").read_bytes()
    config = json.loads((tmp_path / "hf1" / "config.json").read_text())
    ours = load_run(run).tokenizer
    assert config["eos_token_id"] == ours.eot_id
    assert config["bos_token_id"] == (ours.bos_id if ours.bos_id is not None else ours.eot_id)
    if style != "qwen":  # the model's own bos, as the hub folder has it (SmolLM2's <|im_start|>, not its eos)
        assert config["bos_token_id"] == json.loads((folder / "config.json").read_text())["bos_token_id"]
    if style in ("smollm", "smollm2"):  # its chat template file goes along
        assert (tmp_path / "hf2" / "chat_template.jinja").read_bytes() == (folder / "chat_template.jinja").read_bytes()
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf1")
    assert auto.eos_token_id == ours.eot_id
    assert auto(TRICKY[0])["input_ids"] == ours.bos_ids + ours.encode(TRICKY[0])
    # transformers' own generate on the export stops where it stops on the original (its generation_config.json)
    original = transformers.AutoTokenizer.from_pretrained(folder)
    if style != "qwen":  # (its tokenizer names no eos: the export's is config.json's)
        assert (auto.bos_token_id, auto.eos_token_id) == (original.bos_token_id, original.eos_token_id)
    ids = original("Once upon a time", return_tensors="pt").input_ids
    outs = []
    for where in (folder, tmp_path / "hf1"):
        model = transformers.AutoModelForCausalLM.from_pretrained(where).eval()
        with torch.no_grad():
            outs.append(model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20,
                                       pad_token_id=0)[0].tolist())
    assert outs[0] == outs[1] and len(outs[0]) < ids.shape[1] + 20  # it stopped at the model's eos
    if style in ("smollm", "smollm2"):
        messages = [{"role": "user", "content": "Once upon a time"}]
        assert auto.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
            original.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@pytest.mark.slow
def test_an_sft_run_of_an_imported_model_exports_its_own_chat_template(tmp_path_factory, tmp_path, capsys):
    """Fine-tuned in scratchgpt's template, the SFT run of SmolLM2 (kind "bpe") exports that template, not the
    base model's: transformers' apply_chat_template gives the ids scratchgpt prompts it with; imported again, it
    chats in it (as a jinja template) with the same ids."""
    from scratchgpt.prompts import JinjaChatTemplate, prompt_ids

    folder = hub_folder(tmp_path_factory.mktemp("smollm2"), "smollm2")
    run = import_hf(folder, tmp_path / "run")
    rows = [{"prompt": f"Say {w}.", "response": f"{w}, {w}!"} for w in ("hello", "world", "stone", "river")]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = cli(capsys, "finetune", "sft", run, "--train", tmp_path / "sft.jsonl", "--val",
                       tmp_path / "sft.jsonl", "--out", tmp_path / "sft", "--max-steps", "2", "--device", "cpu")
    assert code == 0, err
    code, _, err = cli(capsys, "export", tmp_path / "sft", "--out", tmp_path / "hf")
    assert code == 0, err
    tuned = load_run(tmp_path / "sft")
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    again = load_run(import_hf(tmp_path / "hf", tmp_path / "again"))
    jinja = JinjaChatTemplate.of(again.tokenizer, again.config)
    for chat in ([("user", "Say hello.")], [("system", "Be brief."), ("user", "Say 12 words.")],
                 [("user", "Say river."), ("assistant", "river, river!"), ("user", "Say stone.")]):
        messages = [{"role": r, "content": c} for r, c in chat]
        ours = prompt_ids(tuned.tokenizer, tuned.config["chat_template"], chat)
        assert auto.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False) == ours
        assert jinja.encode(messages) == ours


@pytest.mark.slow
def test_imported_llama_prepares_fine_tunes_evaluates_and_chats(llama, tmp_path, capsys):
    """prepare --tokenizer-from RUN keeps the model's tokenizer (documents as tokenizer(doc) gives them, each
    ended by </s>); eval and finetune sft work on it; the SFT run chats in scratchgpt's template, stopping at </s>."""
    run, ours = llama["run"], llama["ours"]
    docs = [f"Document {i}, with digits {i * 37} and 🙂." for i in range(400)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    code, _, err = cli(capsys, "prepare", tmp_path / "docs.jsonl", "--out", tmp_path / "data", "--tokenizer-from", run)
    assert code == 0, err
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert (meta["tokenizer"], meta["eot_id"], meta["document_separator"]) == ("hf", ours.eot_id, "</s><s>")
    assert (tmp_path / "data" / "tokenizer_config.json").read_bytes() == (run / "best" / "tokenizer_config.json").read_bytes()
    import numpy as np

    train = np.fromfile(tmp_path / "data" / "train.bin", dtype=meta["dtype"]).tolist()
    sep = [ours.eot_id] + ours.bos_ids
    pieces, start = [], 0
    for k in range(len(train) - 1):
        if train[k:k + 2] == sep:
            pieces.append(train[start:k])
            start = k + 2
    pieces.append(train[start:])
    assert len(pieces) > 200 and {tuple(p) for p in pieces} <= {tuple(ours.encode(d)) for d in docs}

    code, out, err = cli(capsys, "eval", run, "--data", tmp_path / "data")
    assert code == 0, err
    assert json.loads(out)["val_loss"] > 0
    flags = [f for f in tiny_flags(**{"train.max_iters": 2, "train.eval_interval": 2}) if not f.startswith("--model.")]
    code, _, err = cli(capsys, "train", "--data", tmp_path / "data", "--out", tmp_path / "continued",
                       "--train.init_from", run, *flags)
    assert code == 0, err
    continued = load_run(tmp_path / "continued").tokenizer  # the run carries the model's tokenizer files on
    assert (continued.kind, continued.eot_id, continued.bos_ids) == ("hf", ours.eot_id, ours.bos_ids)
    # a text file is scored as transformers scores tokenizer(text): <s> first
    text = "Once upon a time there was a tiny model, 42 🙂."
    (tmp_path / "t.txt").write_text(text)
    code, out, err = cli(capsys, "eval", run, "--data", tmp_path / "t.txt")
    assert code == 0, err
    ids = llama["auto"](text, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = transformers.AutoModelForCausalLM.from_pretrained(llama["folder"])(ids, labels=ids).loss.item()
    assert json.loads(out)["val_loss"] == pytest.approx(ref, abs=1e-4)

    rows = [{"prompt": f"Say {w}.", "response": f"{w}, {w}!"} for w in ("hello", "world", "stone", "river")]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = cli(capsys, "finetune", "sft", run, "--train", tmp_path / "sft.jsonl", "--val",
                       tmp_path / "sft.jsonl", "--out", tmp_path / "sft", "--max-steps", "2", "--device", "cpu")
    assert code == 0, err
    tuned = load_run(tmp_path / "sft")
    assert tuned.tokenizer.kind == "hf" and tuned.tokenizer.eot_id == ours.eot_id
    from scratchgpt.chat import chat
    from scratchgpt.generate import GenerationConfig
    from scratchgpt.prompts import encode_conversation

    ids, learn = encode_conversation(tuned.tokenizer, tuned.config["chat_template"], [("user", "Hi"), ("assistant", "Yo")])
    assert ids[:1] == ours.bos_ids and ids[-1] == ours.eot_id and not learn[0] and learn[-1]  # <s> ... Yo</s>
    import io

    out = io.StringIO()
    chat(tuned.gpt, tuned.tokenizer, tuned.config, ["Say hello.\n"], out, GenerationConfig(temperature=0, max_new_tokens=8))
    assert out.getvalue().endswith("\n")


@pytest.mark.slow
def test_side_files_travel_with_a_bpe_kind_tokenizer(tmp_path_factory, tmp_path, capsys):
    """The released SmolLM2's GPT-2-shaped tokenizer is kind "bpe": its tokenizer_config.json (eos <|im_end|>),
    chat_template.jinja and generation_config.json go wherever its tokenizer.json goes: the imported run,
    prepare --tokenizer-from, a run trained on that data, a fine-tuned run. Every copy stops at the same eos ids."""
    folder = hub_folder(tmp_path_factory.mktemp("smollm2"), "smollm2")
    run = import_hf(folder, tmp_path / "run")
    ours = load_run(run).tokenizer
    side = ("tokenizer_config.json", "chat_template.jinja", "generation_config.json")
    assert ours.kind == "bpe" and set(side) <= set(ours.side_files)
    assert ours.stop_ids == [ours.token_to_id("<|im_end|>")] and ours.bos_id == ours.token_to_id("<|im_start|>")
    docs = [f"Document {i} about modules, functions and {i * 37} classes." for i in range(300)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    code, _, err = cli(capsys, "prepare", tmp_path / "docs.jsonl", "--out", tmp_path / "data", "--tokenizer-from", run)
    assert code == 0, err
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert (meta["tokenizer"], meta["eot_id"]) == ("bpe", ours.eot_id)
    flags = [f for f in tiny_flags(**{"train.max_iters": 2, "train.eval_interval": 2}) if not f.startswith("--model.")]
    code, _, err = cli(capsys, "train", "--data", tmp_path / "data", "--out", tmp_path / "continued",
                       "--train.init_from", run, *flags)
    assert code == 0, err
    rows = [{"prompt": f"Say {w}.", "response": f"{w}, {w}!"} for w in ("hello", "world", "stone", "river")]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = cli(capsys, "finetune", "sft", run, "--train", tmp_path / "sft.jsonl", "--val",
                       tmp_path / "sft.jsonl", "--out", tmp_path / "sft", "--max-steps", "2", "--device", "cpu")
    assert code == 0, err
    for where in (tmp_path / "data", tmp_path / "continued" / "best", tmp_path / "sft" / "best"):
        for name in side:
            assert (where / name).read_bytes() == (folder / name).read_bytes(), (where, name)
    for other in (load_run(tmp_path / "continued").tokenizer, load_run(tmp_path / "sft").tokenizer):
        assert (other.kind, other.eot_id, other.stop_ids, other.chat_template) == \
            ("bpe", ours.eot_id, ours.stop_ids, ours.chat_template)


def test_chat_uses_the_jinja_chat_template_else_plain_continuation(hub, capsys, monkeypatch):
    """SmolLM2's folder has a jinja chat template (chat_template.jinja): `chat` prompts with it, as
    transformers' apply_chat_template does (test_chat_templates.py checks that in depth).
    Without one (the others) it chats as plain continuation, <s> first for Llama."""
    import io

    from scratchgpt.chat import chat
    from scratchgpt.generate import GenerationConfig
    from scratchgpt.prompts import JinjaChatTemplate

    style, folder, run = hub
    loaded = load_run(run)
    gen = GenerationConfig(temperature=0, max_new_tokens=4)
    out = io.StringIO()
    chat(loaded.gpt, loaded.tokenizer, loaded.config, ["Once upon a time\n"], out, gen)
    if style in ("smollm", "smollm2"):
        assert loaded.tokenizer.chat_template == (folder / "chat_template.jinja").read_text() == CHAT_TEMPLATE
        messages = [{"role": "user", "content": "Once upon a time"}]
        ids = JinjaChatTemplate.of(loaded.tokenizer, loaded.config).encode(messages)
        auto = transformers.AutoTokenizer.from_pretrained(folder)
        assert ids == auto.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        [c] = complete(loaded.gpt, loaded.tokenizer, [ids], gen)
    else:
        assert loaded.tokenizer.chat_template is None
        [c] = complete(loaded.gpt, loaded.tokenizer, ["Once upon a time\n"], gen)  # the same prompt: BOS + text
    assert out.getvalue() == c.text + "\n"


def test_tokenizer_the_library_cannot_load_is_refused_in_one_line(llama, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in llama["folder"].iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    spec = json.loads((src / "tokenizer.json").read_text())
    spec["model"]["type"] = "NoSuchModel"
    (src / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(UserError) as e:
        import_hf(src, tmp_path / "run")
    assert "tokenizers library cannot load" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()
