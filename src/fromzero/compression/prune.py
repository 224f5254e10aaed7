"""Pruning: make a trained model sparse (``magnitude``) or really smaller (``structured``).

Both end in a normal checkpoint directory that ``load_model`` reads unchanged, plus ``pruning.json``
(method, sparsity, parameters and file size before/after; with ``evaluate`` the quality and the
CPU latency of one forward pass before/after).

* ``magnitude`` (unstructured): the fraction ``sparsity`` of the smallest-magnitude weights of
  every Linear / Conv layer is zeroed (``torch.nn.utils.prune``) and made permanent. Dense kernels
  multiply zeros as fast as any number and the file stores them densely, so the model is neither
  faster nor smaller; ``pruning.json`` reports what a sparse format would take. Per layer by
  default (``scope="global"``: one threshold) because fromzero's models keep weights at different
  scales in different layers (GPT-2's residual projections start 1/sqrt(2 n_layer) smaller): one
  threshold would empty some matrices and barely touch others. Weights shared by two modules (a
  GPT's ``lm_head`` tied to the token embedding) are skipped: masking one user would untie them.

* ``structured``: whole attention heads and MLP hidden channels are cut out of the matrices, the
  same number in every layer so the config stays uniform (``head_dim`` keeps each head's width).
  Units are ranked per layer by ``taylor`` importance (|sum of w * dL/dw| over a unit's weights,
  summed over a few batches; Molchanov et al. 2019) when training data is at hand, else ``weight``
  (L2 norm). Fused projections are cut consistently (a GPT's q | k | v ``c_attn``, SwiGLU's
  gate | up ``c_fc``). Grouped-query attention: ``gqa="queries"`` removes the same number of query
  heads from every key/value group, ``gqa="groups"`` whole groups.

* ``recover_steps`` > 0: a short fine-tune with the shared Trainer (``magnitude``: the gradients of
  pruned weights are masked, :func:`keep_zeros`). Text classifiers use the data of the run that
  made them (its config.yaml) or ``data``; GPTs a prepared data directory (``data`` or the
  pretraining run's ``data.dir``).
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import prune as torch_prune

from fromzero.errors import FromzeroError
from fromzero.finetune.distill import count_params
from fromzero.tasks import get_task

METHODS = ("magnitude", "structured")
SCOPES = ("layer", "global")
IMPORTANCES = ("auto", "taylor", "weight")
GQA_MODES = ("queries", "groups")
STRUCTURED_MODEL_TYPES = ("fromzero-bert", "fromzero-gpt")
PRUNING_FILE = "pruning.json"
# Files of the source checkpoint that the pruned one must not inherit: the weights and config
# are rewritten, an adapter is merged into the weights, trainer state belongs to another model.
_NOT_COPIED = ("model.safetensors", "config.json", "info.json", "trainer_state.pt", "adapter_config.json",
               "adapter_model.safetensors", PRUNING_FILE)


@dataclass
class PruneConfig:
    """What ``fromzero prune`` does (the CLI options, one to one)."""

    checkpoint: str
    """Checkpoint directory to prune (left unchanged)."""
    out: str
    """Output checkpoint directory."""
    sparsity: float
    """Fraction to remove, in [0, 1): of each layer's weights (magnitude), or of each layer's
    attention heads and MLP channels (structured)."""
    method: str = "magnitude"
    """magnitude (unstructured zeros) | structured (remove heads and MLP channels)."""
    scope: str = "layer"
    """magnitude: layer (every matrix gets the sparsity) | global (one threshold for all)."""
    importance: str = "auto"
    """structured: taylor (|w * grad| on a few training batches) | weight (L2 norm) | auto (taylor if data)."""
    gqa: str = "queries"
    """structured, grouped-query GPTs: queries (same number of query heads per kv group) | groups (whole kv groups)."""
    importance_batches: int = 8
    """structured, taylor: training batches the gradients are summed over."""
    recover_steps: int = 0
    """Optimizer steps of a fine-tune after pruning (0 = none)."""
    lr: float | None = None
    """Recovery learning rate (None: the peak lr of the run that made the checkpoint)."""
    batch_size: int | None = None
    """Recovery / importance batch size (None: the run's batch size)."""
    data: str | None = None
    """Training data for importance, recovery and --eval (None: the data of the run that made the checkpoint)."""
    evaluate: bool = False
    """Score the model before and after pruning (and time a forward pass of each)."""
    force: bool = False
    """Replace an existing output directory."""
    device: str = "auto"
    """auto | cpu | cuda | mps: where importance, recovery and evaluation run."""
    seed: int = 0
    """Seed of the batches drawn for importance and recovery."""
    progress: bool = True
    """Show a progress bar during recovery."""

    def validate(self) -> None:
        """Raise FromzeroError for options that cannot work (before any model is loaded)."""
        s = self.sparsity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or not 0 <= s < 1:
            raise FromzeroError(f"sparsity must be in [0, 1), got {s}")
        for name, allowed in (("method", METHODS), ("scope", SCOPES), ("importance", IMPORTANCES),
                              ("gqa", GQA_MODES)):
            if getattr(self, name) not in allowed:
                raise FromzeroError(f"unknown {name} {getattr(self, name)!r} (supported: {', '.join(allowed)})")
        if self.recover_steps < 0:
            raise FromzeroError(f"recover steps must be >= 0, got {self.recover_steps}")
        if self.importance_batches <= 0:
            raise FromzeroError(f"importance batches must be positive, got {self.importance_batches}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise FromzeroError(f"lr must be positive, got {self.lr}")
        if self.batch_size is not None and self.batch_size <= 0:
            raise FromzeroError(f"batch size must be positive, got {self.batch_size}")


def _half_up(x: float) -> int:
    """round() that takes .5 up (Python's round() goes to the even neighbour)."""
    return int(math.floor(x + 0.5))


# ---------------------------------------------------------------------------------------------
# Magnitude (unstructured) pruning


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the Linear / Conv layers whose weight no other module shares."""
    users = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, kinds) and isinstance(getattr(m, "weight", None), nn.Parameter)
            and users[id(m.weight)] == 1]


def mask_by_magnitude(model: nn.Module, sparsity: float, scope: str = "layer") -> dict[str, torch.Tensor]:
    """Zero the smallest-|w| fraction ``sparsity`` of the prunable weights, in place.

    torch.nn.utils.prune computes the masks (scope ``layer``: each matrix loses
    round(sparsity * its size) weights; ``global``: one threshold over all of them), then
    ``prune.remove`` makes them permanent at once: the weights are plain parameters holding
    zeros. Returns ``{layer name: mask}`` (1 = kept, 0 = pruned) for :func:`keep_zeros`.
    """
    layers = prunable_layers(model)
    if not layers:
        raise FromzeroError("this model has no Linear or Conv layers to prune")
    if scope == "layer":
        for _, module in layers:
            torch_prune.l1_unstructured(module, "weight", amount=float(sparsity))
    elif scope == "global":
        torch_prune.global_unstructured([(m, "weight") for _, m in layers], torch_prune.L1Unstructured,
                                        amount=float(sparsity))
    else:
        raise FromzeroError(f"unknown scope {scope!r} (supported: {', '.join(SCOPES)})")
    masks = {}
    for name, module in layers:
        masks[name] = module.weight_mask.detach().clone()
        torch_prune.remove(module, "weight")
    return masks


def keep_zeros(model: nn.Module, masks: dict[str, torch.Tensor]) -> list[Any]:
    """Make a fine-tune leave pruned weights at zero: each pruned weight's gradient is multiplied
    by its mask as it is computed, so (with gradient clipping, AdamW moments and decoupled weight
    decay all seeing zeros there) the zeros never move. A gradient hook rather than torch.prune's
    forward hooks, because those only act when the layer's own forward runs, and BERT's attention
    reads ``query/key/value.weight`` directly to fuse them into one matmul.
    Returns the hook handles (``.remove()`` them when done)."""
    modules = dict(model.named_modules())
    return [modules[name].weight.register_hook(lambda grad, m=mask: grad * m.to(grad.device, grad.dtype))
            for name, mask in masks.items()]


def weight_sparsity(model: nn.Module, names: Iterable[str]) -> dict[str, Any]:
    """Share of exact zeros in the weights of the named layers: overall and per layer."""
    modules = dict(model.named_modules())
    zeros = total = 0
    per_layer = {}
    for name in names:
        w = modules[name].weight.detach()
        z = int((w == 0).sum())
        zeros, total = zeros + z, total + w.numel()
        per_layer[name] = z / w.numel()
    return {"sparsity": zeros / max(total, 1), "zeros": zeros, "weights": total, "per_layer": per_layer}


def magnitude_prune(model: nn.Module, sparsity: float, scope: str = "layer") -> dict[str, Any]:
    """:func:`mask_by_magnitude` in place; returns :func:`weight_sparsity` of the pruned layers."""
    return weight_sparsity(model, mask_by_magnitude(model, sparsity, scope))


def sparse_storage_bytes(state: dict[str, torch.Tensor], sparse_names: set[str]) -> int:
    """Bytes of ``state`` if the named tensors were stored as a bitmask + their non-zero values
    (the rest dense): what a sparse format could save, for comparison with the dense file."""
    total = 0
    for name, t in state.items():
        if name in sparse_names:
            total += int((t != 0).sum()) * t.element_size() + (t.numel() + 7) // 8
        else:
            total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------------------------------------
# Structured pruning: units (heads, kv groups, MLP channels) and where their weights sit


@dataclass
class Slot:
    """Where one parameter holds the weights of a layer's units: ``rows[u]`` are the indices
    along ``axis`` of ``name`` that belong to unit u (rows of a projection that produces the
    unit, or columns of one that reads it)."""

    name: str
    axis: int
    rows: torch.Tensor  # (units, k) int64


@dataclass
class UnitGroup:
    """The units of one kind in one layer, ranked and removed together.

    ``buckets[u]``: units compete within their bucket and every bucket loses the same number
    (one bucket per layer, except query heads of a grouped-query layer: one per kv group).
    """

    kind: str  # "heads" (query heads or kv groups) | "channels" (MLP hidden units)
    layer: int
    slots: list[Slot]
    buckets: torch.Tensor  # (units,) int64

    @property
    def units(self) -> int:
        return int(self.buckets.numel())


def _unit_rows(units: int, width: int, offset: int = 0) -> torch.Tensor:
    """(units, width) indices: unit u owns offset + u * width ... offset + (u + 1) * width - 1."""
    return offset + torch.arange(units * width).view(units, width)


def _bert_groups(config: dict, names: set[str]) -> list[UnitGroup]:
    from fromzero.models.bert import BertConfig

    cfg = BertConfig.from_dict(config)
    H, D, I = cfg.num_attention_heads, cfg.head_size, cfg.intermediate_size
    groups = []
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}"
        heads = _unit_rows(H, D)
        slots = [Slot(f"{p}.attn.{m}.{t}", 0, heads) for m in ("query", "key", "value") for t in ("weight", "bias")]
        slots.append(Slot(f"{p}.attn.out.weight", 1, heads))
        groups.append(UnitGroup("heads", i, slots, torch.zeros(H, dtype=torch.long)))
        ch = _unit_rows(I, 1)
        slots = [Slot(f"{p}.mlp.fc.weight", 0, ch), Slot(f"{p}.mlp.fc.bias", 0, ch),
                 Slot(f"{p}.mlp.proj.weight", 1, ch)]
        groups.append(UnitGroup("channels", i, slots, torch.zeros(I, dtype=torch.long)))
    return [_present(g, names) for g in groups]


def _gpt_groups(config: dict, names: set[str], gqa: str) -> list[UnitGroup]:
    from fromzero.models.gpt import GPTConfig

    cfg = GPTConfig.from_dict(config)
    H, G, D = cfg.n_head, cfg.kv_heads, cfg.head_size
    r = H // G  # query heads per key/value head
    I = cfg.intermediate_size or 4 * cfg.n_embd
    groups = []
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}"
        if gqa == "groups" or r == 1:
            # A unit is kv group g: its r query heads (q rows, c_proj columns), its k and v rows.
            q = _unit_rows(G, r * D)
            qkv = torch.cat([q, _unit_rows(G, D, H * D), _unit_rows(G, D, (H + G) * D)], dim=1)
            slots = [Slot(f"{p}.attn.c_attn.weight", 0, qkv), Slot(f"{p}.attn.c_attn.bias", 0, qkv),
                     Slot(f"{p}.attn.c_proj.weight", 1, q)]
            buckets = torch.zeros(G, dtype=torch.long)
        else:
            # A unit is one query head; k / v stay. Head h belongs to kv group h // r.
            q = _unit_rows(H, D)
            slots = [Slot(f"{p}.attn.c_attn.weight", 0, q), Slot(f"{p}.attn.c_attn.bias", 0, q),
                     Slot(f"{p}.attn.c_proj.weight", 1, q)]
            buckets = torch.arange(H) // r
        groups.append(UnitGroup("heads", i, slots, buckets))
        ch = _unit_rows(I, 1)
        fc = torch.cat([ch, ch + I], dim=1) if cfg.mlp == "swiglu" else ch  # gate | up rows of c_fc
        slots = [Slot(f"{p}.mlp.c_fc.weight", 0, fc), Slot(f"{p}.mlp.c_fc.bias", 0, fc),
                 Slot(f"{p}.mlp.c_proj.weight", 1, ch)]
        groups.append(UnitGroup("channels", i, slots, torch.zeros(I, dtype=torch.long)))
    return [_present(g, names) for g in groups]


def _present(group: UnitGroup, names: set[str]) -> UnitGroup:
    """Drop slots of parameters the model does not have (biases of bias-free models)."""
    group.slots = [s for s in group.slots if s.name in names]
    return group


def _require_structured(model_type: Any) -> None:
    if model_type not in STRUCTURED_MODEL_TYPES:
        supported = " and ".join(STRUCTURED_MODEL_TYPES)
        raise FromzeroError(f"structured pruning supports {supported} checkpoints, not {model_type!r} "
                            "(use --method magnitude)")


def structured_groups(model: nn.Module, config: dict, gqa: str = "queries") -> list[UnitGroup]:
    """The prunable unit groups (per layer: heads, then MLP channels) of a BERT or GPT."""
    _require_structured(config.get("model_type"))
    names = set(model.state_dict())
    if config["model_type"] == "fromzero-bert":
        return _bert_groups(config, names)
    return _gpt_groups(config, names, gqa)


def _per_unit(t: torch.Tensor, slot: Slot, reduce: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """reduce() over each unit's entries of ``t`` (a parameter or its gradient): (units,)."""
    units, k = slot.rows.shape
    picked = t.index_select(slot.axis, slot.rows.reshape(-1).to(t.device)).movedim(slot.axis, 0)
    return reduce(picked.reshape(units, -1).float()).cpu()


def weight_importance(model: nn.Module, groups: list[UnitGroup]) -> list[torch.Tensor]:
    """Per group, each unit's L2 norm over all its weights (every slot): (units,) tensors."""
    params = dict(model.named_parameters())
    scores = []
    with torch.no_grad():
        for g in groups:
            sq = sum(_per_unit(params[s.name].detach(), s, lambda x: x.pow(2).sum(1)) for s in g.slots)
            scores.append(torch.as_tensor(sq).sqrt())
    return scores


def taylor_importance(model: nn.Module, groups: list[UnitGroup], batches: Iterable[Any],
                      loss_fn: Callable[[nn.Module, Any], torch.Tensor]) -> list[torch.Tensor]:
    """Per group, each unit's first-order Taylor importance, summed over ``batches``.

    Removing unit u sets its weights w_u to zero, which changes the loss by about
    -sum(w_u * dL/dw_u); the score is the absolute value of that estimate, per batch, summed.
    Runs in eval mode (no dropout) and leaves no gradients behind.
    """
    params = dict(model.named_parameters())
    scores = [torch.zeros(g.units) for g in groups]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            loss_fn(model, batch).float().backward()
            for score, g in zip(scores, groups):
                change = torch.zeros(g.units)
                for s in g.slots:
                    p = params[s.name]
                    if p.grad is not None:
                        change += _per_unit(p.detach() * p.grad, s, lambda x: x.sum(1))
                score += change.abs()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return scores


def _unit_name(group: UnitGroup, config: dict, gqa: str) -> str:
    if group.kind == "channels":
        return "MLP channels"
    if config.get("model_type") == "fromzero-gpt":
        from fromzero.models.gpt import GPTConfig

        cfg = GPTConfig.from_dict(config)
        if cfg.kv_heads != cfg.n_head:
            return "key/value groups" if gqa == "groups" else "query heads of each key/value group"
    return "attention heads"


def plan_keep(groups: list[UnitGroup], scores: list[torch.Tensor], sparsity: float, config: dict,
              gqa: str = "queries") -> list[torch.Tensor]:
    """Per group, the (ascending) indices of the units to keep: within each bucket the
    round(sparsity * bucket size) least important units go (ties: the later unit goes)."""
    keeps = []
    for g, score in zip(groups, scores):
        kept = []
        for b in torch.unique(g.buckets):
            members = (g.buckets == b).nonzero().squeeze(1)
            n = members.numel()
            keep = n - _half_up(sparsity * n)
            if keep < 1:
                raise FromzeroError(f"sparsity {sparsity} would remove all {n} {_unit_name(g, config, gqa)} "
                                    f"of each layer; use a lower sparsity")
            order = torch.sort(score[members], descending=True, stable=True).indices
            kept.append(members[order[:keep]])
        keeps.append(torch.cat(kept).sort().values)
    return keeps


def cut_state(state: dict[str, torch.Tensor], groups: list[UnitGroup],
              keeps: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with the removed units' rows / columns cut out of every slot.

    A parameter may hold several slots along one axis (GPT's fused q | k | v): its removal mask
    is their union, and the kept indices stay in ascending order, so the fused layout (and the
    query-head -> kv-group mapping) is preserved.
    """
    remove: dict[tuple[str, int], torch.Tensor] = {}
    for g, keep in zip(groups, keeps):
        gone = torch.ones(g.units, dtype=torch.bool)
        gone[keep] = False
        for s in g.slots:
            key = (s.name, s.axis)
            if key not in remove:
                remove[key] = torch.zeros(state[s.name].size(s.axis), dtype=torch.bool)
            remove[key][s.rows[gone].reshape(-1)] = True
    out = dict(state)
    for (name, axis), mask in remove.items():
        kept = (~mask).nonzero().squeeze(1).to(state[name].device)
        out[name] = state[name].index_select(axis, kept).contiguous()
    return out


def _pruned_config(config: dict, heads: int | None, channels: int | None, gqa: str) -> dict:
    """config.json of the pruned model: ``heads`` / ``channels`` units kept per layer, the same head width."""
    new = dict(config)
    if config["model_type"] == "fromzero-bert":
        from fromzero.models.bert import BertConfig

        cfg = BertConfig.from_dict(config)
        if heads is not None and heads != cfg.num_attention_heads:
            new.update(num_attention_heads=heads, head_dim=cfg.head_size)
        if channels is not None and channels != cfg.intermediate_size:
            new["intermediate_size"] = channels
        return new
    from fromzero.models.gpt import GPTConfig

    cfg = GPTConfig.from_dict(config)
    H, G = cfg.n_head, cfg.kv_heads
    if heads is not None:
        if gqa == "groups" or G == H:  # units were kv groups of H / G query heads each
            new_h, new_g = heads * (H // G), heads
        else:  # units were query heads; every kv group kept
            new_h, new_g = heads, G
        if new_h != H:
            new.update(n_head=new_h, head_dim=cfg.head_size, n_kv_head=new_g if cfg.n_kv_head else 0)
    if channels is not None and channels != (cfg.intermediate_size or 4 * cfg.n_embd):
        new["intermediate_size"] = channels
    return new


def structured_prune(model: nn.Module, config: dict, sparsity: float, scores: list[torch.Tensor] | None = None,
                     gqa: str = "queries") -> tuple[nn.Module, dict, dict[str, Any]]:
    """Remove the least important heads and MLP channels of every layer of a BERT or GPT.

    config: the checkpoint's config.json (extra keys are kept). scores: per unit group of
    :func:`structured_groups` (same ``gqa``), e.g. from :func:`taylor_importance`; None means
    :func:`weight_importance`. Returns a new, smaller model (on the same device, in eval mode),
    its config and a summary; ``model`` is not changed.
    """
    groups = structured_groups(model, config, gqa)
    if scores is None:
        scores = weight_importance(model, groups)
    keeps = plan_keep(groups, scores, sparsity, config, gqa)
    units = {g.kind: g for g in groups}  # every layer has as many units of a kind
    kept = {g.kind: k.numel() for g, k in zip(groups, keeps)}
    new_config = _pruned_config(config, kept.get("heads"), kept.get("channels"), gqa)
    state = cut_state(model.state_dict(), groups, keeps)
    from fromzero.models import build_model

    device = next(model.parameters()).device
    pruned = build_model(new_config)
    pruned.load_state_dict(state, strict=True)
    pruned.to(device).eval()
    heads, channels = units["heads"], units["channels"]
    summary = {
        "head_units": {"kind": _unit_name(heads, config, gqa), "before": heads.units, "after": kept["heads"],
                       "removed_fraction": 1 - kept["heads"] / heads.units},
        "channels": {"before": channels.units, "after": kept["channels"],
                     "removed_fraction": 1 - kept["channels"] / channels.units},
        "removed": {f"layer {g.layer} {g.kind}": sorted(set(range(g.units)) - set(k.tolist()))
                    for g, k in zip(groups, keeps)},
        "config_changes": {k: v for k, v in new_config.items() if config.get(k) != v},
    }
    return pruned, new_config, summary


# ---------------------------------------------------------------------------------------------
# Tasks: where importance, recovery and evaluation get their data


class _Task:
    """Data-dependent work on one checkpoint's task: importance batches, recovery, evaluation.

    A task has ``loss(model, batch) -> tensor``, ``batches(batch_size, seed, epoch)``,
    ``steps_per_epoch(batch_size)``, ``val_metrics(model)`` (recovery's evaluation) and
    ``evaluate_dir(directory)`` (the quality of a checkpoint, before and after)."""

    monitor = "val_loss"
    higher_is_better = False
    default_lr = 1e-4
    default_batch_size = 16

    def __init__(self, data: str, device: torch.device) -> None:
        from fromzero.devices import autocast_context, resolve_dtype

        self.data, self.device = data, device
        self.autocast = lambda: autocast_context(device, resolve_dtype(device, "auto"))  # noqa: E731

    def latency_input(self, config: dict) -> tuple[torch.Tensor, ...] | None:
        return None


class _TextTask(_Task):
    """A text classifier: the splits of the data it was fine-tuned on (its run's config.yaml)."""

    monitor = "val_f1_macro"
    higher_is_better = True
    default_lr = 3e-5

    def __init__(self, directory: Path, config: dict, info: dict, run: dict, data: str, device: torch.device) -> None:
        from fromzero.data.classification import encode_texts, load_text_classification
        from fromzero.models.bert import BertConfig, encoder_limit, load_encoder_tokenizer

        super().__init__(data, device)
        self.splits = load_text_classification(data, run.get("text_column", "text"), run.get("label_column", "label"),
                                               run.get("val_fraction", 0.1), run.get("test_fraction", 0.1),
                                               run.get("seed", 0))
        self.labels = list(config.get("labels") or [])
        if not self.labels:
            raise FromzeroError(f"{directory}/config.json has no class names (labels)")
        index = {name: i for i, name in enumerate(self.labels)}
        for split, rows in self.splits.items():
            unknown = sorted({label for _, label in rows} - set(index))
            if unknown:
                raise FromzeroError(f"{data} ({split}) has label {unknown[0]!r} that the model does not know "
                                    f"({', '.join(self.labels)})")
        bert = BertConfig.from_dict(config)
        self.pad_id = bert.pad_token_id or 0
        self.pad_multiple = int(run.get("pad_to_multiple_of", 8))
        self.eval_batch_size = int(run.get("eval_batch_size", 64))
        max_length = int(info.get("max_length") or encoder_limit(directory, bert))
        tokenizer = load_encoder_tokenizer(directory, bert)
        self.ids = {s: encode_texts(tokenizer, [t for t, _ in rows], max_length)[0] for s, rows in self.splits.items()}
        self.label_ids = {s: [index[label] for _, label in rows] for s, rows in self.splits.items()}
        self.default_lr = float(run.get("lr", self.default_lr))
        self.default_batch_size = int(run.get("batch_size", self.default_batch_size))
        self._val = self._batches("val", self.eval_batch_size, False, 0)

    def _batches(self, split: str, batch_size: int, shuffle: bool, seed: int) -> Any:
        from fromzero.finetune.text import TextBatches

        return TextBatches(self.ids[split], self.label_ids[split], batch_size, shuffle, seed, self.pad_id,
                           self.pad_multiple)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, mask, y = (batch[k].to(self.device) for k in ("input_ids", "attention_mask", "labels"))
        logits, _ = model(ids, mask)
        return F.cross_entropy(logits.float(), y)

    def batches(self, batch_size: int, seed: int, epoch: int) -> Iterable[Any]:
        return self._batches("train", batch_size, True, seed).epoch(epoch)

    def steps_per_epoch(self, batch_size: int) -> int:
        return len(self._batches("train", batch_size, True, 0))

    def _score(self, model: nn.Module, split: str, batches: Any) -> dict[str, Any]:
        from fromzero.finetune.text import predict_logits, score

        return score(predict_logits(model, batches, self.device, self.autocast), self.label_ids[split], self.labels)

    def val_metrics(self, model: nn.Module) -> dict[str, Any]:
        m = self._score(model, "val", self._val)
        return {k: m[k] for k in ("loss", "accuracy", "f1_macro")}

    def evaluate_dir(self, directory: Path) -> dict[str, Any]:
        """Test-split metrics of a checkpoint directory, on the same rows for every checkpoint."""
        from fromzero.checkpoint import load_model

        model = load_model(directory, self.device)
        m = self._score(model, "test", self._batches("test", self.eval_batch_size, False, 0))
        return {"split": "test", "n": len(self.label_ids["test"]),
                **{k: m[k] for k in ("accuracy", "f1_macro", "loss")}}

    def latency_input(self, config: dict) -> tuple[torch.Tensor, ...]:
        from fromzero.data.classification import collate_padded

        rows = self.ids["test"][:8]
        batch = collate_padded(rows, None, self.pad_id, self.pad_multiple)
        return batch["input_ids"], batch["attention_mask"]


class _LMTask(_Task):
    """A GPT language model: a prepared data directory (train.bin to train, val.bin to score)."""

    def __init__(self, config: dict, run: dict, data: str, device: torch.device) -> None:
        from fromzero.data.text import load_meta, load_split, sample_batch

        super().__init__(data, device)
        meta = load_meta(data)
        if int(meta["vocab_size"]) > int(config["vocab_size"]):
            raise FromzeroError(f"{data} has a vocabulary of {meta['vocab_size']} tokens, the model only "
                                f"{config['vocab_size']}: it is not this model's data")
        self.train = load_split(data, "train")
        self.val = load_split(data, "val")
        self.block_size = int(config["block_size"])
        train_cfg = run.get("train") if isinstance(run.get("train"), dict) else {}
        # Recovery continues from a trained model: a third of its run's peak lr (on the Shakespeare
        # char GPT, 50% structured, 200 steps: val loss 2.01 / 1.92 / 1.92 at lr 1e-4 / 3e-4 / 1e-3).
        self.default_lr = float(train_cfg["lr"]) / 3 if train_cfg.get("lr") else 3e-4
        self.default_batch_size = int(train_cfg.get("batch_size", 12))
        gen = torch.Generator().manual_seed(1234)  # the same 20 validation batches at every evaluation
        self._val = [sample_batch(self.val, self.default_batch_size, self.block_size, gen) for _ in range(20)]

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        _, loss = model(x.to(self.device), y.to(self.device))
        return loss

    def batches(self, batch_size: int, seed: int, epoch: int) -> Iterable[Any]:
        from fromzero.data.text import sample_batch

        gen = torch.Generator().manual_seed(seed * 1000 + epoch)
        while True:
            yield sample_batch(self.train, batch_size, self.block_size, gen)

    def steps_per_epoch(self, batch_size: int) -> int:
        return max(1, (len(self.train) - 1) // (batch_size * self.block_size))

    @torch.no_grad()
    def val_metrics(self, model: nn.Module) -> dict[str, Any]:
        model.eval()
        losses = []
        for batch in self._val:
            with self.autocast():
                losses.append(float(self.loss(model, batch)))
        return {"loss": sum(losses) / len(losses)}

    def evaluate_dir(self, directory: Path) -> dict[str, Any]:
        """Loss over the whole val split (consecutive block_size windows), via ``evaluate``'s code."""
        from fromzero.inference.predict import evaluate_checkpoint

        return evaluate_checkpoint(directory, self.data, "val", device=str(self.device))

    def latency_input(self, config: dict) -> tuple[torch.Tensor, ...]:
        """Up to 8 rows of block_size validation tokens."""
        rows = max(1, min(8, len(self.val) // self.block_size))
        tokens = self.val[: rows * self.block_size].astype("int64")
        return (torch.from_numpy(tokens).view(rows, self.block_size),)


def resolve_task(directory: Path, config: dict, info: dict, data: str | None, device: torch.device) -> _Task | None:
    """The task whose data importance / recovery / evaluation use, or None when there is none.

    Text classifiers (fromzero-bert with task text-classification): ``data`` or the data of the
    run that made the checkpoint (its config.yaml), split as that run split it. GPTs: ``data``
    or the pretraining run's ``data.dir``, a prepared data directory.
    """
    from fromzero.inference.predict import run_config

    run = run_config(directory)
    task = get_task(info.get("task"))
    if task is not None and task.is_classifier and config.get("model_type") == "fromzero-bert":
        source = data or run.get("data")
        return _TextTask(directory, config, info, run, str(source), device) if source else None
    if config.get("model_type") == "fromzero-gpt":
        run_data = run.get("data")
        source = data or (run_data.get("dir") if isinstance(run_data, dict) else None)
        if not source:
            return None
        if not (Path(source) / "meta.json").is_file():
            raise FromzeroError(f"{source} is not a prepared data directory (no meta.json): a GPT is pruned, "
                                "recovered and evaluated with the train.bin / val.bin of `fromzero data prepare`")
        return _LMTask(config, run, str(source), device)
    return None


# ---------------------------------------------------------------------------------------------
# Recovery and measurement


def recover(model: nn.Module, task: _Task, steps: int, lr: float, batch_size: int, device: torch.device,
            seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Fine-tune ``model`` in place for ``steps`` optimizer steps with the shared Trainer:
    AdamW, short warmup, cosine decay; the validation metric picks the best of the evaluations
    (one per epoch, at least one at the end). Returns what happened."""
    from fromzero.finetune.engine import FinetuneConfig
    from fromzero.training.trainer import Trainer
    from fromzero.training.callbacks import NullLogger
    from fromzero.devices import resolve_dtype

    per_epoch = task.steps_per_epoch(batch_size)
    cfg = FinetuneConfig(epochs=max(1, math.ceil(steps / per_epoch)), max_steps=steps, batch_size=batch_size,
                         lr=lr, warmup_ratio=0.05, min_lr_ratio=0.1, weight_decay=0.0, seed=seed,
                         log_interval=max(1, steps // 10), progress=progress)
    torch.manual_seed(seed)
    logger = NullLogger()  # the rows stay in memory: recovery writes no run directory
    # (loss, samples, tokens): the counts only feed the progress bar's rate, batches count as 1
    trainer = Trainer(model, cfg, device, resolve_dtype(device, "auto"), lambda m, b: (task.loss(m, b), 1, 1),
                      task.val_metrics, task.monitor, task.higher_is_better, logger)
    fit = trainer.fit(lambda e: itertools.islice(task.batches(batch_size, seed, e), per_epoch), per_epoch)
    model.eval()
    return {"steps": fit.steps, "lr": lr, "batch_size": batch_size, "best_step": fit.best_step,
            "val": fit.best_metrics, "train_s": round(fit.train_s, 2),
            "train_loss": [(r["step"], round(r["loss"], 4)) for r in logger.rows if "loss" in r]}


@torch.inference_mode()
def measure_latency(models: dict[str, nn.Module], inputs: tuple[torch.Tensor, ...], rounds: int = 15,
                    warmup: int = 2) -> dict[str, float]:
    """Median milliseconds of one forward pass of each model on ``inputs``, rounds interleaved
    (model A, B, A, B, ...) so that load changes on a shared machine hit all models alike."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for name, model in models.items():
        model.eval()
        for _ in range(warmup):
            model(*inputs)
    for _ in range(rounds):
        for name, model in models.items():
            t0 = time.perf_counter()
            model(*inputs)
            times[name].append((time.perf_counter() - t0) * 1000)
    return {name: statistics.median(t) for name, t in times.items()}


# ---------------------------------------------------------------------------------------------
# The command


def _take(task: _Task, batch_size: int, seed: int, n: int) -> Iterable[Any]:
    """The first ``n`` training batches, over as many epochs as that takes."""
    batches = itertools.chain.from_iterable(task.batches(batch_size, seed, e) for e in itertools.count())
    return itertools.islice(batches, n)


def _copy_extras(src: Path, dst: Path) -> None:
    """Tokenizer files and the like: everything of the source checkpoint but weights/config/state."""
    for p in src.iterdir():
        if p.name in _NOT_COPIED or p.name.startswith("."):
            continue
        if p.is_dir():
            shutil.copytree(p, dst / p.name)
        else:
            shutil.copyfile(p, dst / p.name)


def _pruned_info(info: dict, cfg: PruneConfig) -> dict:
    """info.json of the pruned checkpoint: the source's, its now stale metrics moved aside."""
    stale = {k: v for k, v in info.items() if k.startswith(("val", "test"))}
    kept = {k: v for k, v in info.items() if k not in stale and k not in ("adapter", "base_checkpoint")}
    kept["pruning"] = {"method": cfg.method, "sparsity": cfg.sparsity, "from": str(Path(cfg.checkpoint).resolve())}
    if stale:
        kept["before_pruning"] = stale
    return kept


def prune_checkpoint(cfg: PruneConfig) -> dict[str, Any]:
    """``fromzero prune``: prune, optionally recover and evaluate, write ``cfg.out`` atomically.

    Returns the report that is also written to ``out/pruning.json``.
    """
    from fromzero.checkpoint import checkpoint_info
    from fromzero.checkpoint import (CONFIG_FILE, INFO_FILE, MODEL_FILE, atomic_directory, load_model,
                                              model_state_for_saving, read_json, write_info, write_safetensors)
    from fromzero.devices import resolve_device

    t0 = time.perf_counter()
    cfg.validate()
    src, out = Path(cfg.checkpoint), Path(cfg.out)
    info = checkpoint_info(src)  # also: "checkpoint directory not found"
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not cfg.force:
        raise FromzeroError(f"{out} already exists; pass --force to replace it")
    if out.resolve() == src.resolve():
        raise FromzeroError("--out must differ from --checkpoint (the source is never overwritten)")
    config = read_json(src / CONFIG_FILE, "model config")
    model_type = config.get("model_type")
    if cfg.method == "structured":
        _require_structured(model_type)
    device = resolve_device(cfg.device)

    wants_taylor = cfg.method == "structured" and cfg.importance in ("auto", "taylor")
    needs_data = cfg.recover_steps > 0 or cfg.evaluate or cfg.importance == "taylor"
    task, task_error = None, None
    if needs_data or wants_taylor:
        try:
            task = resolve_task(src, config, info, cfg.data, device)
        except FromzeroError as e:
            if needs_data:
                raise
            task_error = str(e)  # importance auto: fall back to weight norms, and say why
    if task is None and needs_data:
        what = "--recover-steps" if cfg.recover_steps else "--eval" if cfg.evaluate else "taylor importance"
        if config.get("model_type") == "fromzero-gpt":
            raise FromzeroError(f"{what} needs data: pass --data DIR (a prepared data directory, as written by "
                                "`fromzero data prepare`)")
        about = get_task(info.get("task"))
        if about is not None and about.is_classifier and model_type == "fromzero-bert":
            raise FromzeroError(f"{what} needs the classifier's data: pass --data (no config.yaml of the run "
                                f"that made {src} was found)")
        raise FromzeroError(f"{what} works on text classifiers and GPT language models; {src} is a "
                            f"{info.get('task')!r} checkpoint ({model_type})")

    model = load_model(src, device)
    params_before = count_params(model)
    batch_size = cfg.batch_size or (task.default_batch_size if task else 16)
    report: dict[str, Any] = {
        "method": cfg.method, "checkpoint": str(src), "out": str(out), "model_type": model_type,
        "task": info.get("task"), "sparsity_requested": cfg.sparsity,
    }
    quality_before = task.evaluate_dir(src) if cfg.evaluate and task else None

    sparse_names: set[str] = set()
    if cfg.method == "magnitude":
        masks = mask_by_magnitude(model, cfg.sparsity, cfg.scope)
        if cfg.recover_steps and task:
            hooks = keep_zeros(model, masks)
            report["recovery"] = recover(model, task, cfg.recover_steps, cfg.lr or task.default_lr, batch_size,
                                         device, cfg.seed, cfg.progress)
            for hook in hooks:
                hook.remove()
        stats = weight_sparsity(model, masks)
        sparse_names = {f"{name}.weight" for name in masks}
        total = sum(p.numel() for p in model.parameters())
        zeros = sum(int((p == 0).sum()) for p in model.parameters())
        report.update(scope=cfg.scope, sparsity_achieved=stats["sparsity"], pruned_layers=len(masks),
                      pruned_weights=stats["weights"], sparsity_all_parameters=zeros / total,
                      note="dense kernels: zeros cost as much as other weights, so no speed-up; "
                           "model.safetensors stores them densely (same size on disk)")
        pruned, new_config = model, config
    else:
        groups = structured_groups(model, config, cfg.gqa)
        use_taylor = task is not None and cfg.importance in ("auto", "taylor")
        if use_taylor:
            assert task is not None

            scores = taylor_importance(model, groups, _take(task, batch_size, cfg.seed, cfg.importance_batches),
                                       task.loss)
        else:
            scores = weight_importance(model, groups)
        pruned, new_config, summary = structured_prune(model, config, cfg.sparsity, scores, cfg.gqa)
        report.update(importance="taylor" if use_taylor else "weight", gqa=cfg.gqa, **summary)
        if task_error:
            report["importance_note"] = f"no training data for taylor importance ({task_error})"
        report["sparsity_achieved"] = {"heads": summary["head_units"]["removed_fraction"],
                                       "channels": summary["channels"]["removed_fraction"]}
        del model
        if cfg.recover_steps and task:
            report["recovery"] = recover(pruned, task, cfg.recover_steps, cfg.lr or task.default_lr, batch_size,
                                         device, cfg.seed, cfg.progress)
    params_after = count_params(pruned)
    report["params"] = {"before": params_before, "after": params_after, "ratio": params_after / params_before}

    with atomic_directory(out) as tmp:
        state = model_state_for_saving(pruned)
        write_safetensors(state, tmp / MODEL_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(new_config, indent=2) + "\n")
        write_info(tmp / INFO_FILE, _pruned_info(info, cfg))
        _copy_extras(src, tmp)
        before_file = src / MODEL_FILE
        size_before = before_file.stat().st_size if before_file.is_file() else None
        size_after = (tmp / MODEL_FILE).stat().st_size
        report["size_bytes"] = {"before": size_before, "after": size_after,
                                "ratio": size_after / size_before if size_before else None}
        if sparse_names:
            report["size_bytes"]["sparse_format_estimate"] = sparse_storage_bytes(state, sparse_names)
        if cfg.evaluate and task:
            report["quality"] = {"before": quality_before, "after": task.evaluate_dir(tmp)}
            example = task.latency_input(config)
            if example is not None:
                models = {"before": load_model(src, "cpu"), "after": load_model(tmp, "cpu")}
                ms = measure_latency(models, example)
                report["cpu_latency_ms"] = {**ms, "speedup": ms["before"] / ms["after"],
                                            "input_shape": list(example[0].shape)}
        report["wall_s"] = round(time.perf_counter() - t0, 2)
        (tmp / PRUNING_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def format_report(report: dict[str, Any]) -> str:
    """A few human lines about a pruning report (the CLI prints them)."""
    lines = []
    if report["method"] == "magnitude":
        lines.append(f"magnitude ({report['scope']}): {report['sparsity_achieved']:.2%} of "
                     f"{report['pruned_weights']:,} weights in {report['pruned_layers']} layers are zero "
                     f"({report['sparsity_all_parameters']:.2%} of all parameters)")
        lines.append(f"note: {report['note']}")
    else:
        h, c = report["head_units"], report["channels"]
        lines.append(f"structured ({report['importance']} importance): {h['kind']} {h['before']} -> {h['after']}, "
                     f"MLP channels {c['before']} -> {c['after']} per layer")
    p, s = report["params"], report["size_bytes"]
    lines.append(f"parameters {p['before']:,} -> {p['after']:,} ({p['ratio']:.1%})")
    if s["before"]:
        lines.append(f"model.safetensors {s['before']:,} -> {s['after']:,} bytes ({s['ratio']:.1%})"
                     + (f"; as bitmask + non-zeros ~{s['sparse_format_estimate']:,} bytes"
                        if "sparse_format_estimate" in s else ""))
    if "recovery" in report:
        r = report["recovery"]
        shown = ", ".join(f"{k} {v:.4f}" for k, v in r["val"].items() if isinstance(v, float))
        lines.append(f"recovery: {r['steps']} steps at lr {r['lr']:g} in {r['train_s']:.0f} s; val {shown}")
    if "quality" in report:
        for when in ("before", "after"):
            q = report["quality"][when]
            shown = ", ".join(f"{k} {q[k]:.4f}" for k in ("accuracy", "f1_macro", "loss") if k in q)
            lines.append(f"{when}: {q.get('split', '')} {shown}")
    if "cpu_latency_ms" in report:
        t = report["cpu_latency_ms"]
        lines.append(f"CPU forward {t['before']:.1f} -> {t['after']:.1f} ms (x{t['speedup']:.2f}, "
                     f"input {tuple(t['input_shape'])})")
    return "\n".join(lines)


__all__ = [
    "PruneConfig", "prune_checkpoint", "format_report", "prunable_layers", "mask_by_magnitude", "keep_zeros",
    "magnitude_prune", "weight_sparsity", "sparse_storage_bytes", "structured_groups", "weight_importance",
    "taylor_importance", "plan_keep", "cut_state", "structured_prune", "count_params", "recover",
    "resolve_task", "measure_latency", "UnitGroup", "Slot",
]
