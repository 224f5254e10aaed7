"""docs/tutorial.md says what its code prints, its worked Adam step is right, and its commands exist.

* Every ```python block of sections 1-5 runs, in document order, in one shared namespace (the
  tutorial builds up: later blocks reuse earlier names). A ```text block that immediately
  follows a python block (only blank lines between) is that block's expected stdout, compared
  exactly; a python block without one must print nothing.
* The worked single Adam step (section 5.3) is recomputed here independently, with
  torch.autograd and ``torch.optim.Adam`` at the settings the document prints, and every number
  of the document's output and prose is compared with it.
* Section 6's shell commands are not run (they train models), but each ``fromzero`` command's
  verb and options must exist in the real parser, the recipes it names must exist, and the YAML
  excerpts must agree with the recipe files they quote.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import io
import math
import re
import shlex
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "tutorial.md"
EXECUTED_SECTIONS = range(1, 6)
# Verbs the tutorial shows that are still being added to the CLI: checked as soon as they exist.
PENDING_VERBS = {"explain"}


@dataclass(frozen=True)
class Block:
    """One fenced code block of the markdown document."""

    section: int  # number of the enclosing "## N." heading (0 before the first)
    start: int  # 1-based line of the opening fence
    end: int  # 1-based line of the closing fence
    lang: str
    text: str


@dataclass(frozen=True)
class Example:
    """A python block and the stdout the document shows for it."""

    section: int
    line: int
    code: str
    expected: str  # "" when the document shows no output block

    @property
    def id(self) -> str:
        return f"section{self.section}-line{self.line}"


def parse_blocks(lines: list[str]) -> list[Block]:
    """Fenced blocks with their section; fences are lines starting with ``` (no nesting)."""
    blocks: list[Block] = []
    section = 0
    opened: tuple[int, str] | None = None
    body: list[str] = []
    for number, line in enumerate(lines, start=1):
        if opened is None:
            heading = re.match(r"## (\d+)\.", line)
            if heading:
                section = int(heading.group(1))
            elif line.startswith("```"):
                opened, body = (number, line[3:].strip()), []
        elif line.strip() == "```":
            blocks.append(Block(section, opened[0], number, opened[1], "\n".join(body) + ("\n" if body else "")))
            opened = None
        else:
            body.append(line)
    assert opened is None, f"docs/tutorial.md: the code block opened at line {opened[0]} is never closed"
    return blocks


def _follows(first: Block, second: Block, lines: list[str]) -> bool:
    """True if only blank lines separate the two blocks."""
    return all(not lines[i].strip() for i in range(first.end, second.start - 1))


def parse_examples(lines: list[str]) -> list[Example]:
    blocks = parse_blocks(lines)
    examples = []
    for i, block in enumerate(blocks):
        if block.lang != "python" or block.section not in EXECUTED_SECTIONS:
            continue
        following = blocks[i + 1] if i + 1 < len(blocks) else None
        has_output = following is not None and following.lang == "text" and _follows(block, following, lines)
        examples.append(Example(block.section, block.start, block.text, following.text if has_output else ""))
    return examples


LINES = DOC.read_text(encoding="utf-8").splitlines()
BLOCKS = parse_blocks(LINES)
EXAMPLES = parse_examples(LINES)


@functools.cache
def run_examples() -> tuple[tuple[str, str | None], ...]:
    """(stdout, traceback or None) of every example, run in order in one namespace."""
    namespace: dict[str, Any] = {"__name__": "tutorial"}
    results = []
    for example in EXAMPLES:
        out = io.StringIO()
        error = None
        # Line numbers in tracebacks point into docs/tutorial.md.
        code = compile("\n" * example.line + example.code, str(DOC), "exec")
        try:
            with contextlib.redirect_stdout(out):
                exec(code, namespace)
        except Exception:  # reported by the test of this block
            error = traceback.format_exc()
        results.append((out.getvalue(), error))
    return tuple(results)


def test_document_has_the_sections_and_examples():
    headings = [int(m.group(1)) for line in LINES if (m := re.match(r"## (\d+)\.", line))]
    assert headings == [1, 2, 3, 4, 5, 6]
    for section in EXECUTED_SECTIONS:
        shown = [e for e in EXAMPLES if e.section == section and e.expected.strip()]
        assert shown, f"section {section} has no python example with its printed output"


@pytest.mark.parametrize("index", range(len(EXAMPLES)), ids=[e.id for e in EXAMPLES])
def test_example_prints_what_the_document_shows(index: int):
    example = EXAMPLES[index]
    actual, error = run_examples()[index]
    assert error is None, f"docs/tutorial.md, the python block at line {example.line} raised:\n{error}"
    expected = example.expected.rstrip("\n")
    actual = actual.rstrip("\n")
    if actual != expected:
        diff = "\n".join(difflib.unified_diff(expected.splitlines(), actual.splitlines(),
                                              "document", "actual output", lineterm=""))
        pytest.fail(f"docs/tutorial.md, the python block at line {example.line} prints something else:\n{diff}")


# ---------------------------------------------------------------------------------------------
# The worked Adam step, recomputed independently


def _adam_example() -> Example:
    found = [e for e in EXAMPLES if re.search(r"^w_new\s*=", e.expected, re.M) and "m_hat" in e.expected]
    assert len(found) == 1, "expected exactly one worked Adam step (an output with m_hat and w_new)"
    return found[0]


def _parse_adam_output(text: str) -> tuple[dict[str, float], dict[str, str]]:
    """(settings from the first line "x = 2.0, y = 1, ...", the named values of the other lines as printed)."""
    first, *rest = text.strip().splitlines()
    settings = {k: float(v) for k, v in re.findall(r"(\w+) = ([^,\s]+)", first)}
    values = {}
    for line in rest:
        name, value = line.split("=")
        values[name.strip()] = value.strip()
    return settings, values


def _same_digits(shown: str, value: float) -> bool:
    """True if ``value`` rounded to as many decimals as ``shown`` has is exactly ``shown``."""
    decimals = len(shown.split(".")[1]) if "." in shown else 0
    return f"{value:.{decimals}f}" == shown


def _torch_adam_step(settings: dict[str, float]) -> dict[str, float]:
    """One Adam step on z = w * x (no bias), binary cross-entropy, by autograd + torch.optim.Adam."""
    import torch
    import torch.nn.functional as F

    assert settings["t"] == 1, "the worked example is the first Adam step"
    w = torch.tensor([settings["w"]], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([w], lr=settings["lr"], betas=(settings["beta1"], settings["beta2"]),
                                 eps=settings["eps"])
    z = w * settings["x"]
    p = torch.sigmoid(z)
    loss = F.binary_cross_entropy_with_logits(z, torch.tensor([settings["y"]], dtype=torch.float64))
    loss.backward()
    g = w.grad.item()
    w_old = w.item()
    optimizer.step()
    state = optimizer.state[w]
    assert int(state["step"]) == 1
    m, v = state["exp_avg"].item(), state["exp_avg_sq"].item()
    return {"z": z.item(), "p": p.item(), "loss": loss.item(), "g": g, "m": m, "v": v,
            "m_hat": m / (1 - settings["beta1"]), "v_hat": v / (1 - settings["beta2"]),
            "step": w_old - w.item(), "w_new": w.item()}


def _hand_adam_step(s: dict[str, float]) -> dict[str, float]:
    """The same step from the closed forms: dL/dw = (sigmoid(wx) - y) x; at t = 1, m_hat = g, v_hat = g^2."""
    z = s["w"] * s["x"]
    p = 1 / (1 + math.exp(-z))
    loss = math.log1p(math.exp(-z)) + (1 - s["y"]) * z  # -y log p - (1 - y) log(1 - p)
    g = (p - s["y"]) * s["x"]
    step = s["lr"] * g / (abs(g) + s["eps"])
    return {"z": z, "p": p, "loss": loss, "g": g, "m": (1 - s["beta1"]) * g, "v": (1 - s["beta2"]) * g * g,
            "m_hat": g, "v_hat": g * g, "step": step, "w_new": s["w"] - step}


def test_worked_adam_step_matches_torch_optim_adam():
    settings, shown = _parse_adam_output(_adam_example().expected)
    assert set(settings) == {"x", "y", "w", "lr", "beta1", "beta2", "eps", "t"}
    names = ["z", "p", "loss", "g", "m", "v", "m_hat", "v_hat", "step", "w_new"]
    assert list(shown) == names
    by_torch = _torch_adam_step(settings)
    by_hand = _hand_adam_step(settings)
    for name in names:
        # every printed digit is right: torch's and the closed form's values round to it
        assert _same_digits(shown[name], by_torch[name]), f"{name} = {shown[name]}, torch.optim.Adam: {by_torch[name]!r}"
        assert _same_digits(shown[name], by_hand[name]), f"{name} = {shown[name]}, closed form: {by_hand[name]!r}"
        assert by_torch[name] == pytest.approx(by_hand[name], rel=1e-12, abs=1e-15), name
    # the step moves the weight against the gradient, by about lr (bias-corrected first step)
    assert float(shown["w_new"]) > settings["w"] and float(shown["step"]) == pytest.approx(-settings["lr"], abs=1e-7)


def _section_prose(title_prefix: str) -> str:
    """The text of the "### title_prefix..." subsection outside code blocks."""
    start = next(i for i, line in enumerate(LINES) if line.startswith(f"### {title_prefix}"))
    inside, prose = False, []
    for line in LINES[start + 1:]:
        if line.startswith("```"):
            inside = not inside
        elif not inside:
            if line.startswith("#"):  # the next heading
                break
            prose.append(line)
    return "\n".join(prose)


def test_worked_adam_step_prose_states_the_model_and_its_numbers():
    prose = _section_prose("5.3")
    assert "no bias" in prose
    settings, _ = _parse_adam_output(_adam_example().expected)
    values = _torch_adam_step(settings)
    candidates = [abs(v) for v in values.values()] + [abs(values["g"]) + settings["eps"]]
    numbers = re.findall(r"\d+\.\d{9,}", prose)
    assert len(numbers) >= 8, "the hand derivation should show its numbers"
    for number in numbers:
        assert any(_same_digits(number, c) for c in candidates), f"{number} in section 5.3 is not a value of the step"


# ---------------------------------------------------------------------------------------------
# Section 6: the commands and recipe excerpts


def _subparsers(parser) -> dict[str, Any]:
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _section6_commands() -> list[tuple[int, list[str]]]:
    commands = []
    for block in BLOCKS:
        if block.section == 6 and block.lang in ("bash", "sh", "shell"):
            for offset, line in enumerate(block.text.splitlines(), start=1):
                if line.startswith("fromzero "):
                    commands.append((block.start + offset, shlex.split(line)))
    return commands


def test_section6_commands_exist_in_the_cli():
    from fromzero.cli import build_parser

    commands = _section6_commands()
    assert len(commands) >= 15
    verbs = _subparsers(build_parser())
    checked = set()
    for line, tokens in commands:
        verb = tokens[1]
        if verb not in verbs:
            assert verb in PENDING_VERBS, f"docs/tutorial.md:{line}: fromzero has no command {verb!r}"
            continue
        parser = verbs[verb]
        if _subparsers(parser):  # data prepare, tokenizer train, convert from-hf
            parser = _subparsers(parser)[tokens[2]]
        help_text = parser.format_help()
        for token in tokens[2:]:
            if token.startswith("--"):
                option = token.split("=", 1)[0]
                assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w.-])", help_text), \
                    f"docs/tutorial.md:{line}: `fromzero {verb}` has no option {option}"
            elif token.startswith("recipes/"):
                assert (ROOT / token).is_file(), f"docs/tutorial.md:{line}: {token} does not exist"
        checked.add(verb)
    assert {"data", "pretrain", "generate", "evaluate", "finetune", "serve", "quantize", "prune", "distill",
            "export", "tune"} <= checked


def _is_subset(excerpt: Any, full: Any) -> bool:
    if isinstance(excerpt, dict):
        return isinstance(full, dict) and all(k in full and _is_subset(v, full[k]) for k, v in excerpt.items())
    return excerpt == full


def test_section6_yaml_excerpts_match_the_recipes():
    excerpts = [b for b in BLOCKS if b.section == 6 and b.lang == "yaml"]
    assert excerpts
    previous_end = 0
    for block in BLOCKS:
        if block in excerpts:
            text_before = "\n".join(LINES[previous_end:block.start - 1])
            named = re.findall(r"recipes/[\w.-]+\.yaml", text_before)
            assert named, f"docs/tutorial.md:{block.start}: say which recipe the YAML excerpt comes from"
            recipe = yaml.safe_load((ROOT / named[-1]).read_text(encoding="utf-8"))
            assert _is_subset(yaml.safe_load(block.text), recipe), \
                f"docs/tutorial.md:{block.start}: the excerpt differs from {named[-1]}"
        previous_end = block.end
