"""``fromzero data prepare`` and ``fromzero tokenizer train``: a corpus into token files, a tokenizer."""

from __future__ import annotations

import argparse
from pathlib import Path

from fromzero.cli import _add_parser
from fromzero.errors import FromzeroError


def _add_data(sub: argparse._SubParsersAction) -> None:
    data = _add_parser(sub, "data", "prepare datasets")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    prep = _add_parser(
        data_sub, "prepare", "corpus -> tokenizer -> train.bin / val.bin / meta.json / tokenizer.json",
        description="Tokenize a corpus into memory-mappable token files (90/10 train/val split, "
        "the last 10% of the text is validation).\n\nexample:\n"
        "  fromzero data prepare --corpus shakespeare --tokenizer char --out data/shakespeare-char",
        func=_cmd_data_prepare,
    )
    prep.add_argument("--corpus", nargs="+", required=True, metavar="CORPUS",
                      help="shakespeare | python-stdlib | a file, folder or glob of UTF-8 text (several allowed)")
    prep.add_argument("--tokenizer", default="char", metavar="SPEC",
                      help="char | bpe:N (train byte-level BPE with vocab N) | path to a tokenizer.json")
    prep.add_argument("--out", required=True, help="output directory")
    prep.add_argument("--val-fraction", type=float, default=0.1, help="share of the text held out for validation")
    prep.add_argument("--force", action="store_true", help="replace an existing output directory")
    prep.add_argument("--quiet", action="store_true", help="no progress bar")
    export = _add_parser(
        data_sub, "export-images", "write a built-in image dataset as PNG files (ImageFolder or COCO detection)",
        description="Write a built-in image dataset in the layout `finetune --config` reads as data.source for "
        "your own images.\nmnist: DIR/{train,val,test}/<class>/<index>.png plus meta.json (an ImageFolder).\n"
        "mnist-detection: DIR/{train,val,test}/annotations.json (COCO object detection) + images/*.png, plus "
        "meta.json.\n\nexamples:\n"
        "  fromzero data export-images mnist data/mnist-png\n"
        "  fromzero data export-images mnist-detection data/mnist-detection",
        func=_cmd_data_export_images,
    )
    export.add_argument("dataset", choices=("mnist", "mnist-detection"),
                        help="built-in dataset: mnist (50k/10k/10k 28x28 digits) | mnist-detection (10k/1k/1k "
                        "64x64 scenes of 1-5 digits with boxes, COCO JSON)")
    export.add_argument("out", help="output folder (must not exist unless --force)")
    export.add_argument("--force", action="store_true", help="replace an existing output folder")


def _add_tokenizer(sub: argparse._SubParsersAction) -> None:
    tok = _add_parser(sub, "tokenizer", "train tokenizers")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    train = _add_parser(tok_sub, "train", "train a tokenizer on a corpus and save tokenizer.json",
                        description="Train a byte-level BPE (or char-level) tokenizer with Hugging Face "
                        "`tokenizers`.\n\nexample:\n  fromzero tokenizer train --corpus python-stdlib "
                        "--vocab-size 8192 --out tok.json", func=_cmd_tokenizer_train)
    train.add_argument("--corpus", nargs="+", required=True, help="as for `data prepare`")
    train.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size (>= 257)")
    train.add_argument("--kind", choices=("bpe", "char"), default="bpe", help="tokenizer type")
    train.add_argument("--out", required=True, help="output tokenizer.json path")
    train.add_argument("--force", action="store_true", help="overwrite an existing file")


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from fromzero.data.text import prepare_dataset

    meta = prepare_dataset(
        args.corpus, args.tokenizer, Path(args.out), val_fraction=args.val_fraction,
        force=args.force, progress=not args.quiet,
    )
    print(
        f"wrote {args.out}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens, "
        f"vocab {meta['vocab_size']} ({meta['tokenizer']}), {meta['dtype']}"
    )
    return 0


def _cmd_data_export_images(args: argparse.Namespace) -> int:
    from fromzero.data.mnist import export_image_folder, load_mnist

    out = Path(args.out)
    if out.exists() and not args.force:
        raise FromzeroError(f"{out} already exists: choose another folder or pass --force to replace it")
    if args.dataset == "mnist-detection":
        from fromzero.data.detection import copy_builtin_detection

        meta = copy_builtin_detection(out, force=args.force)
        sizes = ", ".join(f"{name} {n['images']:,} images / {n['objects']:,} boxes" for name, n in meta["splits"].items())
        print(f"wrote {out}: {sizes} (COCO JSON: <split>/annotations.json + <split>/images/*.png)")
        return 0
    splits = load_mnist()
    export_image_folder(splits, out, force=args.force)
    sizes = ", ".join(f"{name} {len(split):,}" for name, split in splits.items())
    print(f"wrote {out}: {sizes} PNG images in 10 class folders per split")
    return 0


def _cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from fromzero.data.corpora import resolve_corpus
    from fromzero.data.tokenizers import train_bpe_tokenizer, train_char_tokenizer

    out = Path(args.out)
    if out.exists() and not args.force:
        raise FromzeroError(f"{out} already exists; pass --force to overwrite it")
    corpus = resolve_corpus(args.corpus)
    if args.kind == "char":
        tok = train_char_tokenizer(corpus.iter_chunks())
    else:
        tok = train_bpe_tokenizer(corpus.iter_chunks(), args.vocab_size)
    path = tok.save(out)
    print(f"wrote {path}: {tok.kind} tokenizer, vocab {tok.vocab_size}")
    if args.kind != "char" and tok.vocab_size < args.vocab_size:
        print(f"note: the text supports {tok.vocab_size} tokens, fewer than --vocab-size {args.vocab_size} "
              "(BPE stops when no pair of tokens repeats)")
    return 0


# verb -> the function that adds its parser (cli.build_parser calls them in --help order)
PARSERS = {"data": _add_data, "tokenizer": _add_tokenizer}
