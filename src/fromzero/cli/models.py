"""``fromzero convert``, ``merge-lora``, ``export``, ``prune`` and ``quantize``: checkpoints into other
checkpoints or files."""

from __future__ import annotations

import argparse
from pathlib import Path

from fromzero.cli import _OWN_DEFAULT, _add_parser
from fromzero.errors import FromzeroError


def _add_convert(sub: argparse._SubParsersAction) -> None:
    conv = _add_parser(
        sub, "convert", "convert weights between Hugging Face, GGUF and fromzero", func=_cmd_convert,
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
        "  fromzero convert to-hf runs/latest/checkpoints/best exported/\n"
        "  fromzero convert from-gguf SmolLM2-135M-Instruct.Q4_1.gguf checkpoints/smollm2\n"
        "  fromzero convert to-gguf runs/latest/checkpoints/best model.gguf --type q8_0",
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


def _add_merge_lora(sub: argparse._SubParsersAction) -> None:
    ml = _add_parser(sub, "merge-lora", "fold a LoRA adapter into its base weights", func=_cmd_merge_lora,
                     description="Write base + adapter (W + alpha/r * B @ A) as a plain checkpoint directory.\n\n"
                     "example:\n  fromzero merge-lora --checkpoint runs/latest/checkpoints/best --out merged/")
    ml.add_argument("--checkpoint", required=True, help="adapter checkpoint directory (adapter_config.json)")
    ml.add_argument("--out", required=True, help="output checkpoint directory")
    ml.add_argument("--force", action="store_true", help="replace an existing output directory")


def _add_export(sub: argparse._SubParsersAction) -> None:
    ex = _add_parser(sub, "export", "export a checkpoint to ONNX (for onnxruntime and other runtimes)",
                     description="GPT: input_ids -> logits. BERT: input_ids, attention_mask [, token_type_ids] ->\n"
                     "logits / sentence_embedding / last_hidden_state. CNN, ViT: pixel_values -> logits.\n"
                     "Batch and sequence axes are dynamic. Writes FILE and FILE.json (input / output names\n"
                     "and shapes, labels, tokenizer). The file is checked with onnx.checker and, with --verify,\n"
                     "run in onnxruntime and compared with PyTorch; nothing is written if they differ.\n\n"
                     "example:\n  fromzero export --checkpoint runs/latest/checkpoints/best --format onnx --out model.onnx",
                     func=_cmd_export)
    ex.add_argument("--checkpoint", required=True, help="checkpoint directory (LoRA adapters export merged)")
    ex.add_argument("--format", default="onnx", help="output format: onnx")
    ex.add_argument("--out", required=True, help="output file, e.g. model.onnx (a description goes to FILE.json)")
    ex.add_argument("--opset", type=int, default=20, help="ONNX opset version (18..23)")
    ex.add_argument("--force", action="store_true", help="replace an existing output file")
    ex.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                    help="run the file in onnxruntime and compare with PyTorch")
    ex.add_argument("--atol", type=float, default=1e-4, help="largest allowed |onnxruntime - PyTorch| with --verify")
    ex.add_argument("--device", default="cpu", help="cpu (export traces the model in fp32 on the CPU)")


def _add_prune(sub: argparse._SubParsersAction) -> None:
    pn = _add_parser(sub, "prune", "prune a checkpoint: zero small weights, or remove heads and MLP channels",
                     description="magnitude: zero the smallest weights of every Linear/Conv layer (same size and "
                     "speed with dense kernels).\nstructured: remove the least important attention heads and MLP "
                     "channels of every layer (BERT, GPT): a smaller, faster checkpoint.\nWrites a checkpoint "
                     "directory + pruning.json.\n\nexamples:\n  fromzero prune --checkpoint runs/latest/checkpoints/best "
                     "--method structured --sparsity 0.5 --out pruned/ --recover-steps 200 --eval\n"
                     "  fromzero prune --checkpoint runs/latest/checkpoints/best --method magnitude --sparsity 0.5 "
                     "--out sparse/ --data data/shakespeare-char --eval", func=_cmd_prune)
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


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    qz = _add_parser(sub, "quantize", "store a checkpoint's weights in int8 / int4 (smaller; int8-dynamic: faster on CPU)",
                     description="int8-dynamic: int8 weights + int8 activations quantized per call (PyTorch's quantized "
                     "CPU kernels; CPU only).\nint8-weight: int8 weights, float matmul (any device).\nint4-weight: "
                     "4-bit weights in groups of --group-size, each with a scale and offset (any device).\nEmbedding "
                     "tables are stored int8 per row (a tied GPT head reads the same table) unless --skip-embeddings; "
                     "convolutions stay float. Writes a checkpoint directory (+ quantization.json) that generate, "
                     "predict, evaluate, embed and serve load as any other.\n\nexample:\n  fromzero quantize "
                     "--checkpoint runs/latest/checkpoints/best --method int8-dynamic --out q8/ --eval",
                     func=_cmd_quantize)
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


# verb -> the function that adds its parser (cli.build_parser calls them in --help order)
PARSERS = {"convert": _add_convert, "merge-lora": _add_merge_lora, "export": _add_export, "prune": _add_prune,
           "quantize": _add_quantize}
