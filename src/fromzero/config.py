"""Typed configs: dataclasses, YAML recipes and dotted command-line overrides.

A recipe is a YAML file whose top-level sections mirror :class:`PretrainConfig`
(``model``, ``train``, ``data``, ``out_dir``). Any field can be overridden on the command
line with a dotted key: ``--train.lr 3e-4 --model.n_layer 6``. Unknown keys are refused with
the closest valid name; values are checked against the field's type. The attribute
docstrings of the dataclasses are the documentation: ``fromzero pretrain --help`` prints them.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import math
import sys
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import yaml

from fromzero.errors import FromzeroError, first_line
from fromzero.options import RECIPE_ORDER, by_section
from fromzero.models.gpt import GPTConfig
from fromzero.training.distributed import DistConfig


@dataclass
class TrainSettings:
    """What every training run sets, pretraining or fine-tuning (one loop, one set of names:
    :class:`fromzero.training.trainer.Trainer`). Task configs extend it and may change defaults."""

    batch_size: int = 16
    """Examples (sequences) per micro-batch, per process."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = run every epoch)."""
    lr: float = 5e-5
    """Peak learning rate (reached after warmup)."""
    optimizer: str = "adamw"
    """adamw | sgd (with momentum)."""
    weight_decay: float = 0.01
    """L2 regularisation: decoupled weight decay on matrices only (>= 2-D weights, not biases / norms)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.999
    """AdamW beta2."""
    momentum: float = 0.9
    """SGD momentum (optimizer: sgd)."""
    nesterov: bool = True
    """SGD with Nesterov momentum (optimizer: sgd)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    eval_every: int = 0
    """Evaluate (and checkpoint) every N optimizer steps (0 = after every epoch), and at the end."""
    log_interval: int = 10
    """Write a metrics row every N optimizer steps."""
    device: str = "auto"
    """auto (cuda > mps > cpu) | cpu | cuda | cuda:N | mps (under torchrun: each rank its own cuda:LOCAL_RANK)."""
    dtype: str = "auto"
    """auto (bf16 where the hardware has fast bf16 matmuls, else float32) | float32 | bfloat16 | float16
    (autocast; weights stay float32; float16 needs CUDA and uses a GradScaler)."""
    compile: bool = False
    """torch.compile the model (the first step is slow while it compiles)."""
    seed: int = 0
    """Seed for initialisation, batch order and dropout."""

    def validate_settings(self, prefix: str = "") -> None:
        """Raise FromzeroError for shared settings that cannot work (keys named with ``prefix``)."""
        for name in ("batch_size", "grad_accum", "log_interval"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise FromzeroError(f"{prefix}{name} must be a positive integer, got {v!r}")
        for name in ("max_steps", "eval_every", "weight_decay", "grad_clip", "momentum"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                raise FromzeroError(f"{prefix}{name} must be >= 0, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise FromzeroError(f"{prefix}lr must be positive, got {self.lr}")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise FromzeroError(f"{prefix}beta1 and beta2 must be in [0, 1), got {self.beta1} and {self.beta2}")
        for name, allowed in (("optimizer", ("adamw", "sgd")), ("dtype", ("auto", "float32", "bfloat16", "float16"))):
            if getattr(self, name) not in allowed:
                raise FromzeroError(f"{prefix}{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")


@dataclass
class TrainConfig(TrainSettings):
    """Pretraining's optimisation, evaluation and runtime settings (the ``train`` section)."""

    epochs: ClassVar[int] = 1  # pretraining draws random windows: one endless "epoch" of max_steps steps
    patience: ClassVar[int] = 0
    l1: ClassVar[float] = 0.0

    batch_size: int = 12
    max_steps: int = 2000
    """Number of optimizer steps."""
    lr: float = 1e-3
    min_lr: float = 1e-4
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 100
    """Steps of linear warmup from 0 to lr."""
    decay_steps: int = 0
    """Step at which the cosine decay reaches min_lr (0: max_steps)."""
    decay_lr: bool = True
    """Use warmup + cosine decay; false keeps lr constant."""
    weight_decay: float = 0.1
    beta2: float = 0.99
    nesterov: bool = False
    eval_every: int = 250
    """Evaluate (and checkpoint) every this many steps, and at the last step."""
    eval_batches: int = 20
    """Validation batches per evaluation (the same batches every time)."""
    dtype: str = "float32"
    activation_checkpointing: bool = False
    """Recompute each transformer block in backward instead of keeping its activations (less memory, ~1/3 more compute)."""
    compile_mode: str = "default"
    """torch.compile mode: default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
    (max-autotune also tunes CPU matmul kernels; compiling takes longer)."""
    seed: int = 1337

    def lr_schedule(self, total: int) -> Callable[[int], float]:
        """lr multiplier per step: warmup over warmup_steps, cosine to min_lr at decay_steps."""
        from fromzero.training.optim import warmup_cosine

        if not self.decay_lr:
            return lambda step: 1.0
        return warmup_cosine(self.warmup_steps, self.decay_steps or self.max_steps, self.min_lr / self.lr)


@dataclass
class DataConfig:
    """Where the prepared token files live (``fromzero data prepare`` writes them)."""

    dir: str = "data/shakespeare-char"
    """Directory with train.bin, val.bin, meta.json and tokenizer.json."""


@dataclass
class PretrainConfig:
    """Everything a pretraining run needs; saved as the run directory's config.yaml."""

    model: GPTConfig = field(default_factory=GPTConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    out_dir: str = ""
    """Run directory (default: runs/<recipe>-<timestamp>)."""
    name: str = "run"
    """Run name used in the default out_dir (defaults to the recipe's file name)."""

    # What the task frame (fromzero.training.trainer.run_task) asks of every task's config.
    @property
    def dist_strategy(self) -> str:
        return self.dist.strategy

    @property
    def device(self) -> str:
        return self.train.device

    def validate(self) -> None:
        validate_pretrain(self)


def validate_pretrain(cfg: PretrainConfig) -> None:
    """Check values that types alone cannot; raise FromzeroError with the offending key."""
    t = cfg.train
    try:  # vocab_size 0: taken from the data later
        (cfg.model if cfg.model.vocab_size else dataclasses.replace(cfg.model, vocab_size=1)).validate()
    except ValueError as e:
        raise FromzeroError(str(e)) from None
    cfg.dist.validate()
    t.validate_settings("train.")
    for name in ("max_steps", "eval_every", "eval_batches"):
        if getattr(t, name) <= 0:
            raise FromzeroError(f"train.{name} must be positive, got {getattr(t, name)}")
    if not (math.isfinite(t.min_lr) and 0 <= t.min_lr <= t.lr):
        raise FromzeroError(f"need 0 <= train.min_lr <= train.lr (lr={t.lr}, min_lr={t.min_lr})")
    if t.warmup_steps < 0 or t.decay_steps < 0:
        raise FromzeroError("train.warmup_steps and decay_steps must be >= 0")
    modes = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
    if t.compile_mode not in modes:
        raise FromzeroError(f"train.compile_mode must be one of {', '.join(modes)}, got {t.compile_mode!r}")


# ---------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with clear errors


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` as type ``tp`` or raise FromzeroError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except FromzeroError as e:
                errors.append(str(e))
        raise FromzeroError(errors[0] if errors else f"{key}: bad value {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # YAML 1.1 reads "3e-4" as a string; Python reads it as a float.
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return from_dict(tp, value, prefix=key + ".")
    else:
        return value
    name = getattr(tp, "__name__", str(tp))
    raise FromzeroError(f"{key} must be {'a mapping' if dataclasses.is_dataclass(tp) else name}, got {value!r}")


# Recipe keys renamed so pretraining and fine-tuning say the same thing the same way (nanoGPT's
# names before): an old key still works, with one line naming its new name.
RENAMED_KEYS = {"max_iters": "max_steps", "eval_interval": "eval_every", "grad_accum_steps": "grad_accum",
                "warmup_iters": "warmup_steps", "lr_decay_iters": "decay_steps", "eval_iters": "eval_batches"}
_RENAME_NOTES: set[str] = set()


def _renamed(key: str, names: list[str], prefix: str = "") -> str:
    """``key``'s current name when it is an old name of one of ``names`` (noting it once on stderr)."""
    new = RENAMED_KEYS.get(key)
    if new is None or new not in names:
        return key
    if prefix + key not in _RENAME_NOTES:
        _RENAME_NOTES.add(prefix + key)
        print(f"note: {prefix}{key} is now called {prefix}{new}; please rename it", file=sys.stderr)
    return new


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types are errors."""
    if not isinstance(data, dict):
        raise FromzeroError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        renamed = _renamed(str(key), names, prefix)
        if renamed != key and renamed in data:
            continue  # an old name next to its new one (an old recipe + a new override): the new one wins
        key = renamed
        if key not in names:
            raise FromzeroError(_unknown_key_message(prefix + str(key), [prefix + n for n in names]))
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of ``cls`` (leaves only)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys += all_keys(tp, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def _unknown_key_message(key: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown config key '{key}'{hint}"


# ---------------------------------------------------------------------------------------------
# One recipe shape: sections


def recipe_keys(cls: type) -> dict[str, str]:
    """Each field of a flat config class (a fine-tuning task's) -> its key in a recipe:
    ``train.lr``, ``method.name``, ``data.source``, ``out_dir``. Classes declare the keys of
    their fields in a ``RECIPE_KEYS`` class attribute (read along the MRO); a field no class
    declares is a ``train.`` setting; a nested dataclass field (``privacy``) is its own section.
    Pretraining's config is nested dataclasses already: its sections are its fields."""
    declared: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        declared.update(base.__dict__.get("RECIPE_KEYS", {}))
    hints = typing.get_type_hints(cls)
    return {f.name: f.name if dataclasses.is_dataclass(hints[f.name]) else declared.get(f.name, f"train.{f.name}")
            for f in dataclasses.fields(cls)}


def flatten_recipe(cls: type, data: dict, source: str = "the recipe", notes: bool = True) -> dict:
    """A sectioned recipe (``train: {lr: ...}``) as the flat field names of ``cls``. A flat key
    of the old shape still works, with one line naming its new place (``notes``; not for the
    config.yaml of a run written before, which is read as it is); an unknown key is refused
    with the closest valid one."""
    keys = recipe_keys(cls)
    flat_of = {dotted: name for name, dotted in keys.items()}
    sections = {dotted.partition(".")[0] for dotted in keys.values() if "." in dotted}
    out: dict = {}
    moved: list[str] = []
    for key, value in data.items():
        if key in sections and isinstance(value, dict) and keys.get(key) != key:
            for leaf, v in value.items():
                dotted = f"{key}.{leaf}"
                name = flat_of.get(dotted)
                if name is None:  # an old leaf name (max_iters) gets one line naming the new one
                    name = flat_of.get(f"{key}.{RENAMED_KEYS.get(leaf, leaf)}")
                    if name is None:
                        raise FromzeroError(f"{source}: {_unknown_key_message(dotted, list(flat_of))}")
                    print(f"note: '{dotted}' is now '{keys[name]}' ({source})", file=sys.stderr)
                out[name] = v
        elif key in keys or (key in RENAMED_KEYS and RENAMED_KEYS[key] in keys):
            name = key if key in keys else RENAMED_KEYS[key]
            if keys[name] != key:
                moved.append(f"{key} -> {keys[name]}")
            out[name] = value
        else:
            raise FromzeroError(f"{source}: {_unknown_key_message(key, list(flat_of))}")
    if moved and notes:  # one line, naming every new place
        print(f"note: {source} uses keys of the previous flat recipe shape; they still work, their places now: "
              f"{', '.join(moved)}", file=sys.stderr)
    return out


def section_recipe(cls: type, flat: dict) -> dict:
    """The flat values of a ``cls`` config as a sectioned recipe (what config.yaml holds)."""
    keys = recipe_keys(cls)
    out: dict = {}
    for name, value in flat.items():
        section, _, leaf = keys.get(name, name).rpartition(".")
        if section:
            out.setdefault(section, {})[leaf] = value
        else:
            out[leaf] = value
    order = {name: i for i, name in enumerate(RECIPE_ORDER)}
    return dict(sorted(out.items(), key=lambda kv: order.get(kv[0], len(order))))


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------------------------------------
# Recipes and overrides


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; missing file or bad YAML is a one-line FromzeroError."""
    p = Path(path)
    if not p.is_file():
        raise FromzeroError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or first_line(e)
        raise FromzeroError(f"invalid YAML in {p}{where}: {problem}") from None
    except UnicodeDecodeError:
        raise FromzeroError(f"config file {p} is not UTF-8 text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FromzeroError(f"{p} must hold a YAML mapping at the top level")
    return data


def parse_overrides(tokens: list[str], cls: type, command: str = "pretrain") -> dict:
    """Turn ``["--train.lr", "3e-4", "--model.bias=false"]`` into a nested dict.

    Values are parsed as YAML scalars (so ``true``, ``12``, ``null`` work) and type-checked
    later by :func:`from_dict`.
    """
    valid = all_keys(cls)
    out: dict = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or len(tok) == 2:
            raise FromzeroError(f"unexpected argument '{tok}' (overrides look like --{'train.' if command == 'pretrain' else ''}lr 3e-4)")
        key = tok[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(tokens):
                raise FromzeroError(f"option --{key} needs a value")
            raw = tokens[i + 1]
            i += 2
        key = key.replace("-", "_")
        section, _, leaf = key.rpartition(".")
        renamed = _renamed(leaf, [k.rpartition(".")[2] for k in valid if k.rpartition(".")[0] == section],
                           section + "." if section else "")
        key = f"{section}.{renamed}" if section else renamed
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
            hint = f"; did you mean '--{close[0]}'?" if close else ""
            raise FromzeroError(f"unknown option '--{key}'{hint} (fromzero {command} --help lists them)")
        if _is_text_field(cls, key):
            value = None if raw in ("null", "~") and _is_text_field(cls, key, optional=True) else raw
        else:
            try:
                value = yaml.safe_load(raw) if raw != "" else ""
            except yaml.YAMLError:
                value = raw
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _is_text_field(cls: type, key: str, optional: bool = False) -> bool:
    """Is dotted ``key`` of ``cls`` a str (or str | None) field? Its command-line value is then
    taken as typed: YAML would turn "USER:\n" into a mapping and "\n\n" into null."""
    tp: Any = cls
    for part in key.split("."):
        tp = typing.get_type_hints(tp)[part]
    args = set(typing.get_args(tp)) if typing.get_origin(tp) in (typing.Union, types.UnionType) else {tp}
    return args == {str, type(None)} if optional else args <= {str, type(None)} and str in args


def deep_merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = deep_merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def pretraining_recipe(data: dict, source: Any) -> dict:
    """A pretraining recipe without its optional ``task: pretrain`` line (every recipe has the
    same shape: task, model, data, train, dist); a fine-tuning recipe is sent to its command."""
    task = data.pop("task", "pretrain")
    if task != "pretrain":
        raise FromzeroError(f"{source} is a fine-tuning recipe (task: {task}): run it with fromzero finetune")
    return data


def load_pretrain_config(
    recipe: str | Path | None, overrides: list[str] | dict | None = None
) -> PretrainConfig:
    """Recipe YAML (optional) + overrides -> validated PretrainConfig."""
    data = pretraining_recipe(load_yaml(recipe), recipe) if recipe is not None else {}
    if recipe is not None and "name" not in data:
        data["name"] = Path(recipe).stem
    if not isinstance(overrides, dict):
        overrides = parse_overrides(list(overrides or []), PretrainConfig)
    cfg = from_dict(PretrainConfig, deep_merge(data, overrides))
    validate_pretrain(cfg)
    return cfg


def save_yaml(data: dict, path: str | Path) -> None:
    from fromzero.checkpoint import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(data, sort_keys=False))


# ---------------------------------------------------------------------------------------------
# Help text from attribute docstrings


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Map field name -> the docstring written under it in the class body (or a base class's)."""
    docs: dict[str, str] = {}
    for base in reversed(cls.__mro__[1:]):
        if dataclasses.is_dataclass(base):
            docs.update(field_docs(base))
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return docs
    body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def options_help(cls: type, defaults: Any | None = None, prefix: str = "") -> list[str]:
    """Lines ``--section.key  (default: X)  doc`` for every leaf field of ``cls``."""
    defaults = defaults if defaults is not None else cls()
    lines = []
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    unused = getattr(cls, "UNUSED_KEYS", frozenset())  # inherited keys this config refuses
    keys = recipe_keys(cls) if hasattr(cls, "RECIPE_KEYS") else {}
    for f in dataclasses.fields(cls):
        if f.name in unused:
            continue
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            lines += options_help(hints[f.name], value, prefix + f.name + ".")
        else:
            shown = "''" if value == "" else value
            lines.append(f"  --{prefix}{keys.get(f.name, f.name)} (default: {shown})  {docs.get(f.name, '')}".rstrip())
    return by_section(lines) if keys else lines
