"""Export a checkpoint to ONNX, so that programs without PyTorch (onnxruntime, in any language) run it.

Every checkpoint :func:`fromzero.checkpoint.load_model` reads exports (LoRA adapters merged)::

    fromzero-gpt   input_ids (batch, sequence) int64                      -> logits (batch, sequence, vocab)
    fromzero-bert  input_ids, attention_mask [, token_type_ids] (batch, sequence) int64
                   -> logits | sentence_embedding | last_hidden_state   (by the model's head)
    fromzero-cnn   pixel_values (batch, channels, height, width) float32 -> logits (batch, classes)
    fromzero-vit   pixel_values (batch, channels, H, W) float32 (H, W fixed by the config) -> logits

Batch and sequence axes are dynamic, as are a CNN's height and width. How:
``torch.onnx.export(..., dynamo=True)`` of the model (plain tensors in, one tensor out), on the
CPU in fp32, in eval mode. Under torch.export ``torch.compiler.is_compiling()`` is true, which
keeps the models' data-dependent eager fast paths (BERT's padding packing) out of the graph;
GPT's column-major decode layout is switched off first.

The file is checked with ``onnx.checker`` and, in onnxruntime, against PyTorch on an input of
another shape than the one traced, in a temporary directory next to ``--out``; only then is it
renamed into place, with a sidecar ``FILE.json`` that says how to call it.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from fromzero.files import temp_dir_beside
from fromzero.errors import FromzeroError

FORMATS = ("onnx",)
# torch 2.14's dynamo exporter implements opsets 18 .. torch.onnx's ONNX_MAX_OPSET (23); it
# "converts" to lower ones on a best-effort basis that may silently keep 18, so those are refused.
MIN_OPSET = 18
DEFAULT_OPSET = 20  # torch's default: read by every onnxruntime since 1.17
DEFAULT_ATOL = 1e-4
SIDECAR_SUFFIX = ".json"

# Sizes of the input the graph is traced with, and of the (different) one it is verified with.
_TRACE = {"batch": 2, "sequence": 8}
_VERIFY = {"batch": 3, "sequence": 11}
# A CNN's spatial axes: dynamic, at least this big (torchvision ResNets downsample 32x; any
# positive size works, the bound just keeps torch.export from specialising small sizes).
_MIN_IMAGE_SIDE = 2
_MAX_IMAGE_SIDE = 1 << 14


def max_opset() -> int:
    """The newest opset the installed exporter writes."""
    from torch.onnx import _constants

    return int(getattr(_constants, "ONNX_MAX_OPSET", 23))


@dataclass
class TensorSpec:
    """One input or output of the exported graph: name, element type and shape (a str per
    dynamic axis, e.g. ``["batch", "sequence"]``)."""

    name: str
    dtype: str
    shape: list[int | str]

    def describe(self) -> str:
        return f"{self.name}[{','.join(str(d) for d in self.shape)}] {self.dtype}"


@dataclass
class ExportPlan:
    """How one checkpoint becomes a graph: the module to trace and the inputs it takes.

    ``make_inputs(sizes, generator)`` builds example input tensors (in ``inputs`` order) for
    the named axis sizes; ``axes`` gives each dynamic axis's (min, max) for torch.export.
    """

    module: nn.Module
    inputs: list[TensorSpec]
    output_names: list[str]
    make_inputs: Callable[[dict[str, int], torch.Generator], tuple[torch.Tensor, ...]]
    axes: dict[str, tuple[int, int]]
    trace_sizes: dict[str, int]
    verify_sizes: dict[str, int]
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote and how it checked it."""

    path: Path
    sidecar: Path
    size_bytes: int
    opset: int
    model_type: str
    task: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    max_abs_diff: float | None
    verified_on: dict[str, int] | None
    extra_files: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        """The one line ``fromzero export`` prints."""
        size = _human_size(self.size_bytes + sum(p.stat().st_size for p in self.extra_files))
        line = (f"wrote {self.path} ({size}, opset {self.opset}, {self.model_type}): inputs "
                f"{', '.join(s.describe() for s in self.inputs)}; outputs "
                f"{', '.join(s.describe() for s in self.outputs)}")
        if self.max_abs_diff is not None:
            shape = ", ".join(f"{k} {v}" for k, v in (self.verified_on or {}).items())
            line += f"; onnxruntime vs PyTorch max abs diff {self.max_abs_diff:.1e} ({shape})"
        return line + f"; how to call it: {self.sidecar}"


def _human_size(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


class FirstOutput(nn.Module):
    """The model with plain tensors in and one tensor out (GPT and BERT also return a loss, or None)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        out = self.model(*inputs)
        return out[0] if isinstance(out, tuple) else out


class AllOutputs(nn.Module):
    """The model with plain tensors in and its tuple of tensors out (a detector's heads)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model(*inputs))


# ---------------------------------------------------------------------------------------------
# Plans per model family


def _text_notes(directory: Path, info: dict[str, Any], encoder: bool = False) -> dict[str, Any]:
    tokenizer = directory / "tokenizer.json"
    # An encoder's tokenizer.json may pad every text to a fixed length (MiniLM's pads to 128):
    # its attention_mask must be fed with the ids, or the padding is attended to.
    recipe = ("enc = tokenizers.Tokenizer.from_file(tokenizer).encode(text) (encode_batch for several); "
              "feed input_ids = enc.ids and attention_mask = enc.attention_mask (and token_type_ids = "
              "enc.type_ids where the model takes them) as int64 arrays of shape (batch, sequence). This "
              "tokenizer may pad to a fixed length: always feed its attention_mask, never a mask of ones. "
              "The ONNX file holds only the network" if encoder else
              "turn text into input_ids with this tokenizer.json (Hugging Face `tokenizers`: "
              "Tokenizer.from_file(path).encode(text).ids); the ONNX file holds only the network")
    return {
        "tokenizer": str(tokenizer.resolve()) if tokenizer.is_file() else None,
        "tokenizer_note": recipe if tokenizer.is_file() else
        "the checkpoint has no tokenizer.json: token ids must come from the tokenizer it was trained with",
        **({"max_length": info["max_length"]} if "max_length" in info else {}),
    }


def _gpt_plan(model: nn.Module, directory: Path, info: dict[str, Any]) -> ExportPlan:
    config = model.config
    if hasattr(model, "use_decode_layout"):
        model.use_decode_layout(False)  # a row-major graph (the layout is an eager CPU speed trick)
    V, block = int(config.vocab_size), int(config.block_size)

    def make_inputs(sizes: dict[str, int], gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        return (torch.randint(0, V, (sizes["batch"], sizes["sequence"]), generator=gen),)

    return ExportPlan(
        module=FirstOutput(model),
        inputs=[TensorSpec("input_ids", "int64", ["batch", "sequence"])],
        output_names=["logits"],
        make_inputs=make_inputs,
        axes={"batch": (1, 1 << 20), "sequence": (1, block)},
        trace_sizes=_clamp(_TRACE, block), verify_sizes=_clamp(_VERIFY, block),
        notes={**_text_notes(directory, info), "max_sequence_length": block,
               "output_note": "logits[:, t] scores the token after position t (softmax over the last axis)"},
    )


def _bert_plan(model: nn.Module, directory: Path, info: dict[str, Any]) -> ExportPlan:
    config = model.config
    V, limit, types = int(config.vocab_size), int(config.max_position_embeddings), int(config.type_vocab_size)
    pad = int(config.pad_token_id or 0)
    output = {"classification": "logits", "mlm": "logits", "qa": "logits", "embedding": "sentence_embedding",
              "none": "last_hidden_state"}[config.head]
    inputs = [TensorSpec("input_ids", "int64", ["batch", "sequence"]),
              TensorSpec("attention_mask", "int64", ["batch", "sequence"])]
    if types > 1:  # segment ids only where the model has more than one segment embedding
        inputs.append(TensorSpec("token_type_ids", "int64", ["batch", "sequence"]))

    def make_inputs(sizes: dict[str, int], gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        B, T = sizes["batch"], sizes["sequence"]
        ids = torch.randint(0, V, (B, T), generator=gen)
        mask = torch.ones(B, T, dtype=torch.long)
        for row in range(1, B):  # right padding of varied lengths (never a row of padding only)
            keep = max(1, T - row * max(1, T // (B + 1)))
            mask[row, keep:] = 0
            ids[row, keep:] = pad
        tensors = [ids, mask]
        if types > 1:
            tensors.append(torch.randint(0, types, (B, T), generator=gen) * mask)
        return tuple(tensors)

    notes = {**_text_notes(directory, info, encoder=True), "max_sequence_length": limit, "pad_token_id": pad,
             "input_note": ("attention_mask is 1 for tokens, 0 for padding (pad on the right)"
                            + ("; token_type_ids are 0 for the first text (all 0 for a single text)"
                               if types > 1 else ""))}
    if config.head == "qa":
        notes["output_note"] = "logits[..., 0] / [..., 1]: answer start / end score of each token"
    if config.head == "embedding":
        notes["output_note"] = (f"{config.pooling} pooling" + (", L2-normalised" if config.normalize else "")
                                + ", as `fromzero embed`")
    return ExportPlan(
        module=FirstOutput(model), inputs=inputs, output_names=[output], make_inputs=make_inputs,
        axes={"batch": (1, 1 << 20), "sequence": (1, limit)},
        trace_sizes=_clamp(_TRACE, limit), verify_sizes=_clamp(_VERIFY, limit), notes=notes,
    )


def _image_plan(model: nn.Module, raw_config: dict[str, Any], info: dict[str, Any]) -> ExportPlan:
    is_vit = raw_config.get("model_type") == "fromzero-vit"
    if is_vit:
        channels = int(model.config.num_channels)
        height, width = model.image_size
        shape: list[int | str] = ["batch", channels, height, width]  # position embeddings fix the size
        axes = {"batch": (1, 1 << 20)}
        output = "logits" if model.head is not None else "last_hidden_state"
    else:
        channels = int(raw_config.get("in_channels", 3))
        side = int(info.get("image_size") or 64)
        height = width = side
        shape = ["batch", channels, "height", "width"]
        axes = {"batch": (1, 1 << 20), "height": (_MIN_IMAGE_SIDE, _MAX_IMAGE_SIDE),
                "width": (_MIN_IMAGE_SIDE, _MAX_IMAGE_SIDE)}
        output = "logits"

    def make_inputs(sizes: dict[str, int], gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        return (torch.randn(sizes["batch"], channels, sizes.get("height", height), sizes.get("width", width),
                            generator=gen),)

    preprocessing = {k: info[k] for k in ("image_size", "resize_size", "channels", "mean", "std") if k in info}
    notes: dict[str, Any] = {
        "input_note": ("float32 images, channels first; "
                       + ("resize the short side to resize_size, centre-crop image_size, scale to [0, 1], normalise "
                          "with mean / std (see preprocessing), as `fromzero predict` does"
                          if preprocessing else "preprocess as the model was trained")),
        **({"preprocessing": preprocessing} if preprocessing else {}),
    }
    return ExportPlan(
        module=FirstOutput(model), inputs=[TensorSpec("pixel_values", "float32", shape)],
        output_names=[output], make_inputs=make_inputs, axes=axes,
        trace_sizes={"batch": _TRACE["batch"], "height": height, "width": width},
        verify_sizes={"batch": _VERIFY["batch"], "height": height, "width": width}, notes=notes,
    )


def _detector_plan(model: nn.Module, raw_config: dict[str, Any], info: dict[str, Any]) -> ExportPlan:
    """A CenterNet: images in [0, 1] -> the raw heads (heat-map logits, sizes and offsets in cells of
    4 pixels); the sidecar says how to decode them (fromzero.models.centernet.decode)."""
    channels = int(raw_config.get("in_channels", 1))

    def make_inputs(sizes: dict[str, int], gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        return (torch.rand(sizes["batch"], channels, sizes["height"], sizes["width"], generator=gen),)

    notes = {
        "input_note": "float32 images, channels first, pixels / 255 (no normalisation); height and width multiples "
                      "of 8 (pad bottom / right with zeros)",
        "decode": "p = sigmoid(heatmap); keep cells equal to the 3x3 max-pool of p (max-pool NMS); for each kept cell "
                  "(class k, row i, column j) with score p: centre = ((j + offset[0]) * 4, (i + offset[1]) * 4), "
                  "width = size[0] * 4, height = size[1] * 4 (pixels); class k is labels[k]",
        "labels": raw_config.get("labels"), "category_ids": raw_config.get("category_ids"),
    }
    return ExportPlan(
        module=AllOutputs(model), inputs=[TensorSpec("pixel_values", "float32", ["batch", channels, "height", "width"])],
        output_names=["heatmap", "size", "offset"], make_inputs=make_inputs,
        axes={"batch": (1, 1 << 20), "height": (8, _MAX_IMAGE_SIDE), "width": (8, _MAX_IMAGE_SIDE)},
        trace_sizes={"batch": _TRACE["batch"], "height": 64, "width": 64},
        verify_sizes={"batch": _VERIFY["batch"], "height": 96, "width": 64}, notes=notes,
    )


def _clamp(sizes: dict[str, int], max_len: int) -> dict[str, int]:
    return {**sizes, "sequence": max(1, min(sizes["sequence"], max_len))}


def export_plan(model: nn.Module, raw_config: dict[str, Any], directory: Path, info: dict[str, Any]) -> ExportPlan:
    """The :class:`ExportPlan` of a loaded model (its family read from config.json's model_type)."""
    from fromzero.models import MODEL_REGISTRY, family_facts

    model_type = raw_config.get("model_type")
    signature = family_facts(model_type).export_signature if model_type in MODEL_REGISTRY else ""
    if signature == "causal-lm":
        return _gpt_plan(model, directory, info)
    if signature == "encoder":
        return _bert_plan(model, directory, info)
    if signature == "image":
        return _image_plan(model, raw_config, info)
    if signature == "detector":
        return _detector_plan(model, raw_config, info)
    exportable = ", ".join(t for t in sorted(MODEL_REGISTRY) if family_facts(t).export_signature)
    raise FromzeroError(f"cannot export a {model_type!r} model to ONNX (exportable: {exportable})")


# ---------------------------------------------------------------------------------------------
# Export


def _dynamic_shapes(plan: ExportPlan) -> dict[str, tuple[dict[int, Any], ...]]:
    """torch.export's dynamic_shapes of FirstOutput's ``*inputs``: one shared Dim per axis name (so all
    inputs agree on it)."""
    from torch.export import Dim

    dims = {}
    for name, (low, high) in plan.axes.items():
        if high < 2:  # a 1-long axis cannot be dynamic (torch.export specialises it): keep it static
            continue
        dims[name] = Dim(name, min=low, max=high)
    return {"inputs": tuple({i: dims[d] for i, d in enumerate(spec.shape) if isinstance(d, str) and d in dims}
                            for spec in plan.inputs)}


def _trace_to_onnx(plan: ExportPlan, opset: int) -> Any:
    """torch.onnx.export (dynamo) of the plan's module; returns the ONNXProgram."""
    gen = torch.Generator().manual_seed(0)
    sample = plan.make_inputs(plan.trace_sizes, gen)
    with warnings.catch_warnings():
        # torch.onnx reports that the axis names it was given are kept (one warning per input)
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used", category=UserWarning)
        return torch.onnx.export(
            plan.module, sample, dynamo=True, input_names=[s.name for s in plan.inputs],
            output_names=plan.output_names, dynamic_shapes=_dynamic_shapes(plan), opset_version=opset,
            verbose=False, external_data=None,
        )


def _graph_io(path: Path) -> tuple[list[TensorSpec], list[TensorSpec], int]:
    """Inputs and outputs as written in the graph (names, element types, dims or axis names), and
    the graph's opset."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def spec(value: Any) -> TensorSpec:
        t = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
        dims: list[int | str] = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
        return TensorSpec(value.name, dtype, dims)

    opset = max(int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return [spec(v) for v in model.graph.input], [spec(v) for v in model.graph.output], opset


def onnx_session(path: Path) -> Any:
    """An onnxruntime CPU session for ``path`` (threads as many as torch uses)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def torch_outputs(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """The PyTorch model's own outputs for ``inputs`` (eager: its fast paths included)."""
    with torch.no_grad():
        out = module(*inputs)
    return [out] if isinstance(out, torch.Tensor) else list(out)


def verify_onnx(path: Path, plan: ExportPlan) -> tuple[float, dict[str, int]]:
    """Run ``path`` in onnxruntime and PyTorch on the plan's verification input; return the largest
    absolute difference over all outputs and the axis sizes of that input."""
    import numpy as np

    gen = torch.Generator().manual_seed(1)
    inputs = plan.make_inputs(plan.verify_sizes, gen)
    session = onnx_session(path)
    got = session.run(None, {spec.name: t.numpy() for spec, t in zip(plan.inputs, inputs)})
    expected = torch_outputs(plan.module, inputs)
    if len(got) != len(expected):
        raise FromzeroError(f"{path}: the graph has {len(got)} outputs, PyTorch gives {len(expected)}")
    diff = 0.0
    for g, e in zip(got, expected):
        e = e.float().numpy()
        if g.shape != e.shape:
            raise FromzeroError(f"{path}: onnxruntime output shape {g.shape} differs from PyTorch's {e.shape}")
        diff = max(diff, float(np.max(np.abs(g.astype(np.float64) - e.astype(np.float64)), initial=0.0)))
    return diff, dict(plan.verify_sizes)


def sidecar_path(out: Path) -> Path:
    """Where the description of ``out`` goes: ``model.onnx`` -> ``model.onnx.json``."""
    return out.with_name(out.name + SIDECAR_SUFFIX)


def _check_request(checkpoint: Path, out: Path, fmt: str, opset: int, force: bool, atol: float) -> None:
    """Refuse bad arguments before loading anything (the export itself takes seconds)."""
    if fmt not in FORMATS:
        raise FromzeroError(f"unknown export format {fmt!r} (supported: {', '.join(FORMATS)})")
    top = max_opset()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= top:
        raise FromzeroError(f"opset {opset} is not supported: the exporter writes opsets {MIN_OPSET}..{top}")
    if not atol >= 0:
        raise FromzeroError(f"the verification tolerance must be >= 0, got {atol}")
    if not Path(checkpoint).is_dir():
        raise FromzeroError(f"checkpoint directory not found: {checkpoint}")
    if out.is_dir():
        raise FromzeroError(f"--out {out} is a directory; give a file name such as {out / 'model.onnx'}")
    if not force:
        for path in (out, sidecar_path(out)):
            if path.exists():
                raise FromzeroError(f"{path} already exists; pass --force to replace it")


def export_onnx(
    checkpoint: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    opset: int = DEFAULT_OPSET,
    force: bool = False,
    verify: bool = True,
    atol: float = DEFAULT_ATOL,
    fmt: str = "onnx",
) -> ExportResult:
    """Export the model of a checkpoint directory to an ONNX file ``out`` (+ ``out.json``).

    verify: run the file in onnxruntime on a fresh input (other batch size and sequence length
    than traced) and raise FromzeroError, writing nothing, if any output differs from PyTorch
    by more than ``atol``. An existing ``out`` is replaced only with ``force``.
    """
    from fromzero.checkpoint import checkpoint_info
    from fromzero.checkpoint import (CONFIG_FILE, _disk_error, _fsync_dir, _fsync_tree, atomic_write_text,
                                              load_model, read_json)

    checkpoint, out = Path(checkpoint), Path(out)
    _check_request(checkpoint, out, fmt, opset, force, atol)
    info = checkpoint_info(checkpoint)
    raw_config = read_json(checkpoint / CONFIG_FILE, "model config")
    quantization = raw_config.get("quantization") or {}
    if quantization.get("method") == "int8-dynamic":  # PyTorch's quantized kernels cannot be traced
        raise FromzeroError(f"{checkpoint} is int8-dynamic quantized: its CPU kernels cannot be exported to ONNX; "
                            "export the float checkpoint (and quantize with onnxruntime), or an int8-weight one")
    model = load_model(checkpoint, "cpu").float().eval()
    plan = export_plan(model, raw_config, checkpoint, info)
    plan.module.eval()
    program = _trace_to_onnx(plan, opset)

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir_beside(out, f".tmp-{out.name}-")
    except OSError as e:
        raise _disk_error(e, out) from None
    try:
        staged = tmp / out.name  # the final name: external weights (models > 2 GB) are named after it
        program.save(staged)
        _fsync_tree(tmp)
        import onnx

        onnx.checker.check_model(str(staged), full_check=True)
        inputs, outputs, written_opset = _graph_io(staged)
        diff, verified_on = verify_onnx(staged, plan) if verify else (None, None)
        if diff is not None and not diff <= atol:  # NaN fails too
            raise FromzeroError(
                f"the exported graph differs from PyTorch by up to {diff:.2e} (> {atol:g}) in onnxruntime; "
                f"nothing written (--no-verify writes it anyway)"
            )
        result = ExportResult(
            path=out, sidecar=sidecar_path(out), size_bytes=staged.stat().st_size, opset=written_opset,
            model_type=str(raw_config.get("model_type")), task=str(info.get("task")), inputs=inputs,
            outputs=outputs, max_abs_diff=diff, verified_on=verified_on,
            extra_files=[out.parent / p.name for p in tmp.iterdir() if p.name != out.name],
        )
        # External weight files first, the graph that names them last, then its description.
        for extra in sorted(p for p in tmp.iterdir() if p.name != out.name):
            os.replace(extra, out.parent / extra.name)
        os.replace(staged, out)
        _fsync_dir(out.parent)
    except OSError as e:  # a full disk, a read-only folder: one line, nothing replaced
        raise _disk_error(e, out) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_text(result.sidecar, json.dumps(describe(result, plan, raw_config, checkpoint), indent=2) + "\n")
    return result


def describe(result: ExportResult, plan: ExportPlan, raw_config: dict[str, Any], checkpoint: Path) -> dict[str, Any]:
    """The sidecar JSON: everything a program needs to call the file."""
    from fromzero import __version__

    labels = raw_config.get("labels")
    dynamic_axes = {s.name: {str(i): d for i, d in enumerate(s.shape) if isinstance(d, str)}
                    for s in result.inputs + result.outputs}
    return {
        "format": "onnx",
        "file": result.path.name,
        "external_data": [p.name for p in result.extra_files],
        "opset": result.opset,
        "model_type": result.model_type,
        "task": result.task,
        "inputs": [asdict(s) for s in result.inputs],
        "outputs": [asdict(s) for s in result.outputs],
        "dynamic_axes": {k: v for k, v in dynamic_axes.items() if v},
        "labels": list(labels) if labels else None,
        **plan.notes,
        "checkpoint": str(checkpoint.resolve()),
        "verification": ({"max_abs_diff": result.max_abs_diff, "on": result.verified_on, "runtime": "onnxruntime"}
                         if result.max_abs_diff is not None else None),
        "exported_with": {"fromzero": __version__, "torch": torch.__version__.split("+")[0]},
    }
