"""Differentially private training (DP-SGD) with Opacus: per-sample clipping, noise, accounting.

DP-SGD (Abadi et al., 2016) gives the optimizer ``(sum_i clip(g_i, C) + N(0, (sigma * C)^2 I)) /
expected_batch_size`` instead of the batch's mean gradient, over Poisson-sampled batches (each
example joins each batch with probability q = 1 / steps_per_epoch), which is what the accountant
(RDP or PRV) assumes when it turns (sigma, q, steps) into the (epsilon, delta) guarantee.

Opacus owns the job (:class:`opacus.PrivacyEngine`: per-sample gradients, the ``DPOptimizer``,
the Poisson ``DPDataLoader``). This module adds what a fromzero task needs around it: a typed
:class:`PrivacyConfig` (the ``privacy:`` recipe section), noise calibrated for an exact number of
steps, one-line errors for budgets that cannot be met and for models Opacus cannot train, and a
report for metrics.json. The guarantee covers every step of the run (picking the best epoch
included), not hyperparameter tuning; it needs the noise and the batch draws to be secret, hence
fresh OS entropy unless ``reproducible`` (user guide: docs/privacy.md).
"""

from __future__ import annotations

import contextlib
import math
import secrets
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from fromzero.errors import FromzeroError, first_line

ACCOUNTANTS = ("rdp", "prv")


@dataclass
class PrivacyConfig:
    """Differential privacy (DP-SGD through Opacus); on when target_epsilon or noise_multiplier is set."""

    target_epsilon: float | None = None
    """Privacy budget epsilon to reach at the end of training: the noise is calibrated for it (None or 0 = off)."""
    noise_multiplier: float | None = None
    """Or: the noise std as a multiple of max_grad_norm, given directly; the run reports the epsilon it spends."""
    delta: float = 1e-5
    """Probability that the epsilon guarantee fails; must be well below 1 / (training examples)."""
    max_grad_norm: float = 1.0
    """Per-example gradient clipping norm C: each example's gradient is scaled down to L2 norm <= C."""
    accountant: str = "rdp"
    """rdp (Renyi DP, robust and fast) | prv (privacy random variables, a tighter epsilon, slower)."""
    secure_mode: bool = False
    """Cryptographically secure noise and sampling (needs torchcsprng), as Opacus advises for a release."""
    reproducible: bool = False
    """Draw the noise and the batches from the run's seed (repeatable experiments; whoever knows the seed
    can undo the noise, voiding the guarantee); false = fresh OS entropy each run."""

    @property
    def enabled(self) -> bool:
        """Is DP-SGD on (a target epsilon or a noise multiplier given)?"""
        return bool(self.target_epsilon) or bool(self.noise_multiplier)

    def validate(self, prefix: str = "privacy.") -> None:
        """Raise FromzeroError for values that cannot work (checked even when privacy is off)."""
        def finite(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise FromzeroError(f"{prefix}{name} must be a finite number, got {value!r}")
            return float(value)

        for name in ("target_epsilon", "noise_multiplier"):
            if getattr(self, name) is not None and finite(name) < 0:
                raise FromzeroError(f"{prefix}{name} must be > 0 (0 or null = off), got {getattr(self, name)}")
        if self.target_epsilon and self.noise_multiplier:
            raise FromzeroError(f"give {prefix}target_epsilon or {prefix}noise_multiplier, not both "
                                "(the noise is calibrated for the target epsilon)")
        if not 0.0 < finite("delta") < 1.0:
            raise FromzeroError(f"{prefix}delta must be in (0, 1), got {self.delta}")
        if not finite("max_grad_norm") > 0:
            raise FromzeroError(f"{prefix}max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.accountant not in ACCOUNTANTS:
            raise FromzeroError(f"{prefix}accountant {self.accountant!r} is not supported "
                                f"(supported: {', '.join(ACCOUNTANTS)})")

    def check_dataset(self, n_train: int, prefix: str = "privacy.") -> None:
        """delta must be below 1/n: a mechanism that publishes one random example whole is
        (0, 1/n)-DP, so a delta of 1/n or more promises nothing. 1/(10 n) or less is customary."""
        if self.enabled and self.delta >= 1.0 / n_train:
            raise FromzeroError(f"{prefix}delta {self.delta:g} is not below 1/n for n = {n_train} training "
                                f"examples: it would allow leaking whole examples; use at most {0.1 / n_train:.1e}")


# ---------------------------------------------------------------------------------------------
# Opacus: import, quiet warnings, model compatibility


def _opacus() -> Any:
    try:
        import opacus
    except ImportError:
        raise FromzeroError("differential privacy needs the opacus package (pip install 'opacus>=1.5')") from None
    return opacus


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Opacus warns about things this module handles or reports itself (the secure-RNG reminder,
    RDP's "optimal order is the largest alpha" for very large noise, a dropped drop_last)."""
    import logging

    log = logging.getLogger("opacus.data_loader")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        log.setLevel(level)


def _short(error: BaseException) -> str:
    """The first sentence of one of Opacus' (long, multi-error) validation messages."""
    errors = getattr(error, "args", [None])[0]
    text = first_line(errors[0]) if isinstance(errors, list) and errors else first_line(error)
    return text.split(". ")[0].rstrip(".")


def make_compatible(model: nn.Module, fix: bool = True, note: Callable[[str], None] = print,
                    why_not: str = "") -> nn.Module:
    """``model`` itself if Opacus can train it privately; else, with ``fix``, a copy in which
    Opacus' ModuleValidator replaced what it can (BatchNorm -> GroupNorm, LSTM -> DPLSTM, ...)
    with a printed note. Raises FromzeroError when fixing is off (``why_not`` says why) or cannot help.

    Only *trained* modules matter: a frozen BatchNorm (eval mode, requires_grad False) is a fixed
    per-example affine map and is fine.
    """
    _opacus()
    from opacus.utils.module_utils import trainable_modules
    from opacus.validators import ModuleValidator

    modes = {m: m.training for m in model.modules()}
    model.train()  # the validator also insists on training mode; the caller's modes are restored
    try:
        errors = ModuleValidator.validate(model, strict=False)
        if not errors:
            return model
        kinds = sorted({type(m).__name__ for _, m in trainable_modules(model)
                        if type(m) in ModuleValidator.VALIDATORS and ModuleValidator.VALIDATORS[type(m)](m)})
        if not kinds:  # not a layer type problem (e.g. a module configuration Opacus refuses)
            raise FromzeroError(f"privacy: Opacus cannot train this model privately: {_short(errors[0])}")
        if not fix:
            raise FromzeroError(f"privacy: the model's trained {', '.join(kinds)} layers cannot be trained with "
                                f"DP-SGD ({_reason(kinds)}){'; ' + why_not if why_not else ''}")
        with _quiet():
            fixed = ModuleValidator.fix(model)
        remaining = ModuleValidator.validate(fixed, strict=False)
        if remaining:
            raise FromzeroError(f"privacy: Opacus cannot train this model privately: {_short(remaining[0])}")
        replaced = _replacements(model, fixed)
        note(f"note: privacy: replaced {replaced} ({_reason(kinds)}); the model is a copy with these layers")
        return fixed
    finally:
        for m, mode in modes.items():
            m.training = mode


def _reason(kinds: list[str]) -> str:
    if any(k.startswith("BatchNorm") or k == "SyncBatchNorm" for k in kinds):
        return "BatchNorm normalises each example with statistics of the whole batch, so one example's " \
               "gradient depends on the others"
    return "Opacus computes no per-example gradients for them"


def _replacements(before: nn.Module, after: nn.Module) -> str:
    """'20 BatchNorm2d -> GroupNorm' for the modules ModuleValidator.fix swapped."""
    old = dict(before.named_modules())
    counts: dict[str, int] = {}
    for name, module in after.named_modules():
        if name in old and type(old[name]) is not type(module):
            key = f"{type(old[name]).__name__} -> {type(module).__name__}"
            counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in counts.items()) or "unsupported layers"


# ---------------------------------------------------------------------------------------------
# Noise calibration and accounting


def epsilon_for(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                accountant: str = "rdp") -> float:
    """The epsilon (at ``delta``) that ``steps`` DP-SGD steps with this noise and sampling rate
    spend, by Opacus' accountant: what a run reports, recomputed from its numbers."""
    _opacus()
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)] if steps else []
    return _accountant_epsilon(acc, delta)


def _accountant_epsilon(acc: Any, delta: float) -> float:
    if not acc.history:
        return 0.0
    try:
        with _quiet():
            return float(acc.get_epsilon(delta=delta))
    except (ValueError, RuntimeError, OverflowError) as e:  # PRV's numerical domain limits
        raise FromzeroError(f"privacy: the {acc.mechanism()} accountant cannot compute epsilon here "
                            f"({first_line(e)}); try accountant rdp") from None


def calibrate_noise(cfg: PrivacyConfig, sample_rate: float, steps: int) -> float:
    """The smallest noise multiplier (to Opacus' 0.01-epsilon tolerance) with which ``steps``
    steps at ``sample_rate`` spend at most ``cfg.target_epsilon``; a budget that no noise can
    meet is a one-line error that says what to change."""
    _opacus()
    from opacus.accountants.utils import get_noise_multiplier

    assert cfg.target_epsilon
    try:
        with _quiet():
            return float(get_noise_multiplier(target_epsilon=cfg.target_epsilon, target_delta=cfg.delta,
                                              sample_rate=sample_rate, steps=steps, accountant=cfg.accountant))
    except (ValueError, RuntimeError, OverflowError) as e:
        raise FromzeroError(
            f"privacy: target_epsilon {cfg.target_epsilon:g} (delta {cfg.delta:g}) cannot be met in {steps} steps "
            f"at sample rate {sample_rate:.4g} (Opacus: {first_line(e).rstrip('.')}): "
            "raise target_epsilon, train fewer epochs or use a smaller batch_size") from None


@dataclass
class PrivateTraining:
    """The private versions of a training run's model, optimizer and data loader, plus the budget.

    module: the model wrapped for per-sample gradients (train through it; its ``_module`` is the
    model, whose state_dict has the ordinary names). optimizer: clips, noises and steps. loader:
    Poisson-sampled batches. engine: Opacus' PrivacyEngine (its accountant counts the steps).
    """

    config: PrivacyConfig
    engine: Any
    module: nn.Module
    optimizer: Any
    loader: Any
    noise_multiplier: float
    sample_rate: float
    steps_per_epoch: int
    planned_steps: int
    expected_batch_size: int

    @property
    def steps(self) -> int:
        """Noisy steps taken so far (what the accountant has counted)."""
        return int(sum(n for _, _, n in self.engine.accountant.history))

    def epsilon(self) -> float:
        """The epsilon spent so far, at ``config.delta``."""
        return _accountant_epsilon(self.engine.accountant, self.config.delta)

    def empty_step(self) -> None:
        """The step for a Poisson batch that drew no example: no data, but the noise is added and
        the step is counted, as the accountant assumes (skipping it would change the mechanism).
        The forward pass is skipped: not every model takes a batch of zero images."""
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.optimizer.params:
            p.grad_sample = p.new_zeros((0, *p.shape))
        self.optimizer.step()

    def report(self) -> dict[str, Any]:
        """What metrics.json / info.json record about the guarantee."""
        return {"epsilon": self.epsilon(), "delta": self.config.delta, "target_epsilon": self.config.target_epsilon,
                "noise_multiplier": self.noise_multiplier, "max_grad_norm": self.config.max_grad_norm,
                "sample_rate": self.sample_rate, "expected_batch_size": self.expected_batch_size,
                "steps": self.steps, "accountant": self.config.accountant, "secure_mode": self.config.secure_mode,
                "reproducible": self.config.reproducible, "poisson_sampling": True}

    def describe(self) -> str:
        """One line for the console: the mechanism and its budget."""
        cfg = self.config
        if cfg.target_epsilon:
            how = f"calibrated for epsilon {cfg.target_epsilon:g}"
        else:
            planned = epsilon_for(self.noise_multiplier, self.sample_rate, self.planned_steps, cfg.delta, cfg.accountant)
            how = f"epsilon {planned:.3g}"
        return (f"privacy: DP-SGD, noise multiplier {self.noise_multiplier:.4g} ({how} at delta {cfg.delta:g} "
                f"after {self.planned_steps} steps), per-example clip norm {cfg.max_grad_norm:g}, "
                f"Poisson sampling at rate {self.sample_rate:.4g} (expected batch {self.expected_batch_size}), "
                f"{cfg.accountant} accountant")

    def close(self) -> nn.Module:
        """Remove Opacus' hooks and per-sample gradient buffers; returns the plain model."""
        return self.module.to_standard_module()


def make_private(model: nn.Module, optimizer: torch.optim.Optimizer, loader: Any, cfg: PrivacyConfig,
                 epochs: int, seed: int | None = None) -> PrivateTraining:
    """Make ``model`` (already compatible: :func:`make_compatible`), ``optimizer`` (over its
    parameters) and ``loader`` (a map-style DataLoader; its batch size is the expected one) private
    for ``epochs`` epochs. The loss must be the *mean* over the batch (Opacus rescales by the
    expected batch size). ``seed``: the noise generator's with ``cfg.reproducible`` (the batches
    then follow ``loader``'s generator); otherwise both come from OS entropy (or Opacus' CSPRNG).
    """
    _opacus()
    from opacus import PrivacyEngine

    cfg.validate()
    if not cfg.enabled:
        raise FromzeroError("privacy is off: set privacy.target_epsilon or privacy.noise_multiplier")
    if cfg.secure_mode:
        try:
            import torchcsprng  # noqa: F401
        except ImportError:
            raise FromzeroError("privacy.secure_mode needs the torchcsprng package (not installed); "
                                "set secure_mode false for experiments") from None
    n_batches = len(loader)
    if n_batches < 1:
        raise FromzeroError("privacy: the training split has no batches")
    # Opacus samples with rate 1/len(loader) and its sampler takes int(1 / rate) batches an
    # epoch (one fewer than len(loader) for some lengths, by float rounding): count those.
    sample_rate = 1.0 / n_batches
    steps_per_epoch = int(1 / sample_rate)
    planned = steps_per_epoch * epochs
    sigma = float(cfg.noise_multiplier) if cfg.noise_multiplier else calibrate_noise(cfg, sample_rate, planned)
    first = next(iter(model.parameters()), None)
    repeat = cfg.reproducible and seed is not None
    generator = None
    if not cfg.secure_mode and first is not None:
        generator = torch.Generator(device=first.device).manual_seed(seed if repeat else secrets.randbits(63))
    # Opacus' full backward hooks make PyTorch warn on every step that no *input* needs a
    # gradient (images never do): expected, so that one message is silenced.
    warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
    with _quiet():
        engine = PrivacyEngine(accountant=cfg.accountant, secure_mode=cfg.secure_mode)
        try:
            module, dp_optimizer, dp_loader = engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma,
                max_grad_norm=cfg.max_grad_norm, poisson_sampling=True, noise_generator=generator)
        except Exception as e:  # noqa: BLE001 - Opacus' validation errors have no common type
            if type(e).__module__.startswith("opacus"):
                raise FromzeroError(f"privacy: Opacus cannot train this model privately: {_short(e)}") from None
            raise
    assert len(dp_loader) == steps_per_epoch, (len(dp_loader), steps_per_epoch)
    if not cfg.secure_mode and not repeat:  # Poisson draws from fresh entropy, not the loader's seed
        sampling = torch.Generator().manual_seed(secrets.randbits(63))
        dp_loader.batch_sampler.generator = sampling
        dp_loader.generator = sampling
    return PrivateTraining(cfg, engine, module, dp_optimizer, dp_loader, sigma, sample_rate, steps_per_epoch,
                           planned, int(dp_optimizer.expected_batch_size))
