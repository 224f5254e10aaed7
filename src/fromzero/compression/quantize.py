"""Quantization: store a trained model's weights in 8 or 4 bits, and run it that way.

``fromzero quantize --checkpoint DIR --method M --out DIR`` writes a checkpoint directory that
``load_model`` (and so ``predict``, ``evaluate``, ``generate``, ``embed``, ``serve``) reads like
any other. Three methods:

* ``int8-dynamic`` (the CPU speed path): int8 weights, one scale per output channel (symmetric),
  and the *input* quantized to int8 per call, so the matmul runs in int8 with int32 accumulation
  (PyTorch's quantized CPU kernels, ``torch.ops.quantized.linear_dynamic``). CPU only.
* ``int8-weight``: the same int8 weights, the matmul in floating point (``(x @ W_int8^T) * scale
  + bias``): saves memory and bandwidth (what limits one-token decoding on a GPU), on every device.
* ``int4-weight``: two weights per byte, in groups of ``group_size`` input features of one output
  row, each with a scale and offset (``w = q * scale + offset``, q in 0..15), dequantised before a
  float matmul. A layer whose ``in_features`` the group size does not divide falls back to int8.

Embedding tables are stored int8 with one scale per row unless ``--skip-embeddings``. A GPT head
tied to its token embedding reads the *same* int8 table (a row's scale is exactly the head's
per-output-channel scale), so it is stored once and both users stay consistent. Convolutions stay
float. ``model.safetensors`` holds the int8 / uint8 ``qweight`` tensors and fp32 scales next to
the float tensors; ``config.json`` gets a ``quantization`` block (method, group size, which module
became what), from which :func:`load_quantized` rebuilds the architecture; ``quantization.json``
is the report. No pickles.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from fromzero.errors import FromzeroError
from fromzero.models.quantized import (FORMAT_VERSION, INT4_WEIGHT, INT8_DYNAMIC, QuantizeOptions, load_quantized,
                                       quantize_model, require_int8_dynamic)
from fromzero.tasks import get_task

REPORT_FILE = "quantization.json"

# Files of a source checkpoint that are not copied (weights are rewritten; optimizer state and
# pickles do not belong in an inference artifact).
_NOT_COPIED = {"model.safetensors", "config.json", "trainer_state.pt", "adapter_config.json",
               "adapter_model.safetensors", REPORT_FILE}
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".safetensors")


def load_quantized_checkpoint(directory: Path, device: str | torch.device = "cpu") -> nn.Module:
    """The loader of quantized checkpoints, registered in :mod:`fromzero.checkpoint`."""
    from fromzero.checkpoint import CONFIG_FILE, read_json

    return load_quantized(directory, read_json(Path(directory) / CONFIG_FILE, "model config"), device)


def weights_bytes(model: nn.Module) -> int:
    """Bytes of the tensors a checkpoint of ``model`` stores (shared tensors once)."""
    from fromzero.checkpoint import model_state_for_saving

    return sum(t.numel() * t.element_size() for t in model_state_for_saving(model).values())


def _copy_side_files(src: Path, dst: Path) -> list[str]:
    """Tokenizer / info / vocabulary files of the source checkpoint (no weights, no pickles)."""
    copied = []
    for path in sorted(src.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir():
            if path.name == "tokenizer":
                shutil.copytree(path, dst / path.name)
                copied.append(path.name + "/")
            continue
        if path.name in _NOT_COPIED or path.suffix in _PICKLE_SUFFIXES:
            continue
        shutil.copyfile(path, dst / path.name)
        copied.append(path.name)
    return copied


def _source_data(src: Path) -> str | None:
    """The data a checkpoint was trained on, from its run's config.yaml (None if unknown)."""
    from fromzero.inference.predict import run_config

    made_by = run_config(src)
    data = made_by.get("data") or made_by.get("data_dir")
    if isinstance(data, dict):  # pretraining recipes: data: {dir: ...}
        data = data.get("dir")
    return str(data) if data else None


def quantize_checkpoint(checkpoint: str | Path, out: str | Path, options: QuantizeOptions,
                        force: bool = False, evaluate: bool = False, data: str | None = None,
                        split: str | None = None, batch_size: int = 64, device: str = "auto"
                        ) -> dict[str, Any]:
    """``fromzero quantize``: load, quantize, write ``out`` atomically; returns the report.

    evaluate: also score the source and the quantized checkpoint on ``split`` of ``data``
    (default: the data of the run that made the checkpoint; the test split for classifiers, val
    for language models) with :func:`fromzero.inference.predict.evaluate_checkpoint`.
    """
    from fromzero.checkpoint import checkpoint_info
    from fromzero.checkpoint import (CONFIG_FILE, INFO_FILE, MODEL_FILE, atomic_directory, load_model,
                                              model_state_for_saving, read_json, recover_directory,
                                              write_info, write_safetensors)

    options.validate()
    src, out = Path(checkpoint), Path(out)
    recover_directory(src)
    if not src.is_dir():
        raise FromzeroError(f"checkpoint directory not found: {src}")
    config = read_json(src / CONFIG_FILE, "model config")
    if config.get("quantization"):
        method = config["quantization"].get("method") if isinstance(config["quantization"], dict) else "?"
        raise FromzeroError(f"{src} is already quantized ({method}): quantize the original float checkpoint")
    if out.exists() and out.resolve() == src.resolve():
        raise FromzeroError("--out must be a new directory, not the --checkpoint itself")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FromzeroError(f"{out} already exists; pass --force to replace it")
    if options.method == INT8_DYNAMIC:
        require_int8_dynamic("cpu")
    if batch_size <= 0:
        raise FromzeroError("--batch-size must be positive")
    task = checkpoint_info(src)["task"]
    if evaluate:
        data = data or _source_data(src)
        if not data:
            raise FromzeroError("--eval needs --data: the checkpoint's run config names no data")
        about = get_task(task)
        split = split or (about.eval_split if about is not None else "test")

    model = load_model(src, "cpu")
    fp32_state_bytes = weights_bytes(model)
    source_file = src / MODEL_FILE
    before = source_file.stat().st_size if source_file.is_file() else fp32_state_bytes
    plan = quantize_model(model, options)

    block = {"format": FORMAT_VERSION, "method": options.method, "group_size": options.group_size,
             "embeddings": options.embeddings, "torch_version": torch.__version__, "layers": plan}
    out_config = {**config, "quantization": block}
    info = read_json(src / INFO_FILE, "checkpoint info") if (src / INFO_FILE).is_file() else {}
    info = {k: v for k, v in info.items() if k != "adapter"} | {"quantized_from": str(src.resolve()),
                                                                 "quantization": options.method}
    counts = Counter(e["kind"] + (" (tied head)" if e.get("tied_to") else "") for e in plan.values())
    report: dict[str, Any] = {
        "source": str(src), "out": str(out), "method": options.method, "group_size": options.group_size,
        "embeddings": options.embeddings, "task": task, "layers": dict(counts),
        "fallback": {name: e["fallback"] for name, e in plan.items() if "fallback" in e},
        "float_layers": sorted(name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))),
        "float_convolutions": sum(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules()),
    }
    with atomic_directory(out) as tmp:
        write_safetensors(model_state_for_saving(model), tmp / MODEL_FILE,
                          metadata={"quantization": options.method})
        (tmp / CONFIG_FILE).write_text(json.dumps(out_config, indent=2) + "\n")
        copied = _copy_side_files(src, tmp)
        write_info(tmp / INFO_FILE, info)
        after = (tmp / MODEL_FILE).stat().st_size
        report["copied"] = sorted(set(copied) | {INFO_FILE})
        report["size"] = {"fp32_bytes": before, "quantized_bytes": after, "ratio": round(after / before, 4)}
        if evaluate:  # on the finished files, before they are committed: the report is written once
            report["eval"] = _compare_quality(src, tmp, str(data), str(split), batch_size, device, options.method)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


_QUALITY_KEYS = ("accuracy", "f1_macro", "loss", "perplexity")


def _compare_quality(src: Path, out: Path, data: str, split: str, batch_size: int, device: str,
                     method: str) -> dict[str, Any]:
    """The same metrics of the float and the quantized checkpoint (same data, split, device)."""
    from fromzero.inference.predict import evaluate_checkpoint

    if method == INT8_DYNAMIC:
        device = "cpu"  # both on the device the quantized model can use
    fp32 = evaluate_checkpoint(src, data, split, batch_size, device)
    quant = evaluate_checkpoint(out, data, split, batch_size, device)
    result: dict[str, Any] = {"data": data, "split": split, "device": device}
    for key in _QUALITY_KEYS:
        if key in fp32 and key in quant:
            result[key] = {"fp32": fp32[key], "quantized": quant[key], "change": quant[key] - fp32[key]}
    return result


def format_report(report: dict[str, Any]) -> str:
    """The lines ``fromzero quantize`` prints."""
    size = report["size"]
    layers = ", ".join(f"{n} {kind}" for kind, n in sorted(report["layers"].items()))
    lines = [
        f"quantized {report['source']} -> {report['out']} ({report['method']}"
        + (f", group size {report['group_size']}" if report["method"] == INT4_WEIGHT else "") + f"): {layers}",
        f"weights on disk: {size['fp32_bytes']:,} -> {size['quantized_bytes']:,} bytes "
        f"({100 * size['ratio']:.1f}% of fp32, {1 / size['ratio']:.2f}x smaller)",
    ]
    for name, why in report.get("fallback", {}).items():
        lines.append(f"  {name}: int8 weight-only ({why})")
    if "eval" in report:
        ev = report["eval"]
        parts = []
        for key in _QUALITY_KEYS:
            if key in ev:
                v = ev[key]
                change = (f"{100 * v['change']:+.2f} pt" if key in ("accuracy", "f1_macro") else
                          f"{v['change']:+.4f}")
                parts.append(f"{key} {v['fp32']:.4f} -> {v['quantized']:.4f} ({change})")
        lines.append(f"quality on {ev['data']} ({ev['split']}): " + ", ".join(parts))
    lines.append(f"report: {Path(report['out']) / REPORT_FILE}")
    return "\n".join(lines)
