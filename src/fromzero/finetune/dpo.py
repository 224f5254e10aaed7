"""Preference tuning with DPO (Direct Preference Optimization, Rafailov et al. 2023).

Data: JSONL rows ``{prompt | messages, chosen, rejected}`` (:mod:`fromzero.data.preferences`),
rendered with the template the starting checkpoint was tuned with (an sft run's recorded fromzero
template, else its own Jinja template; for an adapter, its base's); a checkpoint without one is
refused. The sft run's ``system_prompt`` goes before every pair that has none, as in its chats.

The loss, per pair, with ``log pi(y|x)`` the *sum* of the reply tokens' log-probabilities::

    h = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))
    loss = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)

``eps`` is ``label_smoothing`` (conservative DPO, Mitchell 2023: a share ``eps`` of the labels
assumed flipped; 0 is plain DPO, TRL's ``loss_type="sigmoid"``). The implicit rewards are
``beta * (log pi - log ref)``; train and val rows log ``loss`` and the :data:`METRICS` of the
rewards, val and test also ``logp_accuracy`` (the tuned model alone prefers the chosen reply).

The reference model (``ref``):

* ``method: lora`` from a checkpoint: the same weights with the adapter disabled (peft's
  ``disable_adapter``), so there is no second copy of the model in memory;
* ``init_from`` a LoRA adapter (an sft LoRA run's ``checkpoints/best``): training continues
  that adapter, and the reference is the sft model as it was, its log-probs computed once before
  training (disabling the adapter would give the model before sft). With ``method: full`` /
  ``frozen`` the adapter is merged first;
* ``method: full`` / ``frozen``: a frozen copy of the starting model (twice the weights in
  memory) -- unless ``precompute_ref``, which computes the reference log-probs of every training
  pair once before the first step: no copy, one forward per step instead of two.

Reference log-probs of the val and test pairs are always computed once at the start (the
"before" figures come from them); reference passes run in eval mode (no dropout).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from fromzero.checkpoint import INFO_FILE, read_json
from fromzero.errors import FromzeroError
from fromzero.finetune.engine import FinetuneConfig, run_finetune_task
from fromzero.finetune.lora import base_model
from fromzero.finetune.methods import count_parameters
from fromzero.finetune.sft import DecoderTask, decoder_checkpoint
from fromzero.training.trainer import FitResult

METRICS = ("reward_margin", "reward_chosen", "reward_rejected", "reward_accuracy")


@dataclass
class DPOConfig(FinetuneConfig):
    """Preference tuning (DPO) of a chat decoder on chosen/rejected reply pairs."""

    RECIPE_KEYS: ClassVar[dict[str, str]] = {
        "data": "data.source", "val_fraction": "data.val_fraction", "test_fraction": "data.test_fraction",
        "max_examples": "data.max_examples", "max_eval_examples": "data.max_eval_examples", "max_length":
        "data.max_length", "truncate_prompt": "data.truncate_prompt"}

    init_from: str = ""
    """The model to tune: a fromzero-gpt checkpoint with a chat template (a converted chat model), an sft checkpoint, or an sft LoRA adapter directory."""
    data: str = ""
    """A .jsonl file of {prompt|messages, chosen, rejected} rows | a folder with train.jsonl (+ val.jsonl, test.jsonl) | rotten-tomatoes-preferences."""
    val_fraction: float = 0.1
    """Share of the pairs carved out for validation when the data has no val split."""
    test_fraction: float = 0.1
    """Share of the pairs carved out for test when the data has no test split."""
    max_examples: int = 0
    """Use at most this many training pairs, a seeded random subset (0 = all)."""
    max_eval_examples: int = 0
    """Use at most this many val and test pairs each, a seeded random subset (0 = all)."""
    max_length: int = 0
    """Most tokens of prompt + reply (0 = the model's block_size); longer pairs are refused unless truncate_prompt."""
    truncate_prompt: bool = False
    """Cut too-long prompts from the start (the end next to the reply stays) instead of refusing the pair; replies are never cut."""
    beta: float = 0.1
    """DPO temperature: the weight of the log-ratio to the reference (higher = stay closer to the reference)."""
    label_smoothing: float = 0.0
    """Conservative DPO: assumed share of flipped preference labels, in [0, 0.5) (0 = plain DPO)."""
    precompute_ref: bool = False
    """Compute the reference log-probs of the training pairs once before training: no frozen copy of the model (full), one forward per step instead of two."""
    eval_batch_size: int = 16
    """Pairs per batch when evaluating or computing reference log-probs."""
    batch_size: int = 8
    """Pairs per micro-batch (each pair is two sequences)."""
    lr: float = 5e-6
    """Peak learning rate (after warmup); DPO wants small steps (LoRA tolerates ~1e-4)."""

    def validate(self) -> None:
        self.validate_common()
        if not self.init_from:
            raise FromzeroError("model.init_from is required (--model.init_from DIR): "
                                "the checkpoint (or sft LoRA adapter) to tune")
        if not self.data:
            raise FromzeroError("data is required: a preference .jsonl file, a folder with train.jsonl, "
                                "or rotten-tomatoes-preferences")
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise FromzeroError(f"beta must be positive, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise FromzeroError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        for name in ("max_length", "max_examples", "max_eval_examples"):
            if getattr(self, name) < 0:
                raise FromzeroError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.eval_batch_size <= 0:
            raise FromzeroError(f"eval_batch_size must be positive, got {self.eval_batch_size}")


# ---------------------------------------------------------------------------------------------
# The loss


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N,) sums of log p(label) over the positions whose label is not -100.

    logits: (N, T, V); labels: (N, T). Only the labelled positions are normalised (a log-softmax
    over the whole (N, T, V) tensor would be a second logits-sized tensor), in float32.
    """
    mask = labels != -100
    rows = torch.arange(labels.size(0), device=labels.device).unsqueeze(1).expand_as(labels)[mask]
    picked = logits[mask].float()  # (M, V)
    token_logps = picked.gather(-1, labels[mask].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(picked, dim=-1)
    return torch.zeros(labels.size(0), device=logits.device, dtype=torch.float32).index_add(0, rows, token_logps)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and the chosen / rejected implicit rewards (detached), all (B,).

    Inputs are summed reply log-probs of the policy and the reference (module docstring)."""
    chosen_logratios = policy_chosen - ref_chosen
    rejected_logratios = policy_rejected - ref_rejected
    h = chosen_logratios - rejected_logratios
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h)
    if label_smoothing:
        losses = losses - label_smoothing * F.logsigmoid(-beta * h)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def pair_stats(losses: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
               policy_chosen: torch.Tensor | None = None, policy_rejected: torch.Tensor | None = None
               ) -> dict[str, float]:
    """Sums over the pairs of a batch (divide by ``n`` for means)."""
    out = {"n": float(losses.numel()), "loss": float(losses.detach().sum()),
           "reward_margin": float((chosen_rewards - rejected_rewards).sum()),
           "reward_chosen": float(chosen_rewards.sum()), "reward_rejected": float(rejected_rewards.sum()),
           "reward_accuracy": float((chosen_rewards > rejected_rewards).float().sum())}
    if policy_chosen is not None and policy_rejected is not None:
        out["logp_accuracy"] = float((policy_chosen.detach() > policy_rejected.detach()).float().sum())
    return out


def mean_stats(parts: list[dict[str, float]]) -> dict[str, float]:
    n = sum(p["n"] for p in parts)
    if not n:
        return {}
    keys = [k for k in parts[0] if k != "n"]
    return {k: sum(p[k] for p in parts) / n for k in keys}


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Any:
    """model.eval() for the duration, then every module's own mode back (frozen parts stay eval)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


class Reference:
    """Reference log-probs of a batch: ``adapter`` (the policy with its LoRA adapter disabled),
    ``copy`` (a frozen copy) or ``precomputed`` (carried in the batch)."""

    def __init__(self, kind: str, policy: nn.Module, frozen: nn.Module | None = None) -> None:
        self.kind, self.policy, self.frozen = kind, policy, frozen

    @torch.no_grad()
    def logps(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(2B,) summed reply log-probs of the reference, eval mode."""
        if self.kind == "adapter":
            with eval_mode(self.policy), self.policy.disable_adapter():  # type: ignore[operator]
                logits, _ = self.policy(x)
        elif self.kind == "copy" and self.frozen is not None:
            logits, _ = self.frozen(x)
        else:
            raise ValueError(f"reference {self.kind!r} has no model to run")
        return sequence_logps(logits, y)


def batch_loss(net: nn.Module, batch: dict[str, torch.Tensor], reference: Reference | None, beta: float,
               label_smoothing: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean DPO loss of a collated batch (chosen rows first, then rejected) and its stats."""
    x, y = batch["x"], batch["y"]
    if "ref_chosen" in batch:
        ref_chosen, ref_rejected = batch["ref_chosen"], batch["ref_rejected"]
    else:
        if reference is None:
            raise ValueError("no reference log-probs in the batch and no reference model")
        ref_chosen, ref_rejected = reference.logps(x, y).chunk(2)
    logits, _ = net(x)
    policy_chosen, policy_rejected = sequence_logps(logits, y).chunk(2)
    losses, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                                                         beta, label_smoothing)
    return losses.mean(), pair_stats(losses, chosen_rewards, rejected_rewards, policy_chosen, policy_rejected)


# ---------------------------------------------------------------------------------------------
# Starting model, template, reference


def resolve_init(init_from: str) -> Path:
    """A checkpoint directory for a directory, a built-in model name or a .gguf file."""
    from fromzero.models.builtin import resolve_model

    path = resolve_model(init_from)
    if not Path(path).is_dir():
        raise FromzeroError(f"init_from {init_from!r}: no such checkpoint directory (or built-in model name)")
    return Path(path)


def find_chat_template(init_dir: Path, base_dir: Path | None) -> tuple[Any, Path | None, dict | None]:
    """(template, directory whose template files to carry over, fromzero template fields).

    The template the starting checkpoint was tuned with (:func:`fromzero.data.sft.checkpoint_chat_template`:
    an sft run's recorded fromzero template, else its own Jinja template); for an adapter
    without one, its base checkpoint's Jinja template."""
    from dataclasses import asdict as fields_of

    from fromzero.data.chat_template import load_jinja_template
    from fromzero.data.sft import ChatTemplate, checkpoint_chat_template

    template = checkpoint_chat_template(init_dir)
    if isinstance(template, ChatTemplate):
        return template, None, fields_of(template)
    if template is not None:
        return template, init_dir, None
    if base_dir is not None:
        jinja = load_jinja_template(base_dir)
        if jinja is not None:
            return jinja, base_dir, None
    raise FromzeroError(
        f"{init_dir} has no chat template: DPO renders pairs as chats (start from a converted chat model, "
        "which keeps chat_template.jinja, or from an sft run's checkpoint)")


@dataclass
class StartingModel:
    model: nn.Module
    config: dict
    base_dir: Path
    """The checkpoint whose weights an adapter result sits on."""
    adapter_init: bool
    trained_modules: list[nn.Module] | None
    reference_kind: str


def build_starting_model(cfg: DPOConfig, init_dir: Path, config: dict, info: dict) -> StartingModel:
    """The policy to train, which weights train, and where the reference comes from."""
    from fromzero.finetune.lora import ADAPTER_CONFIG, apply_lora, load_adapter_model
    from fromzero.finetune.methods import freeze
    from fromzero.models import build_model
    from fromzero.checkpoint import MODEL_FILE, load_weights

    adapter_init = (init_dir / ADAPTER_CONFIG).is_file() and not (init_dir / MODEL_FILE).exists()
    base_dir = init_dir
    trained_modules = None
    if adapter_init:
        base_dir = Path(str(info.get("base_checkpoint", "")))
        if not base_dir.is_dir():
            raise FromzeroError(f"{init_dir}: the base checkpoint of this adapter is gone ({base_dir})")
        if cfg.method == "lora":  # the sft adapter trains on (on its base, dequantized for qlora)
            model = load_adapter_model(init_dir, merge=False, dropout=cfg.lora_dropout)
        else:
            model = load_adapter_model(init_dir)  # base + sft adapter, merged
            base_dir = init_dir
    else:
        model = build_model(config)
        load_weights(model, init_dir / MODEL_FILE)
        if cfg.method == "lora":
            model = apply_lora(model, config, cfg, modules_to_save=[])
    if cfg.method == "frozen":
        trained_modules = freeze(model, cfg.unfreeze_top)
    if cfg.method == "lora":
        kind = "precomputed" if (adapter_init or cfg.precompute_ref) else "adapter"
    else:
        kind = "precomputed" if cfg.precompute_ref else "copy"
    return StartingModel(model, config, base_dir, adapter_init and cfg.method == "lora", trained_modules, kind)


@torch.no_grad()
def reference_logps(model: nn.Module, dataset: Any, batch_size: int, pad_id: int, device: torch.device,
                    autocast: Callable[[], Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed reply log-probs of ``model`` as it is (eval mode) for every pair."""
    from fromzero.data.preferences import collate_preferences

    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=lambda b: collate_preferences(b, pad_id))
    chosen, rejected = [], []
    with eval_mode(model):
        for batch in loader:
            x, y = batch["x"].to(device), batch["y"].to(device)
            with autocast():
                logits, _ = model(x)
            c, r = sequence_logps(logits, y).chunk(2)
            chosen.append(c.cpu())
            rejected.append(r.cpu())
    return torch.cat(chosen), torch.cat(rejected)


@torch.no_grad()
def evaluate_pairs(net: nn.Module, loader: Any, device: torch.device, autocast: Callable[[], Any],
                   beta: float, label_smoothing: float, reference: Reference | None = None) -> dict[str, float]:
    """Mean loss, rewards, reward and log-prob accuracy over a loader (eval mode)."""
    parts = []
    model = getattr(net, "module", net)
    with eval_mode(model):
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast():
                _, stats = batch_loss(net, batch, reference, beta, label_smoothing)
            parts.append(stats)
    if not parts:
        raise FromzeroError("the evaluation split has no pairs")
    return mean_stats(parts)


def before_metrics(ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float,
                   label_smoothing: float) -> dict[str, float]:
    """The metrics of the starting model, which is its own reference: loss log 2 (h = 0), rewards 0,
    and its own preference (logp_accuracy)."""
    losses, c, r = dpo_loss(ref_chosen, ref_rejected, ref_chosen, ref_rejected, beta, label_smoothing)
    return mean_stats([pair_stats(losses, c, r, ref_chosen, ref_rejected)])


class StepMetricsLogger:
    """Wraps the run's logger: each training row the Trainer logs (it has ``loss``) gets the DPO
    metrics of that step's micro-batches (the last ``grad_accum`` the loss function saw)."""

    def __init__(self, inner: Any, grad_accum: int) -> None:
        self.inner, self.grad_accum = inner, grad_accum
        self.pending: list[dict[str, float]] = []

    @property
    def rows(self) -> list[dict[str, Any]]:
        return getattr(self.inner, "rows", [])

    def add(self, stats: dict[str, float]) -> None:
        self.pending.append(stats)

    def log(self, row: dict[str, Any]) -> None:
        if "loss" in row and self.pending:
            step = mean_stats(self.pending[-self.grad_accum:])
            row = {**row, **{k: step[k] for k in METRICS if k in step}}
            self.pending.clear()
        self.inner.log(row)

    def close(self) -> None:
        self.inner.close()


def _subset(pairs: list, limit: int, seed: int) -> list:
    """At most ``limit`` items, a seeded random subset in their original order (0 = all)."""
    if not limit or len(pairs) <= limit:
        return pairs
    import numpy as np

    keep = sorted(np.random.default_rng(seed).permutation(len(pairs))[:limit].tolist())
    return [pairs[i] for i in keep]


# ---------------------------------------------------------------------------------------------
# The run


def finetune_dpo(cfg: DPOConfig, resume: bool = False) -> dict[str, Any]:
    """Run a DPOTask (train, keep the best val weights, test once); returns its summary."""
    return run_finetune_task(DPOTask, cfg, resume)


class DPOTask(DecoderTask):
    """One DPO fine-tune (see :class:`fromzero.finetune.engine.FinetuneTask`)."""

    name = "dpo"

    def __init__(self, cfg: DPOConfig, ctx: Any, device: torch.device, dtype: str) -> None:
        from fromzero.data.preferences import add_system_prompt, load_preference_pairs, tokenize_preferences

        self.cfg, self.ctx, self.device, self.dtype = cfg, ctx, device, dtype
        # --- everything that can be refused, before anything is written ----------------------
        self.init_dir = init_dir = resolve_init(cfg.init_from)
        config, tokenizer, max_length = decoder_checkpoint(init_dir, "DPO", cfg.max_length)
        info = read_json(init_dir / INFO_FILE, "checkpoint info") if (init_dir / INFO_FILE).is_file() else {}
        adapter_base = Path(str(info["base_checkpoint"])) if info.get("adapter") == "lora" and \
            info.get("base_checkpoint") else None
        template, self.template_dir, fromzero_template = find_chat_template(init_dir, adapter_base)
        system_prompt = str(info.get("system_prompt") or "")
        special = config.get("hf_special_tokens") or {}
        self.pad_id = pad_id = next((int(i) for i in (tokenizer.eos_id, special.get("pad_token_id"),
                                                      special.get("eos_token_id")) if isinstance(i, int)), 0)
        eos_id = tokenizer.eos_id if fromzero_template is not None else None
        splits = load_preference_pairs(cfg.data, cfg.val_fraction, cfg.test_fraction, cfg.seed)
        splits = {s: add_system_prompt(_subset(p, cfg.max_examples if s == "train" else cfg.max_eval_examples,
                                               cfg.seed), system_prompt) for s, p in splits.items()}
        self.sets = sets = {}
        for split, pairs in splits.items():
            if not pairs:
                raise FromzeroError(f"the {split} split has no preference pairs")
            sets[split] = tokenize_preferences(pairs, tokenizer, template, max_length, cfg.truncate_prompt, eos_id,
                                               what=split)
            if sets[split].n_truncated:
                print(f"note: {split}: {sets[split].n_truncated} of {len(pairs)} prompts were cut from the start "
                      f"to fit max_length {max_length}")

        torch.manual_seed(cfg.seed)
        self.starting = start = build_starting_model(cfg, init_dir, config, info)
        self.model = model = start.model.to(device)
        self.config, self.trained_modules = config, start.trained_modules
        self.adapter_base = start.base_dir if cfg.method == "lora" else None
        self.trainable, self.total = count_parameters(model)

        # --- reference log-probs: val/test always once; train too with precompute_ref --------
        t_ref, kind = time.perf_counter(), start.reference_kind
        # adapter: the base without the (fresh, zero) adapter
        reference_mode = model.disable_adapter if kind == "adapter" else contextlib.nullcontext
        for split in ("train", "val", "test") if kind == "precomputed" else ("val", "test"):
            with reference_mode():  # type: ignore[operator]
                refs = reference_logps(model, sets[split], cfg.eval_batch_size, pad_id, device, self.autocast)
            sets[split].set_reference(*refs)
        self.ref_s = time.perf_counter() - t_ref
        frozen = copy.deepcopy(base_model(model)).eval().requires_grad_(False) if kind == "copy" else None
        self.reference = Reference(kind, model, frozen) if kind != "precomputed" else None
        assert sets["test"].ref_chosen is not None and sets["test"].ref_rejected is not None
        self.before = before_metrics(sets["test"].ref_chosen, sets["test"].ref_rejected, cfg.beta,
                                     cfg.label_smoothing)
        self.base_info: dict[str, Any] = {
            "task": "dpo", "test_before": self.before,
            "method": cfg.method, "beta": cfg.beta, "label_smoothing": cfg.label_smoothing,
            "reference": start.reference_kind, "init_from": str(init_dir.resolve()),
            **({"template": fromzero_template} if fromzero_template is not None
               else {"chat_template": "chat_template.jinja"}),
            **({"system_prompt": system_prompt} if system_prompt else {}),
            **({"qlora": info["qlora"]} if start.adapter_init and isinstance(info.get("qlora"), dict) else {}),
        }

    def start(self, run_dir: Path) -> None:
        from fromzero.data.preferences import collate_preferences

        cfg, sets, start = self.cfg, self.sets, self.starting
        self.make_loaders(sets["train"], functools.partial(collate_preferences, pad_id=self.pad_id))
        train_set = sets["train"]
        where_ref = {"adapter": "the base with the adapter disabled", "copy": "a frozen copy",
                     "precomputed": f"precomputed ({self.ref_s:.1f}s)"}[start.reference_kind]
        print(f"dpo: train/val/test {len(train_set)}/{len(sets['val'])}/{len(sets['test'])} pairs "
              f"({train_set.n_reply_tokens:,} reply tokens in train, longest sequence {train_set.max_sequence()}); "
              f"method {cfg.method}{' (continuing the sft adapter)' if start.adapter_init else ''}: trains "
              f"{self.trainable:,} of {self.total:,} parameters ({100 * self.trainable / self.total:.2f}%); "
              f"reference: {where_ref}; beta {cfg.beta}, label_smoothing {cfg.label_smoothing}; "
              f"device {self.device}, {self.dtype}")

    def wrap_logger(self, logger: Any) -> Any:
        self.logger = StepMetricsLogger(logger, self.cfg.grad_accum)  # loss() hands it each batch's stats
        return self.logger

    def loss(self, net: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, int]:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        loss, stats = batch_loss(net, batch, self.reference, self.cfg.beta, self.cfg.label_smoothing)
        self.logger.add(stats)
        return loss, batch["x"].size(0) // 2, int((batch["y"] != -100).sum())

    def split_metrics(self, split: str) -> dict[str, float]:
        return evaluate_pairs(self.forward, self.eval_loaders[split], self.device, self.autocast, self.cfg.beta,
                              self.cfg.label_smoothing)

    def finish(self, fit: FitResult, test: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
        before = self.before
        self.final_files(fit, test, **{f"before_{k}": v for k, v in before.items()})
        print(f"test: loss {test['loss']:.4f}, reward accuracy {test['reward_accuracy']:.3f}, margin "
              f"{test['reward_margin']:.3f}; chosen preferred by log-prob {test['logp_accuracy']:.3f} "
              f"(before: {before['logp_accuracy']:.3f}) (best step {fit.best_step}); checkpoint: {self.best_dir}")
        return self.summary(fit, test, test_before=before, reference=self.starting.reference_kind,
                            trainable_params=self.trainable, total_params=self.total, reference_s=self.ref_s)


__all__ = ["DPOConfig", "finetune_dpo", "dpo_loss", "sequence_logps", "batch_loss", "Reference"]
