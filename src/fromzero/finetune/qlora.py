"""QLoRA: LoRA adapters trained on a frozen base whose Linear weights are stored in 4 bits.

``method: qlora`` in an SFT recipe. Every Linear layer of the transformer blocks becomes the
group-wise int4 weight-only layer of ``fromzero quantize --method int4-weight`` (groups of
``qlora_group_size`` input features, each with a scale and minimum), kept in fp16 here (fp32 in
``fromzero quantize``): with group 64 a weight costs 4.5 bits, 28.1 % of its bf16 bytes. Weights
are dequantized on the fly in every forward and again in backward: memory traded for compute, as
in the QLoRA paper (which uses NF4 + double quantization; this is plain uniform int4). The LoRA
layers (:class:`QuantLoraLinear`, through peft's custom-module hook) stay in full precision.

The token embedding, which is also the output head (tied, 21 % of SmolLM2-135M), stays float:
every logit comes out of that table, so 4-bit rows would perturb the whole output distribution;
frozen, it costs no gradient or optimizer state, and a lookup no compute to speak of.

The adapter was trained against the 4-bit base, so loading it (``evaluate``, ``chat``,
``merge-lora``) rebuilds that base: the float base is quantized as in training and dequantized
back (:func:`round_base_to_int4`) before the adapter is merged into it. ``merge-lora`` of a
QLoRA run thus writes the *dequantized* base + the update: the model that was trained.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Optional

import torch
import torch.nn as nn

from fromzero.errors import FromzeroError

SCALE_DTYPE = torch.float16
"""dtype of the int4 groups' scales and minimums during QLoRA training."""
DEFAULT_GROUP_SIZE = 64


def _quantized_types() -> tuple[type, ...]:
    from fromzero.models.quantized import Int4WeightLinear, Int8WeightLinear

    return (Int4WeightLinear, Int8WeightLinear)


def _dequantized(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    from fromzero.models.quantized import Int4WeightLinear

    if isinstance(layer, Int4WeightLinear):
        return layer.dequantized_weight(dtype)
    return layer.dequantized_weight().to(dtype)


class _FrozenQuantMatmul(torch.autograd.Function):
    """``x @ W^T`` for a frozen quantized W that autograd never stores in float.

    ``F.linear(x, dequantized_weight)`` would keep every layer's dequantized float copy alive
    from forward to backward (4 bytes a weight in fp32, more than the int4 base saves). Here
    forward dequantizes, multiplies and drops the copy; backward dequantizes again for the only
    gradient it needs, the one with respect to x (W gets none). Under autocast it computes in the
    autocast dtype, as F.linear would.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:  # type: ignore[override]
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        ctx.layer, ctx.dtype = layer, dtype
        with torch.autocast(x.device.type, enabled=False):
            return x.to(dtype) @ _dequantized(layer, dtype).t()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        with torch.autocast(grad.device.type, enabled=False):
            return grad.to(ctx.dtype) @ _dequantized(ctx.layer, ctx.dtype), None


def _lean_forward(layer: nn.Module, x: torch.Tensor, plain: Any) -> torch.Tensor:
    if not torch.is_grad_enabled() or not x.requires_grad:
        return plain(layer, x)  # nothing to differentiate: the quantized layer's own forward
    y = _FrozenQuantMatmul.apply(x, layer)
    return y + layer.bias.to(y.dtype) if layer.bias is not None else y


@functools.cache
def _lean_classes() -> tuple[type, type]:
    """(QLoRAInt4Linear, QLoRAInt8Linear), defined once on first use."""
    from fromzero.models.quantized import Int4WeightLinear, Int8WeightLinear

    class QLoRAInt4Linear(Int4WeightLinear):
        """Int4WeightLinear whose training forward stores no float weight (see _FrozenQuantMatmul)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return _lean_forward(self, x, Int4WeightLinear.forward)

    class QLoRAInt8Linear(Int8WeightLinear):
        """Int8WeightLinear (the fallback for in_features the group size does not divide), lean."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return _lean_forward(self, x, Int8WeightLinear.forward)

    return QLoRAInt4Linear, QLoRAInt8Linear


def quantize_base(model: nn.Module, group_size: int = DEFAULT_GROUP_SIZE) -> dict[str, dict[str, Any]]:
    """Replace the model's Linear layers (not a head tied to the embedding) by frozen int4 ones
    with fp16 scales/minimums, in place, and freeze every parameter; returns the plan
    (``compression.quantize``'s format).

    A layer whose in_features the group size does not divide falls back to int8 weight-only (per
    output row), as ``fromzero quantize`` does. Layers are converted one at a time, so each float
    weight is freed as soon as its 4-bit copy exists.
    """
    from fromzero.models.quantized import INT4_WEIGHT, QuantizeOptions, plan_quantization

    int4_cls, int8_cls = _lean_classes()
    options = QuantizeOptions(method=INT4_WEIGHT, group_size=group_size, embeddings=False)
    plan = plan_quantization(model, options)
    with torch.no_grad():
        for name, entry in plan.items():
            old = model.get_submodule(name)
            device = old.weight.device
            new = int4_cls.from_linear(old, group_size) if entry["kind"] == INT4_WEIGHT else int8_cls.from_linear(old)
            for attr in ("scale", "offset"):
                if getattr(new, attr, None) is not None:
                    getattr(new, attr).data = getattr(new, attr).data.to(SCALE_DTYPE)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, new.to(device))
    for p in model.parameters():
        p.requires_grad_(False)
    return plan


def round_base_to_int4(model: nn.Module, group_size: int = DEFAULT_GROUP_SIZE) -> None:
    """Round every Linear weight quantize_base would quantize to the value the 4-bit layer
    stands for, keeping plain float Linear layers (the base a QLoRA adapter was trained on,
    dequantized: what adapters are loaded and merged into)."""
    from fromzero.models.quantized import dequantize_int4_groups, dequantize_int8_rows, quantize_int8_rows
    from fromzero.models.quantized import INT4_WEIGHT, QuantizeOptions, plan_quantization, quantize_int4_groups

    plan = plan_quantization(model, QuantizeOptions(method=INT4_WEIGHT, group_size=group_size, embeddings=False))
    with torch.no_grad():
        for name, entry in plan.items():
            layer = model.get_submodule(name)
            w = layer.weight
            if entry["kind"] == INT4_WEIGHT:
                packed, scale, offset = quantize_int4_groups(w, group_size)
                rounded = dequantize_int4_groups(packed, scale.to(SCALE_DTYPE), offset.to(SCALE_DTYPE))
            else:
                q, scale = quantize_int8_rows(w)
                rounded = dequantize_int8_rows(q, scale.to(SCALE_DTYPE))
            w.copy_(rounded.to(w.dtype))


def linear_weight_bytes(model: nn.Module) -> dict[str, int]:
    """Resident bytes of the base's Linear-layer weights (int4 values + scales + minimums for
    quantized layers) next to what the same weights take in bf16; the tied head and LoRA's own
    lora_A / lora_B layers are not counted."""
    quantized = _quantized_types()
    stored = bf16 = 0
    for name, m in model.named_modules():
        if ".lora_" in f".{name}":
            continue
        if isinstance(m, quantized):
            stored += sum(t.numel() * t.element_size() for t in (m.qweight, m.scale, getattr(m, "offset", None))
                          if t is not None)
            bf16 += m.in_features * m.out_features * 2
        elif isinstance(m, nn.Linear) and not _is_tied_head(model, m):
            stored += m.weight.numel() * m.weight.element_size()
            bf16 += m.weight.numel() * 2
    return {"stored_bytes": stored, "bf16_bytes": bf16}


def _is_tied_head(model: nn.Module, linear: nn.Linear) -> bool:
    return any(isinstance(e, nn.Embedding) and e.weight is linear.weight for e in model.modules())


# ---------------------------------------------------------------------------------------------
# The LoRA layer peft puts on a quantized Linear


@functools.cache
def quant_lora_class() -> type:
    """:class:`QuantLoraLinear` (built on first use: peft is imported lazily)."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import check_adapters_to_merge

    class QuantLoraLinear(nn.Module, LoraLayer):
        """LoRA on a frozen weight-only quantized Linear (int4 groups, or int8 rows): peft's
        conventions (lora_A / lora_B / scaling / dropout per adapter), the base's dequantized
        weight only for merging."""

        def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, r: int = 0,
                     lora_alpha: int = 1, **kwargs: Any) -> None:
            if getattr(config, "lora_bias", False) or getattr(config, "use_dora", False):
                raise FromzeroError("qlora supports plain LoRA adapters (no lora_bias, no DoRA)")
            super().__init__()
            with warnings.catch_warnings():  # peft warns about any layer type it does not know
                warnings.simplefilter("ignore", UserWarning)
                LoraLayer.__init__(self, base_layer)
            self.fan_in_fan_out = False
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

        def resolve_lora_variant(self, *, config: Any, **kwargs: Any) -> Optional[Any]:
            return None

        def get_delta_weight(self, adapter: str) -> torch.Tensor:
            return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

        def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
            """Merge into the *dequantized* base: the quantized layer becomes a float Linear."""
            adapter_names = check_adapters_to_merge(self, adapter_names)
            for name in adapter_names:
                if name not in self.lora_A:
                    continue
                base = self.get_base_layer()
                weight = base.dequantized_weight() + self.get_delta_weight(name).to(torch.float32)
                if safe_merge and not torch.isfinite(weight).all():
                    raise FromzeroError(f"merging adapter {name!r} gives non-finite weights")
                merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                                   device=weight.device)
                merged.weight.data = weight
                if base.bias is not None:
                    merged.bias.data = base.bias.detach().float().clone()
                merged.requires_grad_(False)
                self.base_layer = merged
                self.merged_adapters.append(name)

        def unmerge(self) -> None:
            raise FromzeroError("a merged QLoRA layer cannot be unmerged (its base is no longer 4-bit)")

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            self._check_forward_args(x, *args, **kwargs)
            kwargs.pop("adapter_names", None)
            result = self.base_layer(x, *args, **kwargs)
            if self.disable_adapters or self.merged:
                return result
            for name in self.active_adapters:
                if name not in self.lora_A:
                    continue
                lora_A, lora_B = self.lora_A[name], self.lora_B[name]
                cast = not torch.is_autocast_enabled()
                h = x.to(lora_A.weight.dtype) if cast else x
                update = lora_B(lora_A(self.lora_dropout[name](h))) * self.scaling[name]
                result = result + (update.to(result.dtype) if cast else update)
            return result

        def __repr__(self) -> str:
            return "lora." + super().__repr__()

    return QuantLoraLinear


def apply_qlora(model: nn.Module, model_config: dict, method: Any, group_size: int = DEFAULT_GROUP_SIZE) -> nn.Module:
    """Quantize the base to 4 bits and wrap it with peft LoRA adapters on ``method.lora_targets``
    (default: the family's, as for ``method: lora``); returns the peft model."""
    from peft import get_peft_model

    from fromzero.finetune.lora import lora_config

    config = lora_config(model, model_config, method, [])
    quantize_base(model, group_size)
    quantized = _quantized_types()
    targets = sorted(config.target_modules)
    not_quantized = [t for t in targets if not isinstance(model.get_submodule(t), quantized)]
    if not_quantized:  # e.g. the tied head: LoRA on it would train a float layer, not QLoRA
        raise FromzeroError(f"qlora targets must be Linear layers of the transformer blocks; "
                            f"{not_quantized[0]!r} is not quantized")
    config._register_custom_module({cls: quant_lora_class() for cls in quantized})
    return get_peft_model(model, config)
