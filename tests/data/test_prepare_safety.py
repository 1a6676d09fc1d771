"""`prepare` under faults and hostile inputs: a killed run leaves no workers and its temporary folder
is cleaned by the next run; FIFOs, devices and sockets are refused; a full disk, a file size limit or an
unwritable --out give one `error:` line and change nothing; token ids outside the vocabulary are caught."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import cli, tiny_flags
from scratchgpt import UserError
from scratchgpt.data import TokenDataset, data_info, load_meta, prepare
from scratchgpt.data import dataset as dataset_module
from scratchgpt.runs import staging
from scratchgpt.data.shards import ShardWriter
from scratchgpt.utils import sha256_file

posix_only = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs (POSIX)")


def _words(n_bytes: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(4000)]
    lines, size = [], 0
    while size < n_bytes:
        line = " ".join(rng.choice(vocab) for _ in range(rng.randint(5, 15))) + ".\n"
        lines.append(line)
        size += len(line)
    return "".join(lines)


def _tree_hashes(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def _temps(parent: Path) -> list[str]:
    return sorted(n for n in os.listdir(parent) if ".tmp-" in n)


@pytest.fixture()
def small(tmp_path) -> Path:
    p = tmp_path / "small.txt"
    p.write_text(_words(20_000), encoding="utf-8")
    return p


# -- a killed prepare: its workers die with it, the next run removes its temporary folder ------------


def _children(pid: int) -> list[int]:
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                rest = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(rest[1]) == pid and rest[0] != "Z":
                kids.append(int(d))
    return kids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _spawned_workers(pid: int) -> list[int]:
    found = []
    for k in _children(pid):
        try:
            if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes():
                found.append(k)
        except OSError:
            pass
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc to find the worker processes")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_killed_prepare_leaves_no_workers_and_the_next_run_cleans_up(tmp_path, small, sig):
    big = tmp_path / "big.txt"
    big.write_text(_words(6 << 20, seed=1), encoding="utf-8")  # over 4 MB: the work goes to worker processes
    out = tmp_path / "o"
    p = subprocess.Popen([sys.executable, "-m", "scratchgpt", "prepare", str(big), "--out", str(out),
                          "--vocab-size", "400", "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while len(workers := _spawned_workers(p.pid)) < 2 and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert len(workers) == 2, "prepare never started its 2 workers"
    time.sleep(0.3)
    p.send_signal(sig)
    t0 = time.time()
    _, err = p.communicate(timeout=30)  # EOF on its pipes: nothing left holds them
    while any(map(_alive, workers)) and time.time() - t0 < 5:
        time.sleep(0.05)
    assert not any(map(_alive, workers)), f"workers still alive {time.time() - t0:.1f} s after {sig.name}"
    assert not out.exists()
    if sig == signal.SIGTERM:  # stopped like Ctrl-C: cleaned up at once
        assert p.returncode == 130 and err.decode().strip() == "interrupted: terminated (SIGTERM)"
        assert _temps(tmp_path) == []
    else:
        assert p.returncode == -signal.SIGKILL and len(_temps(tmp_path)) == 1
    prepare([str(small)], out, tokenizer="char", progress=False)
    assert _temps(tmp_path) == [] and (out / "meta.json").is_file()


@pytest.mark.skipif(staging.fcntl is None, reason="needs POSIX file locks")
def test_only_abandoned_temporary_folders_that_prepare_named_are_removed(tmp_path, small):
    out = tmp_path / "o"

    def folder(name: str, owner: bool = True) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "corpus.spool").write_text("x")
        if owner:
            (d / staging._OWNER).write_text("")
        return d

    dead = folder(".o.tmp-abcd1234")  # a killed run's: its owner file is not locked
    no_owner = folder(".o.tmp-abcd5678", owner=False)  # not known to be ours
    odd_names = [folder(n) for n in (".o.tmp-short", ".o.tmp-ABCD1234", ".o.tmp-abcd12345", ".oo.tmp-abcd1234",
                                     "o.tmp-abcd1234")]
    target = folder("elsewhere")
    (tmp_path / ".o.tmp-link1234").symlink_to(target)
    live = staging.new_tmp(out)  # a run in progress holds its lock
    assert not dead.exists()  # new_tmp already cleaned up
    folder(".o.tmp-dead9999")
    prepare([str(small)], out, tokenizer="char", progress=False)
    kept = sorted([no_owner.name, live.name, ".o.tmp-link1234"] + [d.name for d in odd_names if ".tmp-" in d.name])
    assert _temps(tmp_path) == kept
    assert (target / staging._OWNER).exists() and (target / "corpus.spool").read_text() == "x"
    assert not (out / staging._OWNER).exists()  # the finished output holds no lock file
    staging.discard_tmp(live)
    assert not live.exists()


# -- inputs that are not regular files ------------------------------------------------------------


@posix_only
@pytest.mark.parametrize("kind", ["fifo in a folder", "fifo", "link to /dev/zero in a folder", "/dev/zero",
                                  "socket in a folder"])
def test_fifos_devices_and_sockets_are_refused_in_one_line(tmp_path, small, kind):
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(small, d / "a.txt")
    if kind == "fifo in a folder":
        os.mkfifo(d / "b.txt")
        inputs = [d]
    elif kind == "fifo":
        os.mkfifo(tmp_path / "f.txt")
        inputs = [tmp_path / "f.txt"]
    elif kind == "link to /dev/zero in a folder":
        (d / "z.txt").symlink_to("/dev/zero")
        inputs = [d]
    elif kind == "/dev/zero":
        inputs = ["/dev/zero"]
    else:
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(d / "s.txt"))
        inputs = [d]
    with pytest.raises(UserError, match="not a regular file"):
        prepare([str(i) for i in inputs], tmp_path / "o", tokenizer="char", progress=False)
    assert not (tmp_path / "o").exists() and _temps(tmp_path) == []


def test_stdin_is_still_read(tmp_path, small):
    meta = prepare(["-"], tmp_path / "o", tokenizer="char", progress=False, stdin=io.BytesIO(small.read_bytes()))
    assert meta["bytes_in"] == small.stat().st_size


@pytest.mark.slow
@posix_only
def test_a_fifo_in_the_input_folder_is_one_error_line_on_the_command_line(tmp_path, small):
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(small, d / "a.txt")
    os.mkfifo(d / "b.txt")
    r = subprocess.run([sys.executable, "-m", "scratchgpt", "prepare", str(d), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr == f"error: {d / 'b.txt'}: not a regular file (a FIFO, device or socket): " \
                                             "move it out of the folder, or name the input files\n"


# -- a full disk, a file size limit, an unwritable --out ----------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash for ulimit -f")
@pytest.mark.parametrize("limit_kb", [100, 300], ids=["the spool", "the token file"])
def test_a_file_size_limit_is_one_error_line_and_the_old_output_survives(tmp_path, limit_kb):
    corpus = tmp_path / "c.txt"
    corpus.write_text(_words(200_000), encoding="utf-8")  # 200 KB of text: 400 KB of uint16 char ids
    out = tmp_path / "o"
    prepare([str(corpus)], out, tokenizer="char", progress=False, val_fraction=0.5)
    before = _tree_hashes(out)
    cmd = (f"ulimit -f {limit_kb}; exec {sys.executable} -m scratchgpt prepare {corpus} --out {out} "
           "--tokenizer char --force")
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert r.stderr == f"error: cannot write the output directory {out}: File too large (nothing was changed)\n"
    assert _tree_hashes(out) == before and _temps(tmp_path) == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS, errno.EDQUOT],
                         ids=errno.errorcode.get)
def test_write_errors_midway_are_one_line_and_change_nothing(tmp_path, small, monkeypatch, code):
    out = tmp_path / "o"
    prepare([str(small)], out, tokenizer="char", progress=False)
    before = _tree_hashes(out)

    def fail(self, data):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(ShardWriter, "write", fail)
    with pytest.raises(UserError) as e:
        prepare([str(small)], out, tokenizer="char", progress=False, force=True, seed=5)
    assert str(e.value) == f"cannot write the output directory {out}: {os.strerror(code)} (nothing was changed)"
    assert _tree_hashes(out) == before and _temps(tmp_path) == []


@pytest.mark.parametrize("where", ["/proc/scratchgpt-x", "/proc/scratchgpt-x/y", "/sys/scratchgpt-x", "/dev/null/x",
                                   "FILE/x", "READONLY/o"])
def test_impossible_or_unwritable_outputs_are_one_line(tmp_path, small, where):
    if where.startswith("/") and not Path("/" + where.split("/")[1]).is_dir():
        pytest.skip(f"no /{where.split('/')[1]} here")
    if where == "READONLY/o":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders (no permission to deny)")
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        where = str(ro / "o")
    elif where == "FILE/x":
        where = str(small) + "/x"
    with pytest.raises(UserError, match=r"^cannot write the output directory "):
        prepare([str(small)], where, tokenizer="char", progress=False)
    assert _temps(tmp_path) == []


# -- token ids against the vocabulary -----------------------------------------------------------


@pytest.fixture()
def data_copy(tmp_path, char_data) -> Path:
    d = tmp_path / "d"
    shutil.copytree(char_data, d)
    return d


def _set_meta(d: Path, **fields) -> None:
    meta = json.loads((d / "meta.json").read_text())
    meta.update(fields)
    (d / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("vocab_size", [0, True, -3, 70_000, 2.5], ids=["0", "true", "-3", "past uint16", "2.5"])
def test_meta_vocab_size_must_be_a_positive_int_that_fits_the_dtype(data_copy, vocab_size):
    _set_meta(data_copy, vocab_size=vocab_size)
    with pytest.raises(UserError, match="vocab_size"):
        load_meta(data_copy)


def test_same_size_token_file_of_ids_past_the_vocabulary_is_caught_when_opened(data_copy):
    train_bin = data_copy / "train.bin"
    train_bin.write_bytes(b"\xff" * train_bin.stat().st_size)
    load_meta(data_copy)  # sizes and the tokenizer still match
    vocab = load_meta(data_copy)["vocab_size"]
    with pytest.raises(UserError, match=rf"token id 65535 at position 0 is outside the vocabulary \({vocab} ids\)"):
        TokenDataset(data_copy, "train", 8)


@pytest.mark.slow
def test_train_on_ids_past_the_vocabulary_is_one_error_line(data_copy, capsys):
    train_bin = data_copy / "train.bin"
    train_bin.write_bytes(b"\xff" * train_bin.stat().st_size)
    code, out, err = cli(capsys, "train", "--data", data_copy, "--out", data_copy.parent / "run",
                         *tiny_flags(**{"train.max_iters": 2}))
    assert code == 1 and err.startswith("error: the train split of ") and err.count("\n") == 1


def test_verify_reads_every_id_where_opening_reads_a_sample(data_copy, char_data, capsys):
    assert "every token id is in the vocabulary" in data_info(char_data, verify=True)
    meta = load_meta(data_copy)
    n = meta["train_tokens"]
    window = dataset_module.SAMPLE_WINDOW
    starts = np.linspace(0, n - window, dataset_module.SAMPLE_WINDOWS).astype(np.int64)
    assert n > window * dataset_module.SAMPLE_WINDOWS  # a sample, not the whole split
    sampled = np.zeros(n, dtype=bool)
    for s in starts:
        sampled[s:s + window] = True
    hole = int(np.argmin(sampled))  # the first id no sample reads
    ids = np.fromfile(data_copy / "train.bin", dtype=meta["dtype"])
    ids[hole] = meta["vocab_size"]
    ids.tofile(data_copy / "train.bin")
    meta = json.loads((data_copy / "meta.json").read_text())  # a manifest rewritten to match, as a careless tool would
    meta["files"]["train.bin"]["sha256"] = meta["shards"]["train"][0]["sha256"] = sha256_file(data_copy / "train.bin")
    (data_copy / "meta.json").write_text(json.dumps(meta))
    TokenDataset(data_copy, "train", 8)  # the sample misses it
    with pytest.raises(UserError, match=rf"train.bin: token id {meta['vocab_size']} at position {hole:,} is outside"):
        data_info(data_copy, verify=True)
    code, out, err = cli(capsys, "data-info", data_copy, "--verify")
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1


def test_a_lone_surrogate_escaped_in_jsonl_is_one_line(tmp_path):
    src = tmp_path / "s.jsonl"
    src.write_text('{"text": "fine text"}\n{"text": "broken \\ud800 here"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"s\.jsonl: document 2 holds '\\ud800', a lone surrogate: not Unicode text"):
        prepare([str(src)], tmp_path / "o", tokenizer="char", progress=False)
    assert _temps(tmp_path) == [] and not (tmp_path / "o").exists()
