"""Quantized layers: int8 / int4 weights that replace a model's Linear and Embedding modules.

The building blocks of ``fromzero quantize`` (:mod:`fromzero.compression.quantize`, which
writes and reports quantized checkpoints) and of QLoRA (:mod:`fromzero.finetune.qlora`, which
trains LoRA adapters over an int4 base): per-channel int8 and group-wise int4 quantization of a
weight matrix, the modules that run with those weights (PyTorch's int8 dynamic kernels, or a
dequantize-then-matmul path, with packed CPU kernels for bf16 activations), a *plan* naming
what each module of a model becomes, and :func:`apply_plan` / :func:`load_quantized` to build a
quantized model from a plan. See :mod:`fromzero.compression.quantize` for the formats.
"""

from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from fromzero.errors import FromzeroError, first_line

METHODS = ("int8-dynamic", "int8-weight", "int4-weight")
FORMAT_VERSION = 1

# Plan entries: what a module becomes.
INT8_DYNAMIC, INT8_WEIGHT, INT4_WEIGHT, INT8_EMBEDDING = "int8-dynamic", "int8-weight", "int4-weight", "int8-embedding"
KINDS = (INT8_DYNAMIC, INT8_WEIGHT, INT4_WEIGHT, INT8_EMBEDDING)

# Quantized engines of PyTorch that have int8 dynamic Linear kernels, best first.
_ENGINES = ("x86", "fbgemm", "onednn", "qnnpack")
@dataclass
class QuantizeOptions:
    """What ``fromzero quantize`` does to a model."""

    method: str = INT8_DYNAMIC
    """int8-dynamic | int8-weight | int4-weight (see the module docstring)."""
    group_size: int = 128
    """int4-weight: input features per scale/offset group (a positive even number)."""
    embeddings: bool = True
    """Quantize embedding tables too (int8 per row); False keeps them (and a tied head) float."""

    def validate(self) -> None:
        check_method(self.method)
        g = self.group_size
        if isinstance(g, bool) or not isinstance(g, int) or g < 2 or g % 2:
            raise FromzeroError(f"--group-size must be a positive even number (e.g. 32, 64, 128), got {g!r}")


def check_method(method: str) -> None:
    """One-line error for an unknown method, naming the closest known one."""
    if method in METHODS:
        return
    close = difflib.get_close_matches(str(method), METHODS, n=1, cutoff=0.4)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise FromzeroError(f"unknown quantization method {method!r} (choose from {', '.join(METHODS)}){hint}")


# ---------------------------------------------------------------------------------------------
# The arithmetic: float <-> int8 rows, float <-> int4 groups


def quantize_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: (R, C) float -> q (R, C) int8 in -127..127, scale (R,) fp32.

    ``w ~= q * scale[:, None]``; scale = max |w| of the row / 127, so the largest weight of each
    row is exact and the error of any weight is at most scale / 2. An all-zero row (a padding
    embedding, a dead unit) gets a tiny positive scale instead of 0.
    """
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # (R,)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def dequantize_int8_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q (R, C) int8, scale (R,) -> (R, C) fp32."""
    return q.float() * scale.float()[:, None]


def quantize_int4_groups(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 in groups along the input dimension.

    w (N, K) float, K a multiple of group_size -> packed (N, K / 2) uint8 (column 2j in the low
    nibble, 2j + 1 in the high one), scale and offset (N, K / group_size) fp32, with
    ``w ~= q * scale + offset`` for q in 0..15: offset is the group's minimum and scale its range
    / 15, so the error of any weight is at most scale / 2.
    """
    N, K = w.shape
    if K % group_size or group_size % 2:
        raise ValueError(f"in_features {K} is not a multiple of the (even) group size {group_size}")
    groups = w.detach().float().reshape(N, K // group_size, group_size)
    offset = groups.amin(dim=-1)  # (N, K/G)
    scale = ((groups.amax(dim=-1) - offset) / 15.0).clamp(min=1e-8)
    q = torch.round((groups - offset[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.uint8)
    q = q.reshape(N, K // 2, 2)
    packed = q[..., 0] | (q[..., 1] << 4)
    return packed.contiguous(), scale.contiguous(), offset.contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K / 2) uint8 -> (N, K) uint8 values 0..15 (inverse of the packing above)."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).reshape(packed.size(0), -1)


def dequantize_int4_groups(packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """packed (N, K / 2), scale / offset (N, K / G) -> (N, K) weights in ``dtype``."""
    q = unpack_int4(packed)  # (N, K)
    N, K = q.shape
    G = K // scale.size(1)
    w = q.reshape(N, K // G, G).to(dtype) * scale.to(dtype)[..., None] + offset.to(dtype)[..., None]
    return w.reshape(N, K)


# ---------------------------------------------------------------------------------------------
# Quantized modules


def _frozen(t: torch.Tensor) -> nn.Parameter:
    # Parameters (not buffers) so that tying works as for float models: a tied head's qweight is
    # the embedding's Parameter object, .to() keeps them shared, the checkpoint stores them once.
    return nn.Parameter(t, requires_grad=False)


class _QuantizedLinear(nn.Module):
    """What the int8 and int4 Linear layers share: sizes, a float bias, and ``_kernel``: the
    weights in a kernel's own layout, built on first use and never saved (dropped by ``.to()``
    and copies, then rebuilt)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._kernel: Any = None

    def _set_bias(self, bias: bool) -> None:  # registered after the weights: the state dict keeps its order
        self.bias = _frozen(torch.zeros(self.out_features)) if bias else None

    def _copy_bias(self, linear: nn.Linear) -> None:
        if linear.bias is not None:
            self.bias.data = linear.bias.detach().float().clone()

    def _apply(self, fn, recurse=True):  # .to() / .cuda(): the kernel copy is rebuilt from the weights
        self._kernel = None
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:  # copy.deepcopy / pickle: rebuilt lazily
        state = self.__dict__.copy()
        state["_kernel"] = None
        return state

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


class _Int8RowsLinear(_QuantizedLinear):
    """A Linear layer holding int8 weights (out, in) with one fp32 scale per output channel."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features)
        self.qweight = _frozen(torch.zeros(out_features, in_features, dtype=torch.int8))
        self.scale = _frozen(torch.ones(out_features))
        self._set_bias(bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "_Int8RowsLinear":
        module = cls(linear.in_features, linear.out_features, linear.bias is not None)
        module.qweight.data, module.scale.data = quantize_int8_rows(linear.weight)
        module._copy_bias(linear)
        return module

    def share_table(self, embedding: "Int8Embedding") -> None:
        """Read the weights of a tied embedding table (its rows are this layer's output channels)."""
        if embedding.qweight.shape != self.qweight.shape:
            raise ValueError(f"tied table {tuple(embedding.qweight.shape)} does not fit a Linear {tuple(self.qweight.shape)}")
        self.qweight, self.scale = embedding.qweight, embedding.scale

    def dequantized_weight(self) -> torch.Tensor:
        """The (out, in) fp32 weight these int8 values stand for."""
        return dequantize_int8_rows(self.qweight, self.scale)


class Int8WeightLinear(_Int8RowsLinear):
    """Weight-only int8: ``y = (x @ q^T) * scale + bias``, the matmul in x's float dtype.

    Scaling the output instead of the weight is the same product (the scale is per output
    column of y) and skips writing a scaled copy of the weight; int8 values are exact in fp16 /
    bf16 / fp32, so no precision is lost before the matmul. Runs on any device.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _packed_kernel_fits(x, INT8_KERNEL_MAX_ROWS):
            # PyTorch's CPU kernel for bf16 x int8 (per-channel scales): it reads the int8 weight
            # as it is, 2.7x faster than a bf16 matmul for one decoding row (1 thread).
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features), self.qweight,
                                                   self.scale.to(x.dtype)).view(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.qweight.to(x.dtype))
            y = y * self.scale.to(y.dtype)
        return y + self.bias.to(y.dtype) if self.bias is not None else y


class Int8DynamicLinear(_Int8RowsLinear):
    """int8 weights and dynamically quantized int8 activations: PyTorch's quantized CPU kernels.

    The weight is packed once into the engine's layout (fbgemm / x86: blocked for its int8 GEMM;
    a copy of the int8 weights, rebuilt by :meth:`prepare` and never saved); each call quantizes
    x per tensor (uint8, scale and zero point from its min and max), multiplies in int8 with
    int32 accumulation and returns float. x of another dtype (bf16 under autocast) is computed
    in fp32 and cast back.

    One scale for the whole activation tensor is where the error comes from: a few outlier
    features of transformers stretch the range, so ordinary values get few int8 levels.

    ``reduce_range``: activations in 7 bits, as torch.ao's dynamic Linear does on x86 for CPUs
    without AVX-512 VNNI, whose int16 pair sums could saturate; with VNNI, the full 8 bits.
    """

    def prepare(self) -> None:
        """(Re)pack the int8 weight for the CPU kernel; call after changing qweight/scale/bias."""
        if self.qweight.device.type != "cpu":
            raise FromzeroError(_CPU_ONLY)
        with warnings.catch_warnings():
            # torch.ao's quantized tensor types are deprecated in favour of torchao, whose int8
            # dynamic CPU path is much slower here (measured ~10x on MiniLM shapes, torchao 0.18).
            warnings.simplefilter("ignore")
            zero_points = torch.zeros(self.out_features, dtype=torch.long)
            qw = torch._make_per_channel_quantized_tensor(self.qweight.detach(), self.scale.detach().double(),
                                                          zero_points, 0)
            bias = self.bias.detach().float() if self.bias is not None else None
            self._kernel = torch.ops.quantized.linear_prepack(qw, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise FromzeroError(_CPU_ONLY)
        if self._kernel is None:
            self.prepare()
        y = torch.ops.quantized.linear_dynamic(x.float(), self._kernel, _reduce_range())
        return y.to(x.dtype)


_VNNI: bool | None = None


def _reduce_range() -> bool:
    """7-bit activations unless the CPU has VNNI int8 dot products (no int16 saturation)."""
    global _VNNI
    if _VNNI is None:
        try:
            flags = Path("/proc/cpuinfo").read_text(errors="replace")
            _VNNI = "avx512_vnni" in flags or "avx_vnni" in flags
        except OSError:
            _VNNI = False
    return not _VNNI


_CPU_ONLY = ("int8-dynamic runs on CPU only (PyTorch's quantized int8 kernels have no GPU version): "
             "use --device cpu, or quantize with --method int8-weight for a GPU")


# Measured (bf16 activations, 1 thread): the packed CPU kernels below beat "dequantize, then
# matmul" up to about these many rows of x. Decoding (1 row, or a few drafts) is where they matter.
INT8_KERNEL_MAX_ROWS = 12
INT4_KERNEL_MAX_ROWS = 64


def _packed_kernel_fits(x: torch.Tensor, max_rows: int) -> bool:
    """Whether a packed weight-only CPU kernel serves ``x``: bf16 on CPU, few rows, no autograd
    (the kernels have no backward; fp32 x takes the generic path, which keeps fp32 products)."""
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.numel() // x.size(-1) <= max_rows
            and not (torch.is_grad_enabled() and x.requires_grad))


class Int4WeightLinear(_QuantizedLinear):
    """Group-wise int4 weights (see :func:`quantize_int4_groups`), dequantised on every call.

    On CPU with bf16 activations and few rows (decoding) the product runs in PyTorch's int4
    kernel instead (``_weight_int4pack_mm_for_cpu``, ~30x faster for one row): it wants the
    weight in its own tile layout, built once on first use and kept beside ``qweight`` (never
    saved; rebuilt after ``.to()`` or a copy), and (scale, zero) pairs for ``(q - 8) * scale +
    zero``, i.e. zero = offset + 8 * scale in this module's ``q * scale + offset``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 128) -> None:
        super().__init__(in_features, out_features)
        if in_features % group_size or group_size % 2:
            raise ValueError(f"in_features {in_features} is not a multiple of the (even) group size {group_size}")
        self.group_size = group_size
        groups = in_features // group_size
        self.qweight = _frozen(torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.scale = _frozen(torch.ones(out_features, groups))
        self.offset = _frozen(torch.zeros(out_features, groups))
        self._set_bias(bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> "Int4WeightLinear":
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size)
        packed, scale, offset = quantize_int4_groups(linear.weight, group_size)
        module.qweight.data, module.scale.data, module.offset.data = packed, scale, offset
        module._copy_bias(linear)
        return module

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int4_groups(self.qweight, self.scale, self.offset, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        if (_packed_kernel_fits(x, INT4_KERNEL_MAX_ROWS) and self.group_size in (32, 64, 128, 256)
                and self.out_features % 16 == 0):  # the kernel packs output channels in 16s
            packed = self._kernel
            if packed is None or packed[1].dtype != x.dtype:
                packed = self._kernel = self._pack_for_kernel(x.dtype)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features), packed[0],
                                                           self.group_size, packed[1])
            y = y.view(*x.shape[:-1], self.out_features)
            return y + bias if bias is not None else y
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def _pack_for_kernel(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        q = unpack_int4(self.qweight.detach()).to(torch.int32)  # (out, in) values 0..15
        weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        scale, offset = self.scale.detach(), self.offset.detach()
        scale_zero = torch.stack([scale.t(), (offset + 8 * scale).t()], dim=-1).to(dtype).contiguous()  # (in/G, out, 2)
        return weight, scale_zero

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


class Int8Embedding(nn.Module):
    """An embedding table stored int8 per row (one fp32 scale per token), dequantised on lookup."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.qweight = _frozen(torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.scale = _frozen(torch.ones(num_embeddings))

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> "Int8Embedding":
        module = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx)
        module.qweight.data, module.scale.data = quantize_int8_rows(embedding.weight)
        return module

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_int8_rows(self.qweight, self.scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.qweight).to(self.scale.dtype)  # (..., C)
        return rows * self.scale[ids].unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}"


# ---------------------------------------------------------------------------------------------
# Planning and applying: which module becomes what


def _quantizable_linear(module: nn.Module) -> bool:
    # nn.MultiheadAttention reads its out_proj.weight itself: that Linear must stay float.
    return isinstance(module, nn.Linear) and not isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear)


def plan_quantization(model: nn.Module, options: QuantizeOptions) -> dict[str, dict[str, Any]]:
    """{module name: {"kind": ..., ...}} for every module that ``options`` quantizes.

    Entries: ``{"kind": "int8-embedding"}``; ``{"kind": "int8-dynamic" | "int8-weight"}``;
    ``{"kind": "int4-weight", "group_size": G}``; a head tied to an embedding table gets
    ``"tied_to": <embedding name>`` (int8, reading that table); an int4 layer whose in_features
    G does not divide falls back to ``{"kind": "int8-weight", "fallback": why}``.
    """
    options.validate()
    tables = {id(m.weight): name for name, m in model.named_modules() if isinstance(m, nn.Embedding)}
    plan: dict[str, dict[str, Any]] = {}
    if options.embeddings:
        plan.update({name: {"kind": INT8_EMBEDDING} for name in tables.values()})
    seen: set[int] = set()
    G = options.group_size
    for name, m in model.named_modules():
        if not _quantizable_linear(m):
            continue
        if id(m.weight) in tables:  # a head tied to an embedding table
            if options.embeddings:
                kind = INT8_DYNAMIC if options.method == INT8_DYNAMIC else INT8_WEIGHT
                plan[name] = {"kind": kind, "tied_to": tables[id(m.weight)]}
            continue  # else it stays float, sharing the float table
        if id(m.weight) in seen:  # shared between two Linear layers: keep both float
            continue
        seen.add(id(m.weight))
        if options.method != INT4_WEIGHT:
            plan[name] = {"kind": options.method}
        elif m.in_features % G == 0:
            plan[name] = {"kind": INT4_WEIGHT, "group_size": G}
        else:
            plan[name] = {"kind": INT8_WEIGHT,
                          "fallback": f"in_features {m.in_features} is not a multiple of group size {G}"}
    if options.method == INT4_WEIGHT:
        sizes = sorted({m.in_features for _, m in model.named_modules() if _quantizable_linear(m)})
        if sizes and not any(e["kind"] == INT4_WEIGHT for e in plan.values()):
            raise FromzeroError(
                f"--group-size {G} divides the in_features of no Linear layer ({', '.join(map(str, sizes))}): "
                f"choose an even divisor of one of them"
            )
    if not plan:
        raise FromzeroError("this model has no Linear or Embedding layers to quantize")
    return plan


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_plan(model: nn.Module, plan: dict[str, dict[str, Any]], from_weights: bool = True) -> nn.Module:
    """Replace the planned modules of ``model`` with quantized ones, in place.

    from_weights: quantize the model's float weights (``fromzero quantize``); False builds
    empty quantized modules of the right shapes, for a checkpoint's weights to be loaded into
    (:func:`load_quantized`).
    """
    # Embedding tables first: tied heads read them.
    ordered = sorted(plan.items(), key=lambda item: item[1].get("kind") != INT8_EMBEDDING)
    for name, entry in ordered:
        kind = entry.get("kind")
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise FromzeroError(f"quantization plan names a module {name!r} this model does not have") from None
        if kind == INT8_EMBEDDING:
            if not isinstance(old, nn.Embedding):
                raise FromzeroError(f"quantization plan: {name!r} is a {type(old).__name__}, not an Embedding")
            new: nn.Module = (Int8Embedding.from_embedding(old) if from_weights else
                              Int8Embedding(old.num_embeddings, old.embedding_dim, old.padding_idx))
        elif kind in (INT8_DYNAMIC, INT8_WEIGHT, INT4_WEIGHT):
            if not isinstance(old, nn.Linear):
                raise FromzeroError(f"quantization plan: {name!r} is a {type(old).__name__}, not a Linear layer")
            tied_to = entry.get("tied_to")
            if kind == INT4_WEIGHT:
                if tied_to:
                    raise FromzeroError(f"quantization plan: tied head {name!r} cannot be int4")
                G = entry.get("group_size")
                if isinstance(G, bool) or not isinstance(G, int) or G < 2 or G % 2 or old.in_features % G:
                    raise FromzeroError(f"quantization plan: bad group_size {G!r} for {name!r} (in_features {old.in_features})")
                new = (Int4WeightLinear.from_linear(old, G) if from_weights else
                       Int4WeightLinear(old.in_features, old.out_features, old.bias is not None, G))
            else:
                cls = Int8DynamicLinear if kind == INT8_DYNAMIC else Int8WeightLinear
                if tied_to:
                    table = model.get_submodule(tied_to) if tied_to in plan else None
                    if not isinstance(table, Int8Embedding):
                        raise FromzeroError(f"quantization plan: {name!r} is tied to {tied_to!r}, which is not an int8 table")
                    new = cls(old.in_features, old.out_features, old.bias is not None)
                    new._copy_bias(old)
                    new.share_table(table)
                elif from_weights:
                    new = cls.from_linear(old)
                else:
                    new = cls(old.in_features, old.out_features, old.bias is not None)
        else:
            raise FromzeroError(f"quantization plan: unknown kind {kind!r} for {name!r} (known: {', '.join(KINDS)})")
        _set_module(model, name, new)
    return model


def prepare(model: nn.Module) -> nn.Module:
    """Pack the int8-dynamic layers' weights for the CPU kernel (after loading or editing them)."""
    for m in model.modules():
        if isinstance(m, Int8DynamicLinear):
            m.prepare()
    return model


def quantize_model(model: nn.Module, options: QuantizeOptions) -> dict[str, dict[str, Any]]:
    """Quantize a float model in place; returns the plan (stored in config.json)."""
    options.validate()
    if options.method == INT8_DYNAMIC:
        require_int8_dynamic("cpu")
    model.to("cpu").eval()
    plan = plan_quantization(model, options)
    with torch.no_grad():
        apply_plan(model, plan, from_weights=True)
    prepare(model)
    return plan


# ---------------------------------------------------------------------------------------------
# Can this machine run it?


def int8_dynamic_problem(device: str | torch.device = "cpu") -> str | None:
    """Why int8-dynamic cannot run here (None when it can): GPU device, or no quantized engine."""
    device = torch.device(device)
    if device.type != "cpu":
        return _CPU_ONLY
    engines = [e for e in torch.backends.quantized.supported_engines if e != "none"]
    if not engines:
        return ("this PyTorch build has no quantized CPU engine (torch.backends.quantized.supported_engines "
                f"= {torch.backends.quantized.supported_engines}): use --method int8-weight")
    if torch.backends.quantized.engine not in _ENGINES:
        best = next((e for e in _ENGINES if e in engines), None)
        if best is None:
            return f"no supported quantized engine among {engines}: use --method int8-weight"
        torch.backends.quantized.engine = best
    try:  # a 2x2 layer through the real kernel: some builds list an engine they cannot run
        probe = Int8DynamicLinear(2, 2)
        probe.prepare()
        probe(torch.ones(1, 2))
    except (RuntimeError, NotImplementedError) as e:
        return (f"PyTorch's int8 dynamic kernels fail on this machine (engine "
                f"{torch.backends.quantized.engine}: {first_line(e)}): use --method int8-weight")
    return None


def require_int8_dynamic(device: str | torch.device = "cpu") -> None:
    problem = int8_dynamic_problem(device)
    if problem:
        raise FromzeroError(problem)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def quantization_block(config: dict, where: Path) -> dict[str, Any]:
    """The validated ``quantization`` block of a checkpoint's config.json."""
    block = config.get("quantization")
    if not isinstance(block, dict):
        raise FromzeroError(f"{where}: 'quantization' must be an object")
    version = block.get("format", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise FromzeroError(f"{where}: quantization format {version!r} is not supported (this fromzero reads {FORMAT_VERSION})")
    method = block.get("method")
    if method not in METHODS:
        raise FromzeroError(f"{where}: unknown quantization method {method!r} (known: {', '.join(METHODS)})")
    plan = block.get("layers")
    if not isinstance(plan, dict) or not all(isinstance(v, dict) for v in plan.values()):
        raise FromzeroError(f"{where}: quantization.layers must map module names to objects")
    return block


def load_quantized(directory: str | Path, config: dict, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a quantized checkpoint (the hook ``load_model`` calls when config.json has a
    ``quantization`` block): the float architecture from the config, the planned modules
    swapped for quantized ones, then the int8/int4 weights loaded into them."""
    from fromzero.models import build_model
    from fromzero.checkpoint import CONFIG_FILE, MODEL_FILE, load_weights

    directory = Path(directory)
    block = quantization_block(config, directory / CONFIG_FILE)
    if block["method"] == INT8_DYNAMIC or any(e.get("kind") == INT8_DYNAMIC for e in block["layers"].values()):
        problem = int8_dynamic_problem(device)
        if problem:
            raise FromzeroError(f"{directory} is quantized int8-dynamic: {problem}")
    try:
        model = build_model({k: v for k, v in config.items() if k != "quantization"})
    except FromzeroError as e:
        raise FromzeroError(f"{directory / CONFIG_FILE}: {e}") from None
    apply_plan(model, block["layers"], from_weights=False)
    load_weights(model, directory / MODEL_FILE)
    model = model.to(device).eval()
    return prepare(model) if torch.device(device).type == "cpu" else model


