"""Shared fixtures: a tiny English corpus, its char-level dataset and tiny GPT recipes.

Everything here is small enough that a full ``pretrain`` of a 2-layer, 32-wide GPT for ~40 steps
takes a few seconds on a 2-core CPU. Tests that train use :func:`make_recipe` (a factory) or
:func:`tiny_recipe` (its defaults) and run ``fromzero.cli.main`` in-process.

torch is limited to one intra-op thread for the whole test session (override with
``FROMZERO_TEST_THREADS``): the models are tiny, and on a shared 2-core machine a second thread
only adds contention (a 40-step run goes from ~4 s to ~18 s when another process is busy).
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

# Subprocesses started by tests inherit this too.
os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("FROMZERO_TEST_THREADS", "1"))


def pytest_configure(config: pytest.Config) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("FROMZERO_TEST_THREADS", "1")))


# ---------------------------------------------------------------------------------------------
# Corpus


_PARAGRAPHS = [
    "The river ran slowly past the old mill, and the miller's daughter watched the water turn "
    "the great wheel. She had lived there all her life, and she knew every sound the wheel could "
    "make: the groan of wet oak in the morning, the quick clatter when the sluice was opened wide.",
    "In the evening the village gathered at the inn. Farmers talked of rain and prices; the "
    "blacksmith told the same story he had told for twenty years, and nobody minded, because he "
    "told it well. Children fell asleep on the benches by the fire.",
    "A letter arrived one Tuesday, sealed with green wax. It was addressed to the miller himself, "
    "in a careful hand, and it asked whether he would sell the mill. He read it twice, folded it, "
    "and put it behind the clock without a word.",
    "Winter came early that year. Snow covered the fields by the first week of November, the "
    "river froze at its edges, and the wheel stood still for the first time anyone could "
    "remember. The daughter walked to the bridge each day to look at the ice.",
    "Some questions have no quick answers. How much is a place worth? What do we owe the people "
    "who built it? Is it better to keep a thing as it was, or to let it change? She thought "
    "about these questions often, and wrote her thoughts in a small brown notebook.",
    "By spring the letter had been answered. The mill would not be sold; instead it would be "
    "repaired, with new stones and a new roof, and the daughter would learn to run it. On the "
    "first warm morning the ice broke, the wheel turned again, and the whole village came to see.",
]


def make_corpus_text(target_chars: int = 8000, seed: int = 0) -> str:
    """Deterministic English-like text: the paragraphs above, their sentences reshuffled."""
    rng = random.Random(seed)
    sentences = [s.strip() + "." for p in _PARAGRAPHS for s in p.split(".") if s.strip()]
    parts = list(_PARAGRAPHS)  # every paragraph once, verbatim
    total = sum(len(p) for p in parts)
    while total < target_chars:
        para = " ".join(rng.sample(sentences, k=rng.randint(3, 6)))
        parts.append(para)
        total += len(para) + 2
    return "\n\n".join(parts) + "\n"


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ~8 KB UTF-8 text file of varied English prose (same text in every session)."""
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text(make_corpus_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_data_dir(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``prepare_dataset`` of :func:`tiny_corpus` with the char tokenizer. Treat as read-only."""
    from fromzero.data.text import prepare_dataset

    out = tmp_path_factory.mktemp("data") / "tiny-char"
    prepare_dataset([str(tiny_corpus)], "char", out, progress=False)
    return out


# ---------------------------------------------------------------------------------------------
# Recipes


def tiny_recipe_dict(data_dir: Path, out_dir: Path | str) -> dict[str, Any]:
    """The tiny recipe as a dict (sections as in recipes/shakespeare-char.yaml)."""
    return {
        "model": {"vocab_size": 0, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32,
                  "dropout": 0.0, "bias": True},
        "train": {
            "batch_size": 4, "max_steps": 40, "lr": 3.0e-3, "min_lr": 3.0e-4, "warmup_steps": 5,
            # Fixed (not 0 = max_steps) so that a run cut short with a smaller max_steps has the
            # same schedule as the full run: needed for the exact-resume comparisons.
            "decay_steps": 40,
            "weight_decay": 0.1, "grad_clip": 1.0, "grad_accum": 1,
            "eval_every": 10, "eval_batches": 2, "log_interval": 5,
            "device": "cpu", "dtype": "float32", "compile": False, "seed": 1337,
        },
        "data": {"dir": str(data_dir)},
        "out_dir": str(out_dir),
    }


def _deep_update(base: dict, update: dict) -> dict:
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v
    return base


RecipeFactory = Callable[..., Path]


def _recipe_writer(directory: Path, data_dir: Path) -> RecipeFactory:
    """``write(name="tiny", out_dir=None, **sections)`` -> path of a recipe YAML in ``directory``.

    ``sections`` update the tiny recipe, e.g. ``write(train={"max_steps": 5})``. The run
    directory defaults to ``directory / "runs" / name`` (``out_dir=""``: fromzero's default).
    """

    def write(name: str = "tiny", out_dir: Path | str | None = None, **sections: Any) -> Path:
        run_dir = os.fspath(out_dir) if out_dir is not None else directory / "runs" / name
        data = _deep_update(tiny_recipe_dict(data_dir, run_dir), sections)
        path = directory / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        return path

    return write


@pytest.fixture(scope="session")
def recipe_writer(tiny_data_dir: Path) -> Callable[[Path], RecipeFactory]:
    """``recipe_writer(directory)`` -> a recipe factory writing there (for module-scoped runs)."""
    return lambda directory: _recipe_writer(Path(directory), tiny_data_dir)


@pytest.fixture
def make_recipe(tmp_path: Path, tiny_data_dir: Path) -> RecipeFactory:
    """Factory for tiny recipes whose run directories live under this test's tmp_path."""
    return _recipe_writer(tmp_path, tiny_data_dir)


@pytest.fixture
def tiny_recipe(make_recipe: RecipeFactory) -> Path:
    """The default tiny recipe (40 steps, eval every 10, log every 5); run dir tmp_path/runs/tiny."""
    return make_recipe()


@pytest.fixture(scope="session")
def run_dir_of() -> Callable[[Path], Path]:
    """``run_dir_of(recipe)`` -> the recipe's out_dir."""
    return lambda recipe: Path(yaml.safe_load(Path(recipe).read_text(encoding="utf-8"))["out_dir"])


# ---------------------------------------------------------------------------------------------
# Running the CLI


class CliResult:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    @property
    def err_lines(self) -> list[str]:
        return self.err.splitlines()

    def __repr__(self) -> str:  # shown by pytest when an assertion fails
        return f"CliResult(code={self.code}, out={self.out[-2000:]!r}, err={self.err[-2000:]!r})"


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """``cli("pretrain", "--config", ...)`` runs ``fromzero.cli.main`` in-process.

    ``SystemExit(n)`` (argparse's --help and usage errors) becomes exit code n, as for the
    console script; any other exception propagates (a traceback is a failure).
    """
    from fromzero.cli import main

    def run(*argv: str | os.PathLike[str]) -> CliResult:
        capsys.readouterr()  # drop anything printed before
        try:
            code = main([os.fspath(a) for a in argv])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def _assert_one_line_error(result: CliResult, *fragments: str) -> str:
    """Exit 2, exactly one stderr line, starting with ``error: ``, no traceback; returns it."""
    assert result.code == 2, result
    assert "Traceback" not in result.err, result
    assert len(result.err_lines) == 1, result
    line = result.err_lines[0]
    assert line.startswith("error: "), result
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


@pytest.fixture(scope="session")
def one_line_error() -> Callable[..., str]:
    """``one_line_error(result, *fragments)``: exit 2 + one ``error: `` line holding fragments."""
    return _assert_one_line_error


@pytest.fixture(scope="session")
def console_script() -> Path:
    """The installed ``fromzero`` console script of the interpreter running the tests."""
    path = Path(sys.executable).parent / "fromzero"
    if not path.exists():
        pytest.skip(f"console script not found next to {sys.executable}")
    return path


# ---------------------------------------------------------------------------------------------
# MNIST (the built-in, fetched once into $FROMZERO_HOME): a small real slice for learning tests


@pytest.fixture(scope="session")
def mnist_slice() -> dict[str, Any]:
    """{"train": 512, "val": 64, "test": 64} real MNIST digits (ImageSplit), loaded once per session;
    skipped when the MNIST file cannot be fetched (offline, no cache)."""
    from fromzero.data.mnist import ImageSplit, load_mnist
    from fromzero.errors import FromzeroError

    try:
        data = load_mnist()
    except FromzeroError as e:
        pytest.skip(f"MNIST not available: {e}")
    sizes = {"train": 512, "val": 64, "test": 64}
    return {k: ImageSplit(data[k].images[:n].clone(), data[k].labels[:n].clone()) for k, n in sizes.items()}
