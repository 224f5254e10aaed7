"""The README and the guides under docs/ stay true to the code, without training anything:

* every relative link (and its #anchor) points at a file (and heading) that exists;
* every ``fromzero VERB`` in a ```bash block is a verb of the CLI, and every ``--flag`` after it
  appears in that verb's ``--help`` (recipe overrides ``--section.key`` and their short form
  ``--key`` included: ``--help`` lists every recipe key);
* the README stays short, and every figure it states is backed by docs/benchmarks.md.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
BENCHMARKS = ROOT / "docs" / "benchmarks.md"

# Verbs whose recipe keys are documented in another verb's --help (distill runs as the teacher's
# fine-tuning task; tune runs pretraining or fine-tuning recipes).
HELP_ALSO = {"distill": ("finetune",), "tune": ("pretrain", "finetune"), "crossval": ("finetune",)}
# Verbs with an action word after them: `fromzero data prepare`, `fromzero tokenizer train`.
WITH_ACTION = {"data", "tokenizer"}


def _page_id(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# --------------------------------------------------------------------------------------------
# Markdown: code blocks, links, headings


def _split_fences(text: str) -> list[tuple[str, str]]:
    """The page as [(info, body)]: fenced code blocks (info: the fence's language, "plain" if none)
    and the prose between them (info "prose")."""
    parts: list[tuple[str, str]] = []
    prose: list[str] = []
    block: list[str] | None = None
    info = ""
    for line in text.splitlines():
        fence = re.match(r"^\s*```(.*)$", line)
        if block is None and fence:
            parts.append(("prose", "\n".join(prose)))
            prose, block, info = [], [], fence.group(1).strip() or "plain"
        elif block is not None and re.match(r"^\s*```\s*$", line):
            parts.append((info, "\n".join(block)))
            block = None
        elif block is not None:
            block.append(line)
        else:
            prose.append(line)
    parts.append(("prose", "\n".join(prose)))
    return parts


def _prose(text: str) -> str:
    """The text outside fenced code blocks, inline code removed."""
    return "\n".join(re.sub(r"`[^`]*`", "", body) for info, body in _split_fences(text) if info == "prose")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces -> '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    text = text.replace("`", "").replace("*", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@functools.lru_cache(maxsize=None)
def _anchors(path: Path) -> frozenset[str]:
    slugs: list[str] = []
    for info, body in _split_fences(path.read_text(encoding="utf-8")):
        if info != "prose":
            continue
        for line in body.splitlines():
            heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
            if heading:
                slug = _slug(heading.group(1))
                slugs.append(slug if slug not in slugs else f"{slug}-{slugs.count(slug)}")
    return frozenset(slugs)


def _links(path: Path) -> list[str]:
    prose = "\n".join(body for info, body in _split_fences(path.read_text(encoding="utf-8")) if info == "prose")
    prose = re.sub(r"`[^`]*`", "", prose)
    return re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose)


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in _links(page):
        if re.match(r"^[a-z][a-z+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        rel = dest.relative_to(ROOT).as_posix() if dest.is_relative_to(ROOT) else str(dest)
        if not dest.exists():
            broken.append(f"{target}: no file {rel}")
            continue
        if anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {rel}")
    assert not broken, broken


# --------------------------------------------------------------------------------------------
# Commands in ```bash blocks


def _fromzero_cmd() -> list[str]:
    script = Path(sys.executable).parent / "fromzero"
    return [str(script)] if script.exists() else [sys.executable, "-m", "fromzero"]


def _run_help(*words: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([*_fromzero_cmd(), *words, "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, (words, proc.stderr[-2000:])
    return proc.stdout


@functools.lru_cache(maxsize=None)
def _verbs() -> frozenset[str]:
    text = _run_help()
    listing = text.split("positional arguments:", 1)[1].split("options:", 1)[0]
    return frozenset(re.findall(r"^ {4}([a-z][a-z-]*)\b", listing, flags=re.M))


@functools.lru_cache(maxsize=None)
def _help(*words: str) -> str:
    text = _run_help(*words)
    for other in HELP_ALSO.get(words[0], ()):
        text += _run_help(other)
    return text


def _flag_documented(flag: str, help_text: str) -> bool:
    if re.search(re.escape(flag) + r"(?![\w.-])", help_text):
        return True
    key = flag[2:]
    if "." not in key:  # the short form of a recipe key: --lr means --train.lr
        return re.search(r"--[a-z_]+\." + re.escape(key) + r"(?![\w.-])", help_text) is not None
    return False


def _commands(script: str) -> list[tuple[list[str], str]]:
    """[(verb words, the rest of the command)] of every `fromzero VERB ...` in a bash script."""
    script = re.sub(r"\\\n", " ", script)
    found = []
    for line in script.splitlines():
        line = re.sub(r"\$?'[^']*'|\"(?:[^\"\\]|\\.)*\"", "''", line)  # quoted strings hold no flags
        line = re.sub(r"(^|\s)#.*$", "", line)  # comments
        for segment in re.split(r"\|\||&&|[|;&]", line):
            match = re.search(r"(?:^|[\s/])fromzero\s+([a-z][a-z-]*)(?:\s+([a-z][a-z-]*))?(.*)$", segment)
            if not match:
                continue
            verb, action, rest = match.groups()
            if verb in WITH_ACTION:
                found.append(([verb, action or ""], rest))
            else:
                found.append(([verb], (action or "") + (rest or "")))
    return found


def _bash_commands() -> list[tuple[str, list[str], str]]:
    out = []
    for page in PAGES:
        for info, body in _split_fences(page.read_text(encoding="utf-8")):
            if info in ("bash", "sh", "shell", "console"):
                out += [(_page_id(page), words, rest) for words, rest in _commands(body)]
    return out


def test_the_docs_show_commands() -> None:
    pages = {page for page, _, _ in _bash_commands()}
    assert "README.md" in pages and len(pages) >= 10, pages


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_bash_commands_use_real_verbs_and_flags(page: Path) -> None:
    verbs = _verbs()
    wrong = []
    for page_id, words, rest in _bash_commands():
        if page_id != _page_id(page):
            continue
        if words[0] not in verbs:
            wrong.append(f"fromzero {words[0]}: no such verb")
            continue
        if words[0] in WITH_ACTION and not words[1]:
            wrong.append(f"fromzero {words[0]}: no action")
            continue
        help_text = _help(*words)
        for flag in re.findall(r"(?<![\w-])--[A-Za-z][\w.@-]*", rest):
            if not _flag_documented(flag, help_text):
                wrong.append(f"fromzero {' '.join(words)} {flag}: not in its --help")
    assert not wrong, wrong


def test_command_parser_reads_what_the_docs_write() -> None:
    script = ("torchrun --nproc_per_node 2 -m fromzero pretrain --config r.yaml --dist.strategy ddp\n"
              "printf 'x --no\\n' | .venv/bin/fromzero chat --checkpoint c --temperature 0  # --not-this\n"
              "fromzero data prepare --corpus a \\\n  --out b &  # background\n"
              "fromzero generate --prompt $'a --b\\nc' --chat\n")
    assert [(words, rest.split()) for words, rest in _commands(script)] == [
        (["pretrain"], ["--config", "r.yaml", "--dist.strategy", "ddp"]),
        (["chat"], ["--checkpoint", "c", "--temperature", "0"]),
        (["data", "prepare"], ["--corpus", "a", "--out", "b"]),
        (["generate"], ["--prompt", "''", "--chat"]),
    ]
    assert _flag_documented("--lr", "  --train.lr (default: 0.001)  Peak learning rate")
    assert not _flag_documented("--lr", "  --train.lr_decay (default: 1)")
    assert _flag_documented("--out_dir", "  --out_dir (default: '')")


# --------------------------------------------------------------------------------------------
# The README: short, and every figure it states is in docs/benchmarks.md

# Numbers in the README's prose that are not measurements.
NOT_FIGURES = {"3.11"}


def _figures(text: str) -> set[str]:
    """Measured-looking numbers: decimals (0.660, 1.75x), thousands (2,089), times (666 s, 45 minutes)."""
    found = set(re.findall(r"(?<![\w.,])\d{1,3}(?:,\d{3})+(?![\d])", text))
    found |= set(re.findall(r"(?<![\w.,])\d+\.\d+(?![\d.])", text))
    found |= set(re.findall(r"(?<![\w.,])\d+ (?:s|min|minutes)\b", text))
    return found - NOT_FIGURES


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 180, len(lines)


def test_readme_figures_are_backed_by_benchmarks_md() -> None:
    readme = README.read_text(encoding="utf-8")
    block = readme.split("<!-- first-hour -->", 1)[1].split("<!-- /first-hour -->", 1)[0]
    text = _prose(readme.replace(block, ""))
    # The Development block's timing comment is a figure too.
    text += "\n".join(body for info, body in _split_fences(readme) if info == "bash" and "make test" in body)
    benchmarks = BENCHMARKS.read_text(encoding="utf-8")
    figures = _figures(text)
    assert len(figures) >= 15, figures  # the headline table is there
    missing = sorted(f for f in figures if f not in benchmarks)
    assert not missing, f"README figures not in docs/benchmarks.md: {missing}"


def test_readme_benchmark_rows_link_to_benchmarks_md() -> None:
    readme = README.read_text(encoding="utf-8")
    section = readme.split("## Benchmarks", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith(("| what", "| ---"))]
    assert len(rows) >= 5, rows
    assert all("](docs/benchmarks.md#" in row for row in rows), rows


def test_anchor_slugs_are_githubs() -> None:
    assert _slug("GPU: GPT-2 124M on one NVIDIA H200") == "gpu-gpt-2-124m-on-one-nvidia-h200"
    assert _slug("llama.cpp") == "llamacpp"
    assert _slug("The README's own figures") == "the-readmes-own-figures"
    assert _slug("`fromzero: command not found`") == "fromzero-command-not-found"
    assert "the-first-hour" in _anchors(README)
