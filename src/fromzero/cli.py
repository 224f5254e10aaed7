"""The ``fromzero`` command: one subcommand per verb, each a thin layer over the package.

Exit codes: 0 success; 2 bad input, reported as one line ``error: ...`` on stderr (add
``--debug`` for the traceback); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from fromzero import __version__
from fromzero.errors import FromzeroError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one ``error:`` line (exit 2) like every other error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise FromzeroError(f"{self.prog}: {message} (see {self.prog} --help)")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults after every option and keep the hand-written layout of descriptions.

    A help text that already says "(default: ...)" in words keeps its own wording: no second,
    machine-made "(default: None)" after it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "(default" in text or "%(default)" in text:
            return text
        return super()._get_help_string(action)


# Appended to a help text that states its default in words: formats to nothing, and stops the
# formatter from adding "(default: None)" after it.
_OWN_DEFAULT = "%(default).0s"


def _add_parser(sub: argparse._SubParsersAction, name: str, help: str, description: str = "", **kw) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=description or help, formatter_class=_Formatter,
                          **kw)


# ---------------------------------------------------------------------------------------------
# data prepare / tokenizer train


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
    return 0


# ---------------------------------------------------------------------------------------------
# pretrain


_PRETRAIN_ALIASES = {"--device": "--train.device", "--dtype": "--train.dtype", "--compile": "--train.compile",
                     "--out-dir": "--out_dir", "--seed": "--train.seed"}


def _pretrain_epilog() -> str:
    from fromzero.options import static_options_help  # reads the source: no torch import for --help

    return (
        "recipe options (override any with --section.key VALUE; shown with built-in defaults,\n"
        "a recipe sets its own):\n" + "\n".join(static_options_help("fromzero.config:PretrainConfig")) + "\n\n"
        "aliases: --device, --dtype, --compile, --seed mean --train.device, --train.dtype,\n"
        "--train.compile, --train.seed; --out-dir means --out_dir.\n\n"
        "example:\n  fromzero pretrain --config recipes/shakespeare-char.yaml --train.max_iters 500\n"
    )


def _cmd_pretrain(args: argparse.Namespace, overrides: list[str]) -> int:
    from fromzero.config import deep_merge, from_dict, load_pretrain_config, parse_overrides, PretrainConfig, validate_pretrain
    from fromzero.training.trainer import load_run_config, pretrain

    expanded: list[str] = []
    for tok in overrides:
        key, eq, val = tok.partition("=")
        key = _PRETRAIN_ALIASES.get(key, key)
        expanded.append(key + eq + val)
    expanded = _bool_flags(expanded, {"--train.compile"})
    if args.resume:
        if args.config:
            raise FromzeroError("--resume takes its config from the run directory; drop --config")
        run_dir = Path(args.resume)
        data = deep_merge(load_run_config(run_dir), parse_overrides(expanded, PretrainConfig))
        cfg = from_dict(PretrainConfig, data)
        validate_pretrain(cfg)
        result = pretrain(cfg, run_dir=run_dir, resume=True, progress=not args.quiet)
    else:
        if not args.config:
            raise FromzeroError("pretrain needs --config RECIPE.yaml (or --resume RUN_DIR)")
        cfg = load_pretrain_config(args.config, expanded)
        result = pretrain(cfg, force=args.force, progress=not args.quiet)
    print(
        f"{'stopped' if result.stopped_early else 'done'}: step {result.step}, "
        f"val loss {result.last_val_loss:.4f} (best {result.best_val_loss:.4f}); "
        f"run directory {result.run_dir}"
    )
    return 0


def _bool_flags(tokens: list[str], flags: set[str]) -> list[str]:
    """Let boolean options be given bare (``--compile``) as well as with a value."""
    out: list[str] = []
    for i, tok in enumerate(tokens):
        out.append(tok)
        if tok in flags:
            nxt = tokens[i + 1] if i + 1 < len(tokens) else None
            if nxt is None or nxt.startswith("--"):
                out.append("true")
    return out


# ---------------------------------------------------------------------------------------------
# finetune, crossval, evaluate, predict, merge-lora


def _finetune_epilog() -> str:
    from fromzero.options import static_options_help  # reads the source: no torch import for --help
    from fromzero.tasks import finetuning_tasks

    parts = ["recipe options, per task (override any with --key VALUE; built-in defaults shown,\n"
             "a recipe sets its own):"]
    for name, task in finetuning_tasks().items():
        parts.append(f"\ntask {name}:\n" + "\n".join(static_options_help(task.config)))
    parts.append("\nexamples:\n  fromzero finetune --config recipes/genre-minilm.yaml --method lora\n"
                 "  fromzero finetune --config recipes/digits-cnn.yaml --epochs 5\n")
    return "\n".join(parts)


def _finetune_overrides(args: argparse.Namespace, overrides: list[str]) -> list[str]:
    # --dist.strategy as in pretraining recipes (fine-tuning recipes are flat: dist_strategy).
    tokens = ["--dist_strategy" if t == "--dist.strategy" else t for t in overrides]
    tokens = _bool_flags(tokens, {"--compile", "--packing", "--force"})
    if getattr(args, "force", False):
        tokens += ["--force", "true"]
    if getattr(args, "quiet", False):
        tokens += ["--progress", "false"]
    return tokens


def _cmd_finetune(args: argparse.Namespace, overrides: list[str]) -> int:
    from fromzero.finetune.recipe import load_finetune_config, load_run_config, run_finetune

    if args.resume:
        if args.config or args.task or args.force:
            raise FromzeroError("--resume takes the recipe from the run directory; drop --config / --task / --force")
        task, cfg = load_run_config(args.resume, _finetune_overrides(args, overrides))
        return _finetune_outcome(run_finetune(task, cfg, resume=True))
    task, cfg = load_finetune_config(args.config, _finetune_overrides(args, overrides), task=args.task)
    return _finetune_outcome(run_finetune(task, cfg))


def _finetune_outcome(result: dict) -> int:
    """done (exit 0), or stopped by Ctrl-C / SIGTERM (exit 130, as an interrupted command): a
    script must be able to tell a cut run from a finished one."""
    if result.get("interrupted"):
        run = result["run_dir"]
        print(f"stopped: interrupted at step {result.get('steps', '?')}; continue it with "
              f"fromzero finetune --resume {run} (or end it there, scoring the best weights so far: "
              f"add --max_steps {result.get('steps', 'N')})")
        return 130
    print(f"done: run directory {result['run_dir']}")
    return 0


def _cmd_distill(args: argparse.Namespace, overrides: list[str]) -> int:
    from fromzero.finetune.distill import distill_task
    from fromzero.finetune.recipe import load_finetune_config, run_finetune

    # --student-config / --student-layers as the command's own spelling of the recipe keys
    tokens = ["--" + t[2:].replace("-", "_") if t.startswith("--student-") else t for t in overrides]
    tokens = _finetune_overrides(args, tokens) + ["--teacher", args.teacher]
    task, cfg = load_finetune_config(args.config, tokens, task=args.task or distill_task(args.teacher, args.config))
    return _finetune_outcome(run_finetune(task, cfg))


def _cmd_tune(args: argparse.Namespace, overrides: list[str]) -> int:
    from fromzero.tune import tune

    summary = tune(Path(args.config), overrides, trials=args.trials, timeout=args.timeout,
                   out_dir=Path(args.out) if args.out else None, storage=args.storage, study_name=args.study_name,
                   seed=args.seed)
    print(f"done: {summary['trials']} trials; results in {summary['out_dir']}")
    return 0


def _cmd_crossval(args: argparse.Namespace, overrides: list[str]) -> int:
    from fromzero.finetune.crossval import crossval
    from fromzero.finetune.recipe import load_finetune_config

    task, cfg = load_finetune_config(args.config, _finetune_overrides(args, overrides), task=args.task)
    crossval(task, cfg, args.folds)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from fromzero.evaluation.metrics import format_report
    from fromzero.inference.predict import evaluate_checkpoint, to_json_line, write_evaluation

    metrics = evaluate_checkpoint(Path(args.checkpoint), args.data, args.split, args.batch_size, args.device,
                                  limit=args.limit)
    if metrics.get("task") == "chat-classification":  # a chat model asked for labels
        from fromzero.inference.chat_eval import format_chat_report

        print(format_chat_report(metrics))
    elif "confusion_matrix" in metrics:
        print(format_report(metrics))
    else:
        print(to_json_line(metrics))
    if args.out:
        write_evaluation(metrics, Path(args.out))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from fromzero.inference.predict import Classifier, read_inputs, to_json_line

    if bool(args.text) + bool(args.image) + bool(args.input) != 1:
        raise FromzeroError("give exactly one of --text, --image or --input")
    classifier = Classifier(Path(args.checkpoint), args.device)
    if args.image or (args.input and classifier.inputs == "image"):
        paths = [Path(p) for p in args.image] if args.image else _image_inputs(Path(args.input))
        inputs: list[str] = [str(p) for p in paths]
        logits = classifier.image_logits(paths)
    else:
        inputs = list(args.text) if args.text else read_inputs(Path(args.input))
        logits = classifier.text_logits(inputs, args.batch_size)
    for item, result in zip(inputs, classifier.label(logits)):
        print(to_json_line({"input": item, **result}))
    return 0


def _image_inputs(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"))
        if not files:
            raise FromzeroError(f"{path} holds no images")
        return files
    if not path.is_file():
        raise FromzeroError(f"input not found: {path}")
    return [Path(line.strip()) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _cmd_explain(args: argparse.Namespace) -> int:
    from fromzero.inference.explain import ExplainConfig, Explainer, write_explanations
    from fromzero.inference.predict import read_inputs

    if bool(args.text) + bool(args.image) + bool(args.input) != 1:
        raise FromzeroError("give exactly one of --text, --image or --input")
    explainer = Explainer(ExplainConfig(checkpoint=args.checkpoint, method=args.method, target=args.target,
                                        steps=args.steps, baseline=args.baseline, out=args.out, force=args.force,
                                        device=args.device))
    texts, images = args.text, [Path(p) for p in args.image] if args.image else None
    if args.input:
        if explainer.takes_images:
            images = _image_inputs(Path(args.input))
        else:
            texts = read_inputs(Path(args.input))
    write_explanations(explainer, texts, images)
    return 0


def _cmd_merge_lora(args: argparse.Namespace) -> int:
    from fromzero.finetune.lora import merge_lora

    out = merge_lora(Path(args.checkpoint), Path(args.out), force=args.force)
    print(f"merged: {out}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from fromzero.inference.export import export_onnx

    if args.device != "cpu":
        raise FromzeroError(f"export runs on the CPU (the graph is device-independent); got --device {args.device}")
    result = export_onnx(Path(args.checkpoint), Path(args.out), opset=args.opset, force=args.force,
                         verify=args.verify, atol=args.atol, fmt=args.format)
    print(result.summary())
    return 0


def _cmd_prune(args: argparse.Namespace) -> int:
    from fromzero.compression.prune import PruneConfig, format_report, prune_checkpoint

    cfg = PruneConfig(checkpoint=args.checkpoint, out=args.out, sparsity=args.sparsity, method=args.method,
                      scope=args.scope, importance=args.importance, gqa=args.gqa,
                      importance_batches=args.importance_batches, recover_steps=args.recover_steps, lr=args.lr,
                      batch_size=args.batch_size, data=args.data, evaluate=args.eval, force=args.force,
                      device=args.device, seed=args.seed, progress=not args.quiet)
    report = prune_checkpoint(cfg)
    print(format_report(report))
    print(f"wrote {args.out} (report: {Path(args.out) / 'pruning.json'})")
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    from fromzero.compression.quantize import format_report, quantize_checkpoint
    from fromzero.models.quantized import QuantizeOptions

    options = QuantizeOptions(method=args.method, group_size=args.group_size, embeddings=not args.skip_embeddings)
    report = quantize_checkpoint(args.checkpoint, args.out, options, force=args.force, evaluate=args.eval,
                                 data=args.data, split=args.split, batch_size=args.batch_size, device=args.device)
    print(format_report(report))
    return 0


# ---------------------------------------------------------------------------------------------
# generate


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from fromzero.data.tokenizers import TextTokenizer
    from fromzero.inference.chat import eos_ids
    from fromzero.checkpoint import load_model
    from fromzero.devices import resolve_device

    if args.max_new_tokens < 0:
        raise FromzeroError("--max-new-tokens must be >= 0")
    if args.temperature < 0:
        raise FromzeroError("--temperature must be >= 0 (0 = greedy)")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise FromzeroError("--top-p must be in (0, 1]")
    if args.top_k is not None and args.top_k <= 0:
        raise FromzeroError("--top-k must be positive")
    if args.num_samples <= 0:
        raise FromzeroError("--num-samples must be positive")
    if args.lookup_tokens < 0:
        raise FromzeroError("--lookup-tokens must be >= 0 (0 = one token per forward pass)")
    if not args.chat and (args.system is not None or args.chat_template):
        raise FromzeroError("--system and --chat-template go with --chat")
    prompt = args.prompt
    if args.prompt_file:
        try:
            prompt = Path(args.prompt_file).read_text(encoding="utf-8")
        except OSError as e:
            raise FromzeroError(f"cannot read --prompt-file {args.prompt_file}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise FromzeroError(f"--prompt-file {args.prompt_file} is not UTF-8 text") from None
    if args.chat:
        return _generate_chat(args, prompt)
    device = resolve_device(args.device)
    model = load_model(args.checkpoint, device)
    tokenizer = TextTokenizer.load(Path(args.checkpoint))
    ids = tokenizer.encode(prompt) if prompt else []
    if not ids:
        if tokenizer.eos_id is None:
            raise FromzeroError("empty prompt: give --prompt TEXT (this tokenizer has no start token)")
        ids = [tokenizer.eos_id]  # GPT-2 convention: <|endoftext|> starts a fresh document
    stop_ids = eos_ids(Path(args.checkpoint), tokenizer)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    idx = torch.tensor([ids] * args.num_samples, dtype=torch.long, device=device)
    out = model.generate(
        idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, eos_id=stop_ids, generator=generator, use_cache=not args.no_cache,
        lookup_tokens=args.lookup_tokens,
    )
    for i, row in enumerate(out.tolist()):
        new = row[len(ids):]
        stops = [pos for pos, t in enumerate(new) if t in stop_ids]
        if stops:
            row = row[: len(ids) + stops[0]]
        text = tokenizer.decode(row if prompt else row[1:])
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(text)
    return 0


def _generate_chat(args: argparse.Namespace, prompt: str) -> int:
    """generate --chat: one user message (plus --system) rendered as `chat` renders it; the reply only."""
    import torch

    from fromzero.inference.chat import load_chat_format
    from fromzero.checkpoint import load_model
    from fromzero.devices import resolve_device

    chat = load_chat_format(Path(args.checkpoint), args.chat_template)  # before the weights: fail fast
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": prompt}]
    ids = chat.prompt_ids(messages)
    device = resolve_device(args.device)
    model = load_model(args.checkpoint, device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    idx = torch.tensor([ids] * args.num_samples, dtype=torch.long, device=device)
    out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, eos_id=list(chat.stop_ids), generator=generator,
                         use_cache=not args.no_cache, lookup_tokens=args.lookup_tokens)
    for i, row in enumerate(out.tolist()):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(chat.reply_text(row[len(ids):]))
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from fromzero.inference.chat import COMMANDS_HELP, ChatSession, load_chat_format, run_repl
    from fromzero.models.gpt import GPT
    from fromzero.checkpoint import load_model
    from fromzero.devices import resolve_device

    if args.temperature < 0:
        raise FromzeroError("--temperature must be >= 0 (0 = greedy)")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise FromzeroError("--top-p must be in (0, 1]")
    if args.top_k is not None and args.top_k <= 0:
        raise FromzeroError("--top-k must be positive")
    if args.max_new_tokens is not None and args.max_new_tokens <= 0:
        raise FromzeroError("--max-new-tokens must be positive")
    chat = load_chat_format(Path(args.checkpoint), args.chat_template)  # before the weights: fail fast
    model = load_model(args.checkpoint, resolve_device(args.device))
    if not isinstance(model, GPT):
        raise FromzeroError(f"chat needs a GPT language model; {args.checkpoint} holds a {type(model).__name__}")
    block = model.config.block_size
    max_new = args.max_new_tokens if args.max_new_tokens is not None else min(512, block // 2)
    session = ChatSession(model, chat, system=args.system, max_new_tokens=max_new, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    banner = (f"chatting with {args.checkpoint} (template: {chat.source}; {session.context}-token context, "
              f"replies up to {max_new} tokens). {COMMANDS_HELP}.")
    return run_repl(session, banner=banner)


def _cmd_serve(args: argparse.Namespace) -> int:
    from fromzero.serving import ServeConfig, run_server

    api_key = args.api_key if args.api_key is not None else (os.environ.get("FROMZERO_API_KEY") or None)
    config = ServeConfig(
        checkpoint=args.checkpoint, host=args.host, port=args.port, api_key=api_key,
        max_batch_size=args.max_batch_size, max_queue=args.max_queue, max_tokens_cap=args.max_tokens_cap,
        max_prompt_tokens=args.max_prompt_tokens, request_timeout=args.request_timeout,
        max_body_bytes=args.max_body_bytes, device=args.device, sliding_window=args.sliding_window,
        model_name=args.model_name, log_level=args.log_level, chat_template=args.chat_template,
    )
    return run_server(config)


# ---------------------------------------------------------------------------------------------
# convert / embed


def _cmd_convert(args: argparse.Namespace) -> int:
    from fromzero.models.builtin import resolve_model
    from fromzero.models.hf import convert_from_hf, convert_to_hf

    if args.dtype is not None and args.direction != "from-gguf":
        raise FromzeroError("--dtype goes with from-gguf")
    if args.type is not None and args.direction != "to-gguf":
        raise FromzeroError("--type goes with to-gguf")
    if args.direction == "from-gguf":
        from fromzero.models.gguf import convert_from_gguf

        config = convert_from_gguf(args.src, Path(args.out), force=args.force, dtype=args.dtype or "float32")
    elif args.direction == "to-gguf":
        from fromzero.models.gguf import convert_to_gguf

        s = convert_to_gguf(resolve_model(args.src), Path(args.out), qtype=args.type or "f16", force=args.force)
        types = ", ".join(f"{n} {t}" for t, n in s["tensor_types"].items())
        print(f"wrote {args.out} ({s['architecture']}, {s['bytes'] / 1e6:.1f} MB, tensors: {types}; "
              f"tokenizer {s['tokens']} tokens, pre {s['pre']})")
        return 0
    elif args.direction == "from-hf":
        config = convert_from_hf(args.src, Path(args.out), force=args.force)
    else:
        config = convert_to_hf(resolve_model(args.src), Path(args.out), force=args.force)
    print(f"wrote {args.out} ({config.get('model_type')})")
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    from fromzero.models.bert import embed_checkpoint
    from fromzero.devices import resolve_device

    texts = list(args.text or [])
    if args.input:
        try:
            texts += [line for line in Path(args.input).read_text(encoding="utf-8").splitlines() if line.strip()]
        except OSError as e:
            raise FromzeroError(f"cannot read --input {args.input}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise FromzeroError(f"--input {args.input} is not UTF-8 text") from None
    if not texts:
        raise FromzeroError("nothing to embed: give --text TEXT (repeatable) or --input FILE")
    if args.batch_size <= 0:
        raise FromzeroError("--batch-size must be positive")
    vectors = embed_checkpoint(
        Path(args.checkpoint), texts, normalize=not args.no_normalize, batch_size=args.batch_size,
        device=resolve_device(args.device),
    )
    json.dump({"model": str(args.checkpoint), "dim": len(vectors[0]), "normalized": not args.no_normalize,
               "embeddings": vectors}, sys.stdout)
    sys.stdout.write("\n")
    return 0


# ---------------------------------------------------------------------------------------------
# parser


def build_parser(with_pretrain_help: bool = True, with_finetune_help: bool = True) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fromzero",
        description="Develop large neural models from zero: prepare data, train tokenizers, "
        "pretrain GPTs, generate text, fine-tune, evaluate and predict.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"fromzero {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    # data
    data = _add_parser(sub, "data", "prepare datasets")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    prep = _add_parser(
        data_sub, "prepare", "corpus -> tokenizer -> train.bin / val.bin / meta.json / tokenizer.json",
        description="Tokenize a corpus into memory-mappable token files (90/10 train/val split, "
        "the last 10%% of the text is validation).\n\nexample:\n"
        "  fromzero data prepare --corpus shakespeare --tokenizer char --out data/shakespeare-char",
    )
    prep.add_argument("--corpus", nargs="+", required=True, metavar="CORPUS",
                      help="shakespeare | python-stdlib | a file, folder or glob of UTF-8 text (several allowed)")
    prep.add_argument("--tokenizer", default="char", metavar="SPEC",
                      help="char | bpe:N (train byte-level BPE with vocab N) | path to a tokenizer.json")
    prep.add_argument("--out", required=True, help="output directory")
    prep.add_argument("--val-fraction", type=float, default=0.1, help="share of the text held out for validation")
    prep.add_argument("--force", action="store_true", help="replace an existing output directory")
    prep.add_argument("--quiet", action="store_true", help="no progress bar")
    prep.set_defaults(func=_cmd_data_prepare)

    # tokenizer
    tok = _add_parser(sub, "tokenizer", "train tokenizers")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    train = _add_parser(tok_sub, "train", "train a tokenizer on a corpus and save tokenizer.json",
                        description="Train a byte-level BPE (or char-level) tokenizer with Hugging Face "
                        "`tokenizers`.\n\nexample:\n  fromzero tokenizer train --corpus python-stdlib "
                        "--vocab-size 8192 --out tok.json")
    train.add_argument("--corpus", nargs="+", required=True, help="as for `data prepare`")
    train.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size (>= 257)")
    train.add_argument("--kind", choices=("bpe", "char"), default="bpe", help="tokenizer type")
    train.add_argument("--out", required=True, help="output tokenizer.json path")
    train.add_argument("--force", action="store_true", help="overwrite an existing file")
    train.set_defaults(func=_cmd_tokenizer_train)

    # pretrain
    pre = _add_parser(
        sub, "pretrain", "pretrain a GPT from a YAML recipe",
        description="Pretrain a GPT language model. Writes runs/<recipe>-<timestamp>/ with config.yaml, "
        "metrics.jsonl, tb/, plots/ and checkpoints/{last,best}.",
        # The recipe-option list imports torch (via the config dataclasses): build it only when
        # pretrain is the command, so `fromzero --help` stays fast.
        epilog=_pretrain_epilog() if with_pretrain_help else None,
    )
    pre.add_argument("--config", help="recipe YAML (e.g. recipes/shakespeare-char.yaml)")
    pre.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its checkpoints/last")
    pre.add_argument("--force", action="store_true", help="start over in an existing run directory")
    pre.add_argument("--quiet", action="store_true", help="no progress bar")
    pre.set_defaults(func=_cmd_pretrain, takes_overrides=True)

    # generate
    gen = _add_parser(sub, "generate", "sample text from a checkpoint",
                      description="Sample a continuation of a prompt.\n\nexample:\n  fromzero generate "
                      "--checkpoint runs/RUN/checkpoints/best --prompt 'ROMEO:' --max-new-tokens 300")
    gen.add_argument("--checkpoint", required=True, help="checkpoint directory (config.json, model.safetensors, tokenizer.json), "
                     "a .gguf file, or a built-in model: smollm2-135m-instruct (fetched and converted once; "
                     "every --checkpoint takes these)")
    gen.add_argument("--prompt", default="", help="text to continue")
    gen.add_argument("--prompt-file", help="read the prompt from this UTF-8 file instead")
    gen.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate")
    gen.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy")
    gen.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    gen.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest token set with this probability")
    gen.add_argument("--seed", type=int, default=1337, help="random seed (same seed, same text)")
    gen.add_argument("--num-samples", type=int, default=1, help="independent samples to draw")
    gen.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    gen.add_argument("--chat", action="store_true",
                     help="send the prompt as a user message in the checkpoint's chat template (as `fromzero chat` "
                     "does) and print only the reply")
    gen.add_argument("--system", default=None,
                     help="--chat: a system message before the prompt (default: none)" + _OWN_DEFAULT)
    gen.add_argument("--chat-template", metavar="FILE", default=None,
                     help="--chat: a Jinja chat template to use instead of the checkpoint's own (default: the "
                     "checkpoint's chat_template.jinja / tokenizer_config.json, else its SFT template)" + _OWN_DEFAULT)
    gen.add_argument("--no-cache", action="store_true", help="recompute attention over the whole context each step (slower; for checking)")
    gen.add_argument("--lookup-tokens", type=int, default=8,
                     help="greedy decoding (--temperature 0) of one sample: draft up to this many tokens by prompt "
                     "lookup (what followed the last few tokens where they occurred before) and check them in one "
                     "forward pass; same tokens in fp32, fewer passes when text repeats (its prompt, code, lists). "
                     "0 = one token per pass")
    gen.set_defaults(func=_cmd_generate)

    # chat
    ch = _add_parser(
        sub, "chat", "chat with a chat model: an interactive multi-turn conversation",
        description="Type a message, get the reply streamed token by token. The conversation is rendered with "
        "the checkpoint's chat template: --chat-template FILE if given, else its own Jinja template "
        "(chat_template.jinja or tokenizer_config.json, kept by `convert`), else the SFT template of a "
        "`finetune --task sft` checkpoint. A reply ends at an end-of-text or end-of-turn token (e.g. "
        "<|im_end|>) or after --max-new-tokens.\n\nThe history is kept within the model's context "
        "(block_size - --max-new-tokens): the oldest messages are dropped (never the system message), and "
        "a note on stderr says so. /reset clears the history; /exit or Ctrl-D ends; Ctrl-C stops a reply "
        "(at the prompt: ends). Piped input is one message per line, and the replies (one per line) are all "
        "that goes to stdout.\n\nexamples:\n  fromzero chat --checkpoint checkpoints/smollm2 --system "
        "'You are a helpful assistant.'\n  printf 'Hi!\\nWhat is 2+2?\\n' | fromzero chat --checkpoint "
        "checkpoints/smollm2 --temperature 0",
    )
    ch.add_argument("--checkpoint", required=True, help="GPT checkpoint directory with a chat template (or see --chat-template)" + _OWN_DEFAULT)
    ch.add_argument("--system", default=None, help="system message that opens the conversation (default: none)" + _OWN_DEFAULT)
    ch.add_argument("--chat-template", metavar="FILE", default=None,
                    help="a Jinja chat template to use instead of the checkpoint's own (needed for a model without "
                    "one; default: the checkpoint's)" + _OWN_DEFAULT)
    ch.add_argument("--max-new-tokens", type=int, default=None,
                    help="longest reply in tokens (default: 512 or half the model's context, whichever is smaller)"
                    + _OWN_DEFAULT)
    ch.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 = greedy")
    ch.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens (default: all)" + _OWN_DEFAULT)
    ch.add_argument("--top-p", type=float, default=None,
                    help="nucleus sampling: smallest token set with this probability (default: off)" + _OWN_DEFAULT)
    ch.add_argument("--seed", type=int, default=1337, help="random seed (same seed and messages, same replies)")
    ch.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    ch.set_defaults(func=_cmd_chat)

    # convert
    conv = _add_parser(
        sub, "convert", "convert weights between Hugging Face, GGUF and fromzero",
        description="from-hf SRC OUT: a Hugging Face model directory (config.json + safetensors or "
        ".bin) or hub id -> a fromzero checkpoint directory (tokenizer files carried along).\n"
        "to-hf SRC OUT: a fromzero checkpoint -> a directory transformers.AutoModel* loads.\n"
        "from-gguf FILE OUT: a llama.cpp .gguf file (llama / Mistral / SmolLM / TinyLlama, qwen2, gpt2; "
        "F32, F16, BF16,\n  Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K..Q6_K, dequantized) -> a fromzero checkpoint "
        "with tokenizer.json and chat template.\n"
        "to-gguf SRC FILE: a fromzero GPT-2- or LLaMA-style checkpoint (SRC may be a built-in name such as "
        "smollm2-135m-instruct)\n  -> one .gguf file for llama.cpp / ollama: llama.cpp tensor names, "
        "byte-level BPE tokenizer, special ids, chat template.\n\n"
        "examples:\n  fromzero convert from-hf ./all-MiniLM-L6-v2 checkpoints/minilm\n"
        "  fromzero convert to-hf runs/RUN/checkpoints/best exported/\n"
        "  fromzero convert from-gguf SmolLM2-135M-Instruct.Q4_1.gguf checkpoints/smollm2\n"
        "  fromzero convert to-gguf runs/RUN/checkpoints/best model.gguf --type q8_0",
    )
    conv.add_argument("direction", choices=("from-hf", "to-hf", "from-gguf", "to-gguf"), help="conversion direction")
    conv.add_argument("src", help="source directory (from-hf: or a hub id; from-gguf: a .gguf file; to-hf / to-gguf: "
                      "or a built-in model name)")
    conv.add_argument("out", help="output directory (to-gguf: output .gguf file)")
    conv.add_argument("--force", action="store_true", help="replace an existing output directory or file")
    conv.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                      help="from-gguf: dtype of the stored weights (default float32: exactly the dequantized "
                      "GGUF values)" + _OWN_DEFAULT)
    conv.add_argument("--type", choices=("f16", "bf16", "q8_0", "q4_0"), default=None,
                      help="to-gguf: type of the 2-D weight matrices (default f16; norms, biases and position "
                      "tables stay f32; q4_0 keeps embedding and output at q8_0)" + _OWN_DEFAULT)
    conv.set_defaults(func=_cmd_convert)

    # embed
    emb = _add_parser(sub, "embed", "sentence embeddings from an encoder checkpoint (JSON on stdout)",
                      description="Mean-pooled (over the attention mask), L2-normalised sentence embeddings, "
                      "as sentence-transformers computes them.\n\nexample:\n  fromzero embed --checkpoint "
                      "checkpoints/minilm --text 'A man is eating.' --text 'Someone eats.'")
    emb.add_argument("--checkpoint", required=True, help="encoder checkpoint directory (e.g. converted MiniLM)")
    emb.add_argument("--text", action="append", help="a sentence to embed (repeat for several)")
    emb.add_argument("--input", help="UTF-8 file with one sentence per line")
    emb.add_argument("--batch-size", type=int, default=32, help="sentences per forward pass")
    emb.add_argument("--no-normalize", action="store_true", help="skip L2 normalisation")
    emb.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    emb.set_defaults(func=_cmd_embed)

    # finetune / crossval
    for name, helptext, func in (
        ("finetune", "fine-tune a model from a YAML recipe (text classification, SFT, images)", _cmd_finetune),
        ("crossval", "stratified K-fold cross-validation of a fine-tuning recipe", _cmd_crossval),
    ):
        ft = _add_parser(
            sub, name, helptext,
            description=("Fine-tune: full, frozen (head / top N layers) or LoRA. Writes a run directory with "
                         "config.yaml, metrics.jsonl, tb/, plots/, metrics.json (test) and checkpoints/best."
                         if name == "finetune" else
                         "Split train+val into K stratified folds; fine-tune once per fold (validating on "
                         "the held-out fold) and report mean +- std of every metric in crossval.json."),
            epilog=_finetune_epilog() if with_finetune_help else None,
        )
        ft.add_argument("--config", help="recipe YAML (e.g. recipes/genre-minilm.yaml)")
        from fromzero.tasks import finetuning_tasks

        ft.add_argument("--task", help=f"{' | '.join(finetuning_tasks())} (default: the recipe's task)")
        if name == "crossval":
            ft.add_argument("--folds", type=int, default=5, help="number of folds K (>= 2)")
        else:
            ft.add_argument("--resume", metavar="RUN_DIR",
                            help="continue a stopped run from RUN_DIR/checkpoints/last (its config.yaml; "
                                 "overrides such as --max_steps still apply)")
        ft.add_argument("--force", action="store_true", help="replace the files of an existing run directory")
        ft.add_argument("--quiet", action="store_true", help="no progress bar")
        ft.set_defaults(func=func, takes_overrides=True)

    # distill
    ds = _add_parser(
        sub, "distill", "distil a teacher checkpoint into a smaller student (classifiers, language models)",
        description="Train a student (the teacher with fewer layers, --student_layers N, and/or other shapes, "
        "--student_config FILE) on\nalpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * task loss. Runs "
        "as the fine-tuning task of the\nteacher (text-classification for a classifier, sft for a GPT): every "
        "fine-tuning option applies\n(see fromzero finetune --help), and the run directory is the same.\n\n"
        "examples:\n  fromzero distill --teacher runs/genre/checkpoints/best --config "
        "recipes/distill-genre-minilm.yaml\n  fromzero distill --teacher runs/sft/checkpoints/best "
        "--student_layers 2 --data dialogue.jsonl",
    )
    ds.add_argument("--teacher", required=True, help="teacher checkpoint directory (a text classifier or a GPT)")
    ds.add_argument("--config", help="recipe YAML (e.g. recipes/distill-genre-minilm.yaml)")
    ds.add_argument("--task", help="text-classification | sft (None: the recipe's, else from the teacher's kind)")
    ds.add_argument("--force", action="store_true", help="replace the files of an existing run directory")
    ds.add_argument("--quiet", action="store_true", help="no progress bar")
    ds.set_defaults(func=_cmd_distill, takes_overrides=True)

    # tune
    tu = _add_parser(
        sub, "tune", "search hyperparameters with Optuna (TPE + median pruning, resumable SQLite study)",
        description="The recipe's tune section says what to search; everything else is a normal pretraining or "
        "fine-tuning\nrecipe. Each trial is a full run in OUT/trial-NNN. Results: OUT/best_params.json, "
        "OUT/best-recipe.yaml,\nOUT/trials.csv, OUT/plots/. Run the same command again to resume a stopped "
        "search (Ctrl-C stops it:\nthe trial it cuts is recorded as interrupted and does not count). Recipe "
        "keys can be overridden for every\ntrial after the options, as with pretrain / finetune: "
        "--train.max_iters 500, --epochs 2, ...\n\n"
        "  tune:\n    metric: val_loss                  # default: val_loss (fine-tuning: the recipe's monitor)\n"
        "    direction: minimize               # default: maximize for accuracy/F1/HR/NDCG, else minimize\n"
        "    space:\n      train.lr: {log_uniform: [1.0e-4, 1.0e-2]}\n      model.dropout: {uniform: [0.0, 0.3]}\n"
        "      model.n_layer: {int: [2, 6]}\n      train.batch_size: {choice: [16, 32]}\n\n"
        "examples:\n  fromzero tune --config recipes/tune-shakespeare-char.yaml --trials 20\n"
        "  fromzero tune --config recipes/tune-shakespeare-char.yaml --trials 20 --train.max_iters 300",
    )
    tu.add_argument("--config", required=True, help="recipe YAML with a tune section")
    tu.add_argument("--trials", type=int, default=20, help="trials in the study in total (finished ones count when resuming)")
    tu.add_argument("--timeout", type=float, default=None, help="stop starting new trials after this many seconds")
    tu.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite:///OUT/study.db)")
    tu.add_argument("--study-name", default=None, help="study name in the storage (default: the recipe's file name)")
    tu.add_argument("--out", default=None, help="output directory (default: runs/tune-<recipe>)")
    tu.add_argument("--seed", type=int, default=0, help="seed of the TPE sampler")
    tu.set_defaults(func=_cmd_tune, takes_overrides=True)

    # evaluate
    ev = _add_parser(sub, "evaluate", "score a checkpoint on a data split (metrics.json)",
                     description="Classifiers: accuracy, precision / recall / F1 (macro, weighted), per-class "
                     "report, confusion matrix. Language models: loss and perplexity. A chat model (a converted "
                     "chat model or an sft checkpoint) with --data rotten-tomatoes: asked for each review's "
                     "sentiment; accuracy / macro-F1 of its greedy reply (and how many replies name no label) "
                     "and of its first-token logits.\n\nexamples:\n"
                     "  fromzero evaluate --checkpoint runs/RUN/checkpoints/best --split test --out eval.json\n"
                     "  fromzero evaluate --checkpoint smollm2-135m-instruct --data rotten-tomatoes --limit 200")
    ev.add_argument("--checkpoint", required=True, help="checkpoint directory (a fine-tuned one, or a pretrained GPT)")
    ev.add_argument("--data", help="data source (default: the data of the run that made the checkpoint); "
                    "for a pretrained GPT a prepared data directory")
    ev.add_argument("--split", default="test", help="train | val | test")
    ev.add_argument("--out", help="write the metrics to this JSON file (+ a confusion-matrix PNG)")
    ev.add_argument("--batch-size", type=int, default=64, help="examples per forward pass")
    ev.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    ev.add_argument("--limit", type=int, default=0,
                    help="score only the first N examples of the split (classifiers, chat models; 0 = all)")
    ev.set_defaults(func=_cmd_evaluate)

    # predict
    pr = _add_parser(sub, "predict", "label texts or images with a classifier (JSON lines on stdout)",
                     description="One JSON object per input: the label and every class's probability.\n\n"
                     "examples:\n  fromzero predict --checkpoint runs/RUN/checkpoints/best --text 'Exeunt.'\n"
                     "  fromzero predict --checkpoint runs/DIGITS/checkpoints/best --image 3.png")
    pr.add_argument("--checkpoint", required=True, help="text- or image-classification checkpoint directory")
    pr.add_argument("--text", action="append", help="a text to label (repeat for several)")
    pr.add_argument("--image", action="append", help="an image file to label (repeat for several)")
    pr.add_argument("--input", help="texts: .txt (one per line), .csv or .jsonl with 'text'; images: a folder")
    pr.add_argument("--batch-size", type=int, default=64, help="inputs per forward pass")
    pr.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    pr.set_defaults(func=_cmd_predict)

    # explain
    xp = _add_parser(sub, "explain", "explain a checkpoint's decision: token attributions, Grad-CAM, attention maps",
                     description="ig: Integrated Gradients of the tokens of a text classifier (HTML page + JSON).\n"
                     "gradcam: Grad-CAM heat map over the image of a CNN / ResNet / ViT classifier (PNG + JSON).\n"
                     "attention: attention maps per layer and head of a BERT, ViT or GPT (PNG grid + JSON).\n"
                     "Files go to --out as NNN.METHOD.{html,png,json}, one set per input.\n\n"
                     "examples:\n  fromzero explain --checkpoint runs/RUN/checkpoints/best --text 'the film was good'\n"
                     "  fromzero explain --checkpoint runs/DIGITS/checkpoints/best --image 3.png --method gradcam\n"
                     "  fromzero explain --checkpoint runs/final/checkpoints/best --text 'ROMEO:' --method attention")
    xp.add_argument("--checkpoint", required=True, help="checkpoint directory (classifier, LoRA adapter, BERT, ViT, GPT)")
    xp.add_argument("--text", action="append", help="a text to explain (repeat for several)")
    xp.add_argument("--image", action="append", help="an image file to explain (repeat for several)")
    xp.add_argument("--input", help="texts: .txt (one per line), .csv or .jsonl with 'text'; images: a folder or a list of paths")
    xp.add_argument("--method", default="auto",
                    help="ig (text classifiers) | gradcam (image classifiers) | attention (transformers) | "
                    "auto (ig, else gradcam, else attention)")
    xp.add_argument("--target", default="auto", help="ig / gradcam: the class to explain, by name (auto: the predicted one)")
    xp.add_argument("--steps", type=int, default=50, help="ig: integration steps (raise when the delta is large)")
    xp.add_argument("--baseline", default="pad", help="ig: the token replacing every word in the baseline: pad | mask")
    xp.add_argument("--out", default="explanations", help="output directory")
    xp.add_argument("--force", action="store_true", help="overwrite existing output files")
    xp.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    xp.set_defaults(func=_cmd_explain)

    # serve
    sv = _add_parser(
        sub, "serve", "serve a checkpoint over an OpenAI-compatible HTTP API",
        description="FastAPI + uvicorn. POST /v1/completions and /v1/chat/completions (GPT; chat needs a "
        "chat template: the checkpoint's own, an SFT checkpoint's, or --chat-template; \"stream\": true for "
        "server-sent events), /v1/embeddings (BERT "
        "encoder), /v1/classify (text classifier); GET /v1/models, /health, /metrics (Prometheus).\n"
        "Concurrent generation requests are decoded together in one batch (continuous batching); a full "
        "queue answers 503 with Retry-After. SIGTERM finishes the requests in flight, then exits 0.\n\n"
        "examples:\n  fromzero serve --checkpoint runs/final/checkpoints/best --port 8000\n"
        "  curl localhost:8000/v1/completions -H 'Content-Type: application/json' "
        "-d '{\"prompt\": \"ROMEO:\", \"max_tokens\": 40}'",
    )
    sv.add_argument("--checkpoint", required=True, help="checkpoint directory (GPT, SFT GPT, BERT encoder or text classifier)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    sv.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port; the chosen one is printed)")
    sv.add_argument("--api-key", default=None,
                    help="require 'Authorization: Bearer KEY' on /v1/* (default: $FROMZERO_API_KEY, else no key); "
                    "/health and /metrics stay open")
    sv.add_argument("--max-batch-size", type=int, default=8, help="sequences decoded together at most")
    sv.add_argument("--max-queue", type=int, default=64,
                    help="requests waiting for a batch slot at most; more get 503 with Retry-After")
    sv.add_argument("--max-tokens-cap", type=int, default=0,
                    help="largest max_tokens a request may ask for (0: the model's context length)")
    sv.add_argument("--max-prompt-tokens", type=int, default=0,
                    help="longest prompt in tokens (0: the model's context length); without --sliding-window "
                    "prompt + max_tokens must also fit the context")
    sv.add_argument("--request-timeout", type=float, default=60.0,
                    help="seconds a request may take, queueing included; then 504 and its batch slot is freed")
    sv.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body; larger: 413")
    sv.add_argument("--sliding-window", action="store_true",
                    help="generate past the context like `fromzero generate` (each token sees the last "
                    "block_size tokens) instead of requiring prompt + max_tokens to fit it")
    sv.add_argument("--model-name", default="", help="model id clients use (default: the --checkpoint path)")
    sv.add_argument("--chat-template", metavar="FILE", default=None,
                    help="a Jinja chat template for /v1/chat/completions instead of the checkpoint's own "
                    "(lets a GPT without one chat; default: the checkpoint's)" + _OWN_DEFAULT)
    sv.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    sv.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                    help="uvicorn log level (info logs every request)")
    sv.set_defaults(func=_cmd_serve)

    # merge-lora
    ml = _add_parser(sub, "merge-lora", "fold a LoRA adapter into its base weights",
                     description="Write base + adapter (W + alpha/r * B @ A) as a plain checkpoint directory.\n\n"
                     "example:\n  fromzero merge-lora --checkpoint runs/RUN/checkpoints/best --out merged/")
    ml.add_argument("--checkpoint", required=True, help="adapter checkpoint directory (adapter_config.json)")
    ml.add_argument("--out", required=True, help="output checkpoint directory")
    ml.add_argument("--force", action="store_true", help="replace an existing output directory")
    ml.set_defaults(func=_cmd_merge_lora)

    # export
    ex = _add_parser(sub, "export", "export a checkpoint to ONNX (for onnxruntime and other runtimes)",
                     description="GPT: input_ids -> logits. BERT: input_ids, attention_mask [, token_type_ids] ->\n"
                     "logits / sentence_embedding / last_hidden_state. CNN, ViT: pixel_values -> logits.\n"
                     "Batch and sequence axes are dynamic. Writes FILE and FILE.json (input / output names\n"
                     "and shapes, labels, tokenizer). The file is checked with onnx.checker and, with --verify,\n"
                     "run in onnxruntime and compared with PyTorch; nothing is written if they differ.\n\n"
                     "example:\n  fromzero export --checkpoint runs/RUN/checkpoints/best --format onnx --out model.onnx")
    ex.add_argument("--checkpoint", required=True, help="checkpoint directory (LoRA adapters export merged)")
    ex.add_argument("--format", default="onnx", help="output format: onnx")
    ex.add_argument("--out", required=True, help="output file, e.g. model.onnx (a description goes to FILE.json)")
    ex.add_argument("--opset", type=int, default=20, help="ONNX opset version (18..23)")
    ex.add_argument("--force", action="store_true", help="replace an existing output file")
    ex.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                    help="run the file in onnxruntime and compare with PyTorch")
    ex.add_argument("--atol", type=float, default=1e-4, help="largest allowed |onnxruntime - PyTorch| with --verify")
    ex.add_argument("--device", default="cpu", help="cpu (export traces the model in fp32 on the CPU)")
    ex.set_defaults(func=_cmd_export)

    # prune
    pn = _add_parser(sub, "prune", "prune a checkpoint: zero small weights, or remove heads and MLP channels",
                     description="magnitude: zero the smallest weights of every Linear/Conv layer (same size and "
                     "speed with dense kernels).\nstructured: remove the least important attention heads and MLP "
                     "channels of every layer (BERT, GPT): a smaller, faster checkpoint.\nWrites a checkpoint "
                     "directory + pruning.json.\n\nexamples:\n  fromzero prune --checkpoint runs/RUN/checkpoints/best "
                     "--method structured --sparsity 0.5 --out pruned/ --recover-steps 200 --eval\n"
                     "  fromzero prune --checkpoint runs/final/checkpoints/best --method magnitude --sparsity 0.5 "
                     "--out sparse/ --data data/shakespeare-char --eval")
    pn.add_argument("--checkpoint", required=True, help="checkpoint directory to prune (left unchanged)")
    pn.add_argument("--sparsity", type=float, required=True,
                    help="fraction in [0, 1) of each layer's weights (magnitude) or heads and MLP channels (structured) to remove")
    pn.add_argument("--method", default="magnitude", help="magnitude | structured")
    pn.add_argument("--out", required=True, help="output checkpoint directory")
    pn.add_argument("--force", action="store_true", help="replace an existing output directory")
    pn.add_argument("--scope", default="layer", help="magnitude: layer (each matrix) | global (one threshold)")
    pn.add_argument("--importance", default="auto",
                    help="structured: taylor (|w * grad| on training batches) | weight (L2 norm) | auto (taylor if data)")
    pn.add_argument("--gqa", default="queries",
                    help="structured, grouped-query GPTs: queries (query heads within each kv group) | groups (whole kv groups)")
    pn.add_argument("--importance-batches", type=int, default=8, help="structured, taylor: batches to sum gradients over")
    pn.add_argument("--recover-steps", type=int, default=0, help="fine-tune this many steps after pruning (0 = none)")
    pn.add_argument("--lr", type=float, default=None, help="recovery learning rate (default: from the checkpoint's run)")
    pn.add_argument("--batch-size", type=int, default=None, help="recovery / importance batch size (default: the run's)")
    pn.add_argument("--data", help="data for importance, recovery and --eval (default: the checkpoint's run data; "
                    "GPTs: a prepared data directory)")
    pn.add_argument("--eval", action="store_true", help="score the model before and after (and time a forward pass)")
    pn.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    pn.add_argument("--seed", type=int, default=0, help="seed of the importance / recovery batches")
    pn.add_argument("--quiet", action="store_true", help="no progress bar")
    pn.set_defaults(func=_cmd_prune)

    # quantize
    qz = _add_parser(sub, "quantize", "store a checkpoint's weights in int8 / int4 (smaller; int8-dynamic: faster on CPU)",
                     description="int8-dynamic: int8 weights + int8 activations quantized per call (PyTorch's quantized "
                     "CPU kernels; CPU only).\nint8-weight: int8 weights, float matmul (any device).\nint4-weight: "
                     "4-bit weights in groups of --group-size, each with a scale and offset (any device).\nEmbedding "
                     "tables are stored int8 per row (a tied GPT head reads the same table) unless --skip-embeddings; "
                     "convolutions stay float. Writes a checkpoint directory (+ quantization.json) that generate, "
                     "predict, evaluate, embed and serve load as any other.\n\nexample:\n  fromzero quantize "
                     "--checkpoint runs/RUN/checkpoints/best --method int8-dynamic --out q8/ --eval")
    qz.add_argument("--checkpoint", required=True, help="float checkpoint directory (or LoRA adapter) to quantize (left unchanged)")
    qz.add_argument("--method", required=True, help="int8-dynamic | int8-weight | int4-weight")
    qz.add_argument("--out", required=True, help="output checkpoint directory")
    qz.add_argument("--group-size", type=int, default=128, help="int4-weight: input features per scale/offset group")
    qz.add_argument("--skip-embeddings", action="store_true", help="keep embedding tables (and a tied head) float")
    qz.add_argument("--force", action="store_true", help="replace an existing output directory")
    qz.add_argument("--eval", action="store_true",
                    help="score the float and the quantized checkpoint (classifiers: accuracy, macro-F1; LMs: loss)")
    qz.add_argument("--data", help="--eval data (default: the checkpoint's run data; GPTs: a prepared data directory)")
    qz.add_argument("--split", help="--eval split (default: test for classifiers, val for language models)")
    qz.add_argument("--batch-size", type=int, default=64, help="--eval examples per forward pass")
    qz.add_argument("--device", default="auto", help="--eval device: auto | cpu | cuda (int8-dynamic: always cpu)")
    qz.set_defaults(func=_cmd_quantize)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(with_pretrain_help="pretrain" in argv,
                          with_finetune_help="finetune" in argv or "crossval" in argv)
    # --debug (a traceback instead of the one-line error) works before or after the verb.
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        args, extra = parser.parse_known_args(argv)
        if not getattr(args, "func", None):
            # A group without an action (``fromzero data``) or no command: show help.
            sub_help = {"data": "data", "tokenizer": "tokenizer"}.get(getattr(args, "command", None) or "")
            parser.parse_args([sub_help, "--help"] if sub_help else ["--help"])
            return 2
        if getattr(args, "takes_overrides", False):
            return args.func(args, extra)
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if getattr(args, "checkpoint", None):  # a built-in model name or a .gguf file works too
            from fromzero.models.builtin import resolve_model

            args.checkpoint = str(resolve_model(args.checkpoint))
        return args.func(args)
    except FromzeroError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
