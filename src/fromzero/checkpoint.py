"""Checkpoint directories: atomic save, safe load, exact resume.

A checkpoint directory (what ``--checkpoint`` takes) holds::

    config.json          architecture (GPTConfig) + model_type
    model.safetensors    weights, never pickle (tied lm_head stored once, as GPT-2 does)
    tokenizer.json       the tokenizer the model reads text with
    info.json            step and validation loss at save time
    trainer_state.pt     (checkpoints/last only) optimizer, scaler, step, RNG states;
                         tensors and plain containers, loaded with weights_only=True

Every directory is written to a temporary sibling, fsynced, then renamed into place, so a crash
or a full disk never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from fromzero.files import temp_dir_beside, temp_file_beside
from fromzero.errors import FromzeroError, first_line

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
INFO_FILE = "info.json"
TRAINER_STATE_FILE = "trainer_state.pt"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _disk_error(e: OSError, what: Path) -> FromzeroError:
    if e.errno == errno.ENOSPC:
        return FromzeroError(f"disk full while writing {what}; nothing was replaced")
    return FromzeroError(f"could not write {what}: {e.strerror or e}")


def _as_os_error(e: Exception, where: Path | None = None) -> OSError:
    """Turn a library's wrapped I/O failure back into an OSError (ENOSPC when the disk is full)."""
    text = str(e)
    full = "os error 28" in text or "No space left" in text
    if not full and where is not None:
        try:
            full = shutil.disk_usage(where).free < 1 << 20
        except OSError:
            pass
    return OSError(errno.ENOSPC if full else errno.EIO, "No space left on device" if full else text.splitlines()[0])


def write_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """Serialise ``state`` to safetensors at ``path``, surfacing every I/O error.

    The bytes are built in memory and written with plain file I/O + fsync, so a full disk is
    an OSError(ENOSPC) on our side: safetensors 0.8's ``save_file`` writes a temp file and
    renames it over the target (a test of it turned /dev/full into a regular file), which hides
    where the failure happened and skips fsync.
    """
    # channels-last weights (and their optimizer moments) are stored in the standard layout;
    # loading copies them back into whatever layout the model has (a no-op for contiguous ones)
    state = {name: tensor.contiguous() for name, tensor in state.items()}
    try:
        data = save(state, metadata={"format": "pt", **(metadata or {})})
    except SafetensorError as e:
        raise FromzeroError(f"cannot serialise weights for {path}: {e}") from None
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file + fsync + rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_beside(path, f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise _disk_error(e, path) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_tree(path: Path) -> None:
    for p in path.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def commit_directory(tmp_dir: Path, final_dir: Path) -> None:
    """Move the fully written ``tmp_dir`` to ``final_dir``, replacing it, never half-way.

    A directory cannot be replaced in one rename, so the old one is first renamed aside
    (``.old-<name>``), the new one renamed in, and the old one deleted. If the process dies
    between the two renames, :func:`recover_directory` restores the old one.
    """
    _fsync_tree(tmp_dir)
    old = final_dir.parent / f".old-{final_dir.name}"
    if old.exists():
        shutil.rmtree(old)
    if final_dir.exists():
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    _fsync_dir(final_dir.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_directory(final_dir: Path) -> None:
    """Undo an interrupted :func:`commit_directory` (the old copy is still complete)."""
    old = final_dir.parent / f".old-{final_dir.name}"
    if not final_dir.exists() and old.exists():
        os.replace(old, final_dir)


def model_state_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with each shared tensor stored once (tied ``lm_head.weight`` is dropped).

    Works on models wrapped by torch.compile (``_orig_mod.`` prefixes are removed).
    """
    state = {}
    seen: dict[int, str] = {}
    for name, tensor in model.state_dict().items():
        name = name.replace("_orig_mod.", "")
        key = tensor.untyped_storage().data_ptr() if tensor.numel() else id(tensor)
        if key in seen and tensor.numel():
            continue  # a tied weight: the first name is enough to restore it
        seen[key] = name
        state[name] = tensor.detach().to("cpu").contiguous()
    return state


def save_checkpoint(directory: Path, model: torch.nn.Module, model_config: dict,
                    tokenizer_file: Path | None = None, info: dict | None = None,
                    trainer_state: dict | None = None, state: dict[str, torch.Tensor] | None = None) -> None:
    """Write a complete checkpoint directory atomically (see module docstring).

    state: the weights to write instead of ``model``'s own (e.g. gathered from FSDP shards).
    """
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        write_safetensors(state if state is not None else model_state_for_saving(model), tmp / MODEL_FILE)
        write_checkpoint_files(tmp, model_config, tokenizer_file, info)
        if trainer_state is not None:
            try:
                torch.save(trainer_state, tmp / TRAINER_STATE_FILE)
            except RuntimeError as e:  # torch's zip writer reports I/O failures as RuntimeError
                raise _as_os_error(e, tmp) from None


def write_checkpoint_files(tmp: Path, model_config: dict, tokenizer_file: Path | None, info: dict | None) -> None:
    """config.json, tokenizer.json and info.json of a checkpoint being written in ``tmp``."""
    (tmp / CONFIG_FILE).write_text(json.dumps(model_config, indent=2) + "\n")
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
    if info is not None:
        write_info(tmp / INFO_FILE, info)


# ---------------------------------------------------------------------------------------------
# info.json: what a checkpoint is for, typed and versioned. Every writer goes through write_info
# and every reader through checkpoint_info, so a hand-edited or foreign info.json is a one-line
# error naming the field, not a KeyError deep inside predict. Extra task fields are kept as they are.

INFO_FORMAT = 1
"""Version of the info.json layout this fromzero writes (and the newest it reads)."""


@dataclass(frozen=True)
class InfoField:
    types: tuple[type, ...]
    doc: str


INFO_SCHEMA: dict[str, InfoField] = {
    "format": InfoField((int,), "info.json layout version (absent: written before versioning, read as 1)"),
    "task": InfoField((str,), "what the model was trained to do (see fromzero.tasks)"),
    "step": InfoField((int,), "optimizer steps taken when saved (pretraining)"),
    "best_step": InfoField((int,), "step of the weights kept (fine-tuning)"),
    "best_epoch": InfoField((int,), "epoch of the weights kept"),
    "val_loss": InfoField((int, float, type(None)), "validation loss at save time (pretraining)"),
    "method": InfoField((str,), "full | frozen | lora | qlora"),
    "max_length": InfoField((int,), "text classifiers: tokens per text the model was tuned with"),
    "image_size": InfoField((int,), "image classifiers: side of the square input"),
    "resize_size": InfoField((int, type(None)), "image classifiers: short side resized to before cropping"),
    "channels": InfoField((int,), "image classifiers: 1 (grayscale) or 3 (RGB)"),
    "mean": InfoField((list, type(None)), "image classifiers: per-channel normalisation mean (null: none)"),
    "std": InfoField((list, type(None)), "image classifiers: per-channel normalisation std"),
    "template": InfoField((dict,), "chat models tuned by fromzero: the plain-text chat template"),
    "chat_template": InfoField((str,), "chat models: the Jinja template file next to the weights"),
    "base_checkpoint": InfoField((str,), "LoRA adapters: the base checkpoint directory"),
    "fromzero_version": InfoField((str,), "the fromzero that wrote the checkpoint"),
}


def write_info(path: Path, info: dict[str, Any]) -> None:
    """Write info.json (checked against INFO_SCHEMA, stamped with INFO_FORMAT)."""
    from fromzero import __version__

    info = {"format": INFO_FORMAT, **info}
    info.setdefault("fromzero_version", __version__)
    check_info(info, path)
    path.write_text(json.dumps(info, indent=2) + "\n")


def check_info(info: Any, where: Path) -> dict[str, Any]:
    """``info`` if it is a valid info.json mapping, else a one-line FromzeroError naming the field."""
    if not isinstance(info, dict):
        raise FromzeroError(f"{where} must hold a JSON object, got {type(info).__name__}")
    version = info.get("format", 1)
    if isinstance(version, int) and not isinstance(version, bool) and version > INFO_FORMAT:
        raise FromzeroError(f"{where} has info format {version}; this fromzero reads up to {INFO_FORMAT}: "
                            "upgrade fromzero to read this checkpoint")
    for name, field in INFO_SCHEMA.items():
        if name in info:
            value = info[name]
            if isinstance(value, bool) and bool not in field.types or not isinstance(value, field.types):
                kinds = " or ".join("null" if t is type(None) else t.__name__ for t in field.types)
                raise FromzeroError(f"{where}: {name} must be {kinds}, got {value!r} ({field.doc})")
    return info


@contextlib.contextmanager
def atomic_directory(directory: Path) -> Iterator[Path]:
    """Write a directory's files into the yielded temp dir; on success it replaces ``directory``
    (fsync + rename), on any failure it is removed and ``directory`` is left as it was. A full
    disk or another OS error becomes a one-line FromzeroError."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(directory, f".tmp-{directory.name}-")
    try:
        yield tmp
        commit_directory(tmp, directory)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _disk_error(e, directory) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FromzeroError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FromzeroError(f"{what} {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise FromzeroError(f"{what} {path} must hold a JSON object")
    return data


def load_weights(model: torch.nn.Module, path: Path, partial: bool = False) -> tuple[list[str], list[str]]:
    """Load safetensors weights into ``model``; shape/key mismatches are one-line errors.

    Tensors are read one at a time and copied into the model's own, so loading needs memory for
    the model plus one tensor, not two whole copies of the weights.

    partial: for initialising a model for a new task from another checkpoint (a new head):
    tensors of the file that the model lacks or that differ in shape are skipped, and the
    model's tensors the file lacks keep their fresh initialisation. Returns (missing, skipped)
    names so the caller can check they are only the head's.
    """
    if not path.is_file():
        raise FromzeroError(f"weights not found: {path}")
    own = model.state_dict()
    loaded, skipped = set(), []
    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
            for name in names:  # check everything before changing anything
                shape = tuple(f.get_slice(name).get_shape())
                if name in own and tuple(own[name].shape) == shape:
                    continue
                if partial:
                    skipped.append(name)
                elif name not in own:
                    raise FromzeroError(f"{path}: unexpected tensor '{name}' for this model")
                else:
                    raise FromzeroError(f"{path}: tensor '{name}' has shape {shape}, the model expects "
                                        f"{tuple(own[name].shape)}")
            with torch.no_grad():
                for name in names:
                    if name not in skipped:
                        own[name].copy_(f.get_tensor(name))
                        loaded.add(name)
    except (SafetensorError, OSError, ValueError) as e:
        raise FromzeroError(f"cannot read weights {path}: {first_line(e)}") from None
    # Tied weights are stored once; the others must all be present.
    unique = dict(model.named_parameters()).keys()
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - unique
    really_missing = [m for m in own if m not in loaded and m not in tied]
    if really_missing and not partial:
        raise FromzeroError(f"{path}: missing tensors {really_missing[:5]}")
    return really_missing, skipped


def load_trainer_state(directory: Path) -> dict[str, Any]:
    path = Path(directory) / TRAINER_STATE_FILE
    if not path.is_file():
        raise FromzeroError(f"no trainer state in {directory}: cannot resume from it")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign file
        raise FromzeroError(f"cannot read trainer state {path}: {first_line(e)}") from None


def checkpoint_info(directory: Path) -> dict[str, Any]:
    """info.json of a checkpoint ({} for one without), with the task inferred when missing."""
    directory = Path(directory)
    recover_directory(directory)
    if not directory.is_dir():
        raise FromzeroError(f"checkpoint directory not found: {directory}")
    config = read_json(directory / CONFIG_FILE, "model config")
    info = read_json(directory / INFO_FILE, "checkpoint info") if (directory / INFO_FILE).is_file() else {}
    check_info(info, directory / INFO_FILE)
    if "task" not in info:
        info["task"] = "language-model" if config.get("model_type") == "fromzero-gpt" else "unknown"
    return info


# ---------------------------------------------------------------------------------------------
# Loading: a registry of checkpoint kinds (plain, LoRA adapter, quantized, FSDP shards). This
# module recognises each kind but names its loader by import path ("module:function", imported on
# first use): the loaders live in higher layers, and importing them here would be a cycle.


@dataclass(frozen=True)
class CheckpointKind:
    """One way a checkpoint directory can be laid out, and where its loader lives."""

    name: str
    detect: Callable[[Path], bool]
    """True when ``directory`` is of this kind (checked in registration order, first match wins)."""
    loader: str
    """``"package.module:function"``; the function takes (directory, device) and returns the model in eval mode."""


_KINDS: list[CheckpointKind] = []


def register_checkpoint_kind(kind: CheckpointKind, first: bool = False) -> None:
    """Add a kind (``first``: before the built-in ones, e.g. to override how one is loaded)."""
    _KINDS.insert(0, kind) if first else _KINDS.append(kind)


def _config_of(directory: Path) -> dict:
    """config.json for recognising a kind; {} when unreadable (the loader then says what is wrong)."""
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


register_checkpoint_kind(CheckpointKind(
    "lora-adapter", lambda d: not (d / MODEL_FILE).exists() and (d / "adapter_config.json").is_file(),
    "fromzero.finetune.lora:load_adapter_checkpoint"))
register_checkpoint_kind(CheckpointKind(
    "quantized", lambda d: bool(_config_of(d).get("quantization")),  # written by `fromzero quantize`
    "fromzero.compression.quantize:load_quantized_checkpoint"))
register_checkpoint_kind(CheckpointKind(
    "sharded", lambda d: not (d / MODEL_FILE).exists() and (d / "sharded").is_dir(),  # FSDP + dist.checkpoint
    "fromzero.training.distributed:load_sharded_checkpoint"))
register_checkpoint_kind(CheckpointKind("plain", lambda d: True, "fromzero.models:load_plain_checkpoint"))


def checkpoint_kind(directory: str | Path) -> CheckpointKind:
    """The registered kind of a checkpoint directory."""
    directory = Path(directory)
    for kind in _KINDS:
        if kind.detect(directory):
            return kind
    raise FromzeroError(f"{directory} is not a checkpoint of any known kind")  # pragma: no cover - plain matches all


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild the model saved in a checkpoint directory, whatever its kind, in eval mode on ``device``."""
    import importlib

    directory = Path(directory)
    recover_directory(directory)
    if not directory.is_dir():
        raise FromzeroError(f"checkpoint directory not found: {directory}")
    kind = checkpoint_kind(directory)
    module, _, function = kind.loader.partition(":")
    return getattr(importlib.import_module(module), function)(directory, device)
