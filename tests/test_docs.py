"""Every shell command in README.md and docs/ (English and Chinese) runs here, or at least parses.

A guide's ```bash blocks are read line by line (backslash continuations joined, heredocs kept whole). Each command
runs in a sandbox folder, in the guide's order, so later commands see what earlier ones wrote:

- `scratchgpt ...` (also `VAR=value scratchgpt ...` and `printf ... | scratchgpt ...`) runs in this process through
  `scratchgpt.cli.main`, with tiny sizes appended (TINY below: a 1-layer, 16-wide model, 4 steps, 8 new tokens...).
  Flags given later win, so the command is the one the guide shows, at a size that runs in a second.
- any other command (mkdir, cat > FILE <<'EOF', ...) runs in bash.
- `# docs: skip REASON` (REASON one of SKIP_REASONS) at the end of a line skips that command; on a line of its
  own it skips the rest of the block. A skipped scratchgpt command (also under torchrun) is still parsed by the
  command's own parser, so a renamed flag fails here; any other skipped command must name a known program (and a
  `python FILE.py` an existing file).
- `# docs: fails` at the end of a line: the command must exit non-zero with one `error: ...` line (it runs as
  written, without tiny sizes, which could override the very value it refuses).

Every guide starts from where the README leaves a reader: the README's commands (its main command, `scratchgpt
train`, leaves data/default and runs/default) run once, and each guide runs in a copy of that folder with the
input files FIXTURES stand in for (what the skipped downloads would fetch). A Chinese guide runs after its English
counterpart, in the same folder; the commands they share ran already and are not run twice. A guide that builds on
another's results says so (`<!-- docs: after finetuning.md -->`) and starts from that guide's folder.

Every `--flag` the guides name, in prose too, must be a flag of a scratchgpt command (or of another program they
show, EXTERNAL_FLAGS).
"""

from __future__ import annotations

import io
import re
import shlex
import shutil
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import REPO, english_text

pytestmark = pytest.mark.slow

DOCS = REPO / "docs"
SKIP_REASONS = {"network", "gpu", "server", "long", "cluster", "browser", "tool"}  # tool: llama.cpp, Ollama...
KNOWN_PROGRAMS = {"bash", "pip", "curl", "wget", "hf", "huggingface-cli", "chromium", "python", "torchrun", "lm_eval",
                  "nvidia-smi", "git", "apt-get", "sudo", "llama-cli", "llama-server", "ollama", "printf"}

TINY_MODEL = ["--model.n_layer=1", "--model.n_head=2", "--model.n_embd=16", "--model.block_size=96",
              "--model.mlp_hidden=32"]
TINY_TRAIN = ["--train.max_iters=4", "--train.eval_interval=2", "--train.eval_iters=1", "--train.batch_size=4",
              "--train.micro_batch_size=0", "--train.sample_tokens=8", "--train.device=cpu", "--train.dtype=float32",
              "--train.threads=1", "--train.progress=false", "--train.plot=false", "--train.report=false",
              "--train.tensorboard=false", "--train.peak_flops=1e12", "--train.max_time_s=0",
              "--optim.warmup_iters=1"]
GENERATE = ["--max-new-tokens=8", "--device=cpu"]
TINY = {  # appended to each command: what makes a guide's command run in about a second
    "train": TINY_MODEL + TINY_TRAIN,
    "tune": TINY_MODEL + TINY_TRAIN + ["--trials=2"],
    "prepare": ["--workers=1"],
    "data-info": ["--sample-tokens=16"],
    "sample": GENERATE,
    "chat": GENERATE,
    "eval": ["--max-new-tokens=8", "--limit=2"],
    "finetune": ["--max-steps=2", "--eval-interval=1", "--batch-size=2", "--device=cpu"],
}


@dataclass
class Command:
    line: int  # 1-based line of the guide where the command starts
    text: str  # the command as written (continuations joined)
    skip: str | None = None  # the reason of a `# docs: skip REASON`
    fails: bool = False


def commands(path: Path) -> list[Command]:
    """The commands of a markdown file's ```bash blocks."""
    found, lines, i = [], path.read_text(encoding="utf-8").splitlines(), 0
    while i < len(lines):
        if lines[i].strip() != "```bash":
            assert not re.match(r"\s*```(sh|shell|console|zsh)\s*$", lines[i]), \
                f"{path}:{i + 1}: shell blocks are ```bash (the docs test reads those)"
            i += 1
            continue
        i, block_skip = i + 1, None
        while lines[i].strip() != "```":
            start, text = i, lines[i]
            while text.endswith("\\"):
                i += 1
                text = text[:-1] + " " + lines[i].strip()
            heredoc = re.search(r"<<-?\s*'?(\w+)'?", text)
            if heredoc:
                end = lines.index(heredoc.group(1), i + 1)
                text, i = "\n".join(lines[start:end + 1]), end
            i += 1
            marker = re.search(r"#\s*docs:\s*(.*)$", text.splitlines()[0])
            bare = text.strip()
            if not bare or bare.startswith("#"):
                if marker:
                    block_skip = _skip_reason(marker.group(1), path, start)
                continue
            cmd = Command(start + 1, text, skip=block_skip)
            if marker:
                if marker.group(1).strip() == "fails":
                    cmd.fails = True
                else:
                    cmd.skip = _skip_reason(marker.group(1), path, start)
            found.append(cmd)
        i += 1
    return found


def _skip_reason(marker: str, path: Path, line: int) -> str:
    words = marker.split()
    assert len(words) >= 2 and words[0] == "skip" and words[1] in SKIP_REASONS, \
        f"{path}:{line + 1}: a docs marker is `# docs: skip REASON` ({', '.join(sorted(SKIP_REASONS))}) or " \
        f"`# docs: fails`, got {marker!r}"
    return words[1]


@dataclass
class Parsed:
    env: dict = field(default_factory=dict)
    feed: str | None = None  # a shell command whose output is piped into scratchgpt
    argv: list[str] | None = None  # scratchgpt's arguments, when the command is a scratchgpt command
    redirect: str | None = None  # `> FILE`: where its stdout goes


def parse(cmd: Command) -> Parsed:
    first = cmd.text.splitlines()[0]
    if "<<" in first:
        return Parsed()
    words = shlex.split(first, comments=True)
    out = Parsed()
    if "|" in words:
        cut = words.index("|")
        out.feed, words = shlex.join(words[:cut]), words[cut + 1:]
    if ">" in words:
        cut = words.index(">")
        out.redirect, words = words[cut + 1], words[:cut]
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        key, _, value = words.pop(0).partition("=")
        out.env[key] = value
    for j, word in enumerate(words):
        if word == "scratchgpt" and (j == 0 or words[j - 1] in ("-m", "--no-python")):
            out.argv = words[j + 1:]
            break
    return out


def check_parses(argv: list[str], where: str) -> None:
    """The command's own parser accepts these arguments (nothing runs)."""
    from scratchgpt.cli import COMMANDS, use_recipe

    assert argv and argv[0] in COMMANDS, f"{where}: not a scratchgpt command: {argv}"
    parser = COMMANDS[argv[0]][0]()
    if argv[0] == "train":
        use_recipe(parser, argv[1:])
    try:
        parser.parse_args(argv[1:])
    except SystemExit as e:
        pytest.fail(f"{where}: `scratchgpt {shlex.join(argv)}` does not parse (exit {e.code})")


def check_skipped(cmd: Command, parsed: Parsed, where: str) -> None:
    if parsed.argv is not None:
        check_parses(parsed.argv, where)
        return
    words = shlex.split(cmd.text.splitlines()[0], comments=True)
    while words and "=" in words[0]:
        words.pop(0)
    assert words and words[0] in KNOWN_PROGRAMS, f"{where}: unknown program in a skipped command: {cmd.text}"
    if words[0] in ("python", "bash") and len(words) > 1 and words[1].endswith((".py", ".sh")):
        assert (REPO / words[1]).is_file(), f"{where}: {words[1]} is not in the repository"
    if words[:3] == ["python", "-m", "pytest"] and "-m" in words[3:]:
        markers = (REPO / "pyproject.toml").read_text(encoding="utf-8")
        expr = words[3:][words[3:].index("-m") + 1]
        for name in re.findall(r"\w+", expr):
            assert name in ("not", "and", "or") or f'"{name}:' in markers, f"{where}: unknown marker {name}"


def run_scratchgpt(argv, parsed: Parsed, sandbox: Path) -> tuple[int, str, str]:
    """`scratchgpt ARGV` in this process (torch is imported once for every guide): (exit code, stdout, stderr)."""
    from scratchgpt.cli import main

    feed = b""
    if parsed.feed:
        feed = subprocess.run(["bash", "-c", parsed.feed], cwd=sandbox, capture_output=True, check=True).stdout
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as m, redirect_stdout(out), redirect_stderr(err):
        for key, value in parsed.env.items():
            m.setenv(key, value)
        m.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(feed), encoding="utf-8"))
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def tiny(argv: list[str]) -> list[str]:
    extra = list(TINY.get(argv[0], []))
    if argv[0] == "train" and ("--resume" in argv or any(a.startswith("--train.init_from") for a in argv)):
        extra = TINY_TRAIN  # the architecture is the saved run's
    if argv[0] == "tune" and "--resume" in argv:
        extra = []  # a search resumes with its saved (already tiny) settings
    if argv[0] == "prepare" and not ({"--tokenizer-from", "--merge"} & set(argv)) and "char" not in argv:
        extra += ["--vocab-size=300"]
    return argv + extra


def run_guide(path: Path, sandbox: Path, done: set[str] | None = None) -> dict:
    """Run (or parse) every command of one guide in `sandbox`; returns counts and the commands run."""
    with pytest.MonkeyPatch.context() as m:
        m.chdir(sandbox)
        return _run_commands(path, sandbox, done or set())


def _run_commands(path: Path, sandbox: Path, done: set[str]) -> dict:
    counts, ran = {"ran": 0, "parsed": 0, "shared": 0}, set()
    for cmd in commands(path):
        where = f"{path.relative_to(REPO)}:{cmd.line}"
        parsed = parse(cmd)
        if cmd.skip:
            check_skipped(cmd, parsed, where)
            counts["parsed"] += 1
            continue
        if cmd.text in done:
            counts["shared"] += 1  # the README or the English guide ran it in this folder
            continue
        if parsed.argv is not None:
            # a command shown failing gets no tiny sizes: they could override the very value it refuses
            code, out, err = run_scratchgpt(parsed.argv if cmd.fails else tiny(parsed.argv), parsed, sandbox)
            if parsed.redirect:
                (sandbox / parsed.redirect).write_text(out, encoding="utf-8")
        else:
            proc = subprocess.run(["bash", "-c", cmd.text], cwd=sandbox, capture_output=True, text=True, timeout=60)
            code, out, err = proc.returncode, proc.stdout, proc.stderr
        if cmd.fails:
            assert code != 0 and err.strip().startswith("error: ") and len(err.strip().splitlines()) == 1, \
                f"{where}: expected one error line and a non-zero exit, got {code}:\n{err[-2000:]}"
        else:
            assert code == 0, f"{where}: `{cmd.text}` exited {code}:\n{out[-2000:]}\n{err[-3000:]}"
        counts["ran"] += 1
        ran.add(cmd.text)
    return {**counts, "commands": ran}


ORDER = ["data", "training", "generation", "finetuning", "evaluation", "models", "serving", "tuning", "reliability"]


def guides() -> list[Path]:
    """The English guides, those another guide runs after first (`<!-- docs: after NAME.md -->`)."""
    rank = {name: i for i, name in enumerate(ORDER)}
    return sorted(DOCS.glob("*.md"), key=lambda p: (rank.get(p.stem, len(ORDER)), p.name))


def after(path: Path) -> list[str]:
    """The guides whose results this one starts from: `<!-- docs: after NAME.md -->` lines."""
    return re.findall(r"<!-- docs: after (\S+\.md) -->", path.read_text(encoding="utf-8"))


def zh_only() -> list[Path]:
    return sorted(p for p in (DOCS / "zh").glob("*.md") if not (DOCS / p.name).exists())


CHINESE = DOCS / "zh" / "corpus"

FIXTURES = {  # files that commands the test skips (downloads) would have fetched, or that a reader brings
    "input.txt": lambda: english_text(60_000),
    "my_texts/a.txt": lambda: english_text(30_000),
    "my_texts/b.md": lambda: english_text(50_000)[30_000:],
    "more.jsonl": lambda: "".join('{"text": %s}\n' % __import__("json").dumps(p) for p in
                                  english_text(20_000).split("\n\n") if p.strip()),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The folder a reader has after the README: fixtures, configs/, the Chinese corpus, and the README's run."""
    folder = tmp_path_factory.mktemp("docs") / "base"
    folder.mkdir()
    for name, make in FIXTURES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(make(), encoding="utf-8")
    shutil.copytree(REPO / "configs", folder / "configs")
    if CHINESE.exists():
        shutil.copytree(CHINESE, folder / "docs" / "zh" / "corpus")
    return folder


@pytest.fixture(scope="module")
def after_readme(base):
    counts = run_guide(REPO / "README.md", base)
    assert counts["ran"] >= 1
    return base, counts["commands"]


def test_readme_commands_run(after_readme):
    assert (after_readme[0] / "runs" / "default" / "latest").is_dir()


FINISHED: dict[str, tuple[Path, set]] = {}  # guide -> (its sandbox when done, the commands run there)


def finished(name: str, readme: tuple[Path, set], tmp: Path) -> tuple[Path, set]:
    """The sandbox of guide `name` (English, then Chinese) run to its end, with the guides it runs after."""
    if name not in FINISHED:
        start, done = readme
        for dep in after(DOCS / name):
            start, done = finished(dep, readme, tmp)
        sandbox = tmp / name.removesuffix(".md")
        shutil.copytree(start, sandbox)
        done = done | run_guide(DOCS / name, sandbox, done=done)["commands"]
        if (DOCS / "zh" / name).exists():
            done = done | run_guide(DOCS / "zh" / name, sandbox, done=done)["commands"]
        FINISHED[name] = sandbox, done
    return FINISHED[name]


@pytest.mark.parametrize("name", [p.name for p in guides()])
def test_guide_commands_run(name, after_readme, tmp_path_factory):
    """The guide's commands and its Chinese version's, from the README's folder (or the guides it runs after)."""
    sandbox, _ = finished(name, after_readme, tmp_path_factory.mktemp("guides"))
    assert sandbox.is_dir()


@pytest.mark.parametrize("name", [p.name for p in zh_only()])
def test_chinese_guide_commands_run(name, after_readme, tmp_path):
    """A guide only the Chinese docs have (the tutorial's path)."""
    start, done = after_readme
    for dep in after(DOCS / "zh" / name):
        start, done = finished(dep, after_readme, tmp_path)
    sandbox = tmp_path / "sandbox"
    shutil.copytree(start, sandbox)
    run_guide(DOCS / "zh" / name, sandbox, done=done)


def test_readme_is_a_landing_page():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 150
    for guide in guides():
        assert f"docs/{guide.name}" in readme, f"README's table of guides misses docs/{guide.name}"


def test_every_english_guide_has_a_chinese_one():
    assert [p.name for p in guides() if not (DOCS / "zh" / p.name).exists()] == []


EXTERNAL_FLAGS = {  # flags of the other programs the guides show (pip, torchrun, hf, chromium, lm_eval, bench/)
    "--extra-index-url", "--headless", "--hide-scrollbars", "--local-dir", "--master_addr", "--master_port",
    "--max-restarts", "--model_args", "--nanogpt", "--pairs", "--nnodes", "--no-python", "--no-sandbox",
    "--node_rank", "--nproc_per_node", "--rdzv_backend", "--rdzv_endpoint", "--rdzv_id", "--repo-type",
    "--screenshot", "--standalone", "--window-size", "--help", "--tasks", "--model", "--master"}  # --master_*


def test_every_flag_the_guides_name_exists():
    """A `--flag` named anywhere in README.md or docs/ (prose too) is a flag of some scratchgpt command, or of one
    of the other programs the guides show: a guide never documents a flag that isn't there."""
    from scratchgpt.cli import COMMANDS
    from scratchgpt.flags import _all_parsers

    known = set(EXTERNAL_FLAGS)
    for build, _, _ in COMMANDS.values():
        for parser in _all_parsers(build()):
            for action in parser._actions:
                known.update(action.option_strings)
    unknown = {}
    for page in [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]:
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9_.-]*[a-z0-9]", page.read_text(encoding="utf-8")):
            if flag not in known:
                unknown.setdefault(flag, str(page.relative_to(REPO)))
    assert unknown == {}
