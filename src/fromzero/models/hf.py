"""Hugging Face <-> fromzero: read and write HF model directories, dispatch per family.

``fromzero convert from-hf SRC OUT`` reads a HF model directory (config.json + safetensors or
PyTorch .bin weights, possibly sharded) or a hub id, converts config and weights with the
family's converter and writes a fromzero checkpoint directory (config.json, model.safetensors,
tokenizer files). ``to-hf`` does the reverse, producing a directory ``transformers`` loads.

A family converter is a module with:

    HF_MODEL_TYPES: tuple[str, ...]        # HF config "model_type" values it reads
    FROMZERO_MODEL_TYPE: str               # the fromzero config "model_type" it writes
    def from_hf(hf_config: dict, hf_state: dict[str, Tensor]) -> tuple[dict, dict[str, Tensor]]
        # -> (fromzero config.json dict, fromzero state dict); raise FromzeroError naming
        #    missing / unexpected keys or impossible shapes
    def to_hf(config: dict, state: dict[str, Tensor]) -> tuple[dict, dict[str, Tensor]]
        # -> (HF config.json dict incl. model_type + architectures, HF state dict)

Weights are read with safetensors, or ``torch.load(weights_only=True)`` for .bin files; no
remote code is ever executed.
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path
from types import ModuleType

import torch

from fromzero.files import temp_dir_beside
from fromzero.errors import FromzeroError, first_line

# family converter modules; each lists the HF model types it reads (see module docstring)
CONVERTER_MODULES: tuple[str, ...] = (
    "fromzero.models.convert_gpt",
    "fromzero.models.convert_bert",
    "fromzero.models.convert_vit",
    "fromzero.models.convert_seq2seq",
)

# Files that make a tokenizer usable by `tokenizers` / `transformers`; carried across.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "preprocessor_config.json",
    "sentence_bert_config.json",  # sentence-transformers' max_seq_length (MiniLM: 256)
    "chat_template.jinja",  # a chat model's own template (transformers 5 saves it here)
    "source.spm",  # Marian (opus-mt): SentencePiece models + its own piece -> id tables
    "target.spm",
    "target_vocab.json",
)


def _converters() -> list[ModuleType]:
    modules = []
    for name in CONVERTER_MODULES:
        try:
            modules.append(importlib.import_module(name))
        except ModuleNotFoundError as e:  # a family not written yet
            if e.name != name:
                raise
    return modules


def supported_hf_types() -> list[str]:
    return sorted(t for m in _converters() for t in m.HF_MODEL_TYPES)


def converter_for_hf(model_type: str) -> ModuleType:
    for module in _converters():
        if model_type in module.HF_MODEL_TYPES:
            return module
    raise FromzeroError(
        f"unsupported Hugging Face model_type {model_type!r} (supported: {', '.join(supported_hf_types())})"
    )


def converter_for_fromzero(model_type: str) -> ModuleType:
    for module in _converters():
        if module.FROMZERO_MODEL_TYPE == model_type:
            return module
    supported = sorted(m.FROMZERO_MODEL_TYPE for m in _converters())
    raise FromzeroError(
        f"cannot export model_type {model_type!r} to Hugging Face (supported: {', '.join(supported)})"
    )


# ---------------------------------------------------------------------------------------------
# Reading HF directories


def resolve_source(src: str) -> Path:
    """A local HF model directory, or a hub id downloaded (or found in the HF cache)."""
    path = Path(src)
    if path.exists():
        if not path.is_dir():
            raise FromzeroError(f"{src} is a file; give a model directory (config.json + weights)")
        if not (path / "config.json").is_file():
            raise FromzeroError(f"{src} has no config.json: not a Hugging Face model directory")
        return path
    if src.count("/") > 1 or src.startswith((".", "~", "/")) or not src.strip():
        raise FromzeroError(f"model directory not found: {src}")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise FromzeroError("huggingface_hub is needed to download hub models") from None
    patterns = ["config.json", "*.safetensors", "*.safetensors.index.json", "*.bin",
                "*.bin.index.json", *TOKENIZER_FILES]
    try:
        local = snapshot_download(src, allow_patterns=patterns)
    except LocalEntryNotFoundError:
        raise FromzeroError(
            f"cannot download {src!r} from the Hugging Face hub (offline, or HF_HUB_OFFLINE=1 is "
            "set and it is not in the local cache); download it elsewhere and pass the local "
            "model directory instead"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        first = first_line(e)
        raise FromzeroError(
            f"cannot download {src!r} from the Hugging Face hub ({first}); with no network set "
            "HF_HUB_OFFLINE=1 and pass a local model directory instead"
        ) from None
    return Path(local)


def read_hf_config(directory: Path) -> dict:
    path = directory / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FromzeroError(f"{directory} has no config.json: not a Hugging Face model directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FromzeroError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise FromzeroError(f"{path} has no model_type")
    return config


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        first = first_line(e)
        raise FromzeroError(f"cannot read weights {path}: {first}") from None


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt or unsafe pickle
        first = first_line(e)
        raise FromzeroError(f"cannot read weights {path} (loaded with weights_only=True): {first}") from None
    if not isinstance(state, dict):
        raise FromzeroError(f"{path} does not hold a state dict (names -> tensors)")
    return state


def read_hf_state(directory: Path) -> dict[str, torch.Tensor]:
    """All weights of a HF model directory: safetensors preferred, sharded or not."""
    for index_name, loader in (("model.safetensors.index.json", _load_safetensors),
                               ("pytorch_model.bin.index.json", _load_bin)):
        index = directory / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError) as e:
                raise FromzeroError(f"{index} is not a valid weight index: {e}") from None
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                if not (directory / shard).is_file():
                    raise FromzeroError(f"{index} names a missing shard: {shard}")
                state.update(loader(directory / shard))
            return state
    if (directory / "model.safetensors").is_file():
        return _load_safetensors(directory / "model.safetensors")
    if (directory / "pytorch_model.bin").is_file():
        return _load_bin(directory / "pytorch_model.bin")
    raise FromzeroError(f"{directory} has no weights (model.safetensors or pytorch_model.bin)")


def check_keys(expected: set[str], got: set[str], where: str) -> None:
    """Raise a FromzeroError naming missing and unexpected tensors (the first few of each)."""
    mismatch = describe_mismatch(sorted(expected - got), sorted(got - expected))
    if mismatch:
        raise FromzeroError(f"{where}: weights do not match the config ({mismatch})")


def describe_mismatch(missing: list[str], extra: list[str]) -> str:
    """``missing N: a, b ...; unexpected M: c`` with the first four names of each ('' if none)."""
    parts = []
    for label, names in (("missing", missing), ("unexpected", extra)):
        if names:
            parts.append(f"{label} {len(names)}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}")
    return "; ".join(parts)


def check_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...], where: str) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise FromzeroError(
            f"{where}: tensor {name} has shape {tuple(tensor.shape)}, the config implies {tuple(shape)}"
        )


def check_fits(config: dict, state: dict[str, torch.Tensor], where: str) -> None:
    """Prove that converted weights load into the model ``config`` builds, before anything is written
    (the model is built on the meta device: no memory, no init)."""
    from fromzero.models import build_model

    with torch.device("meta"):
        model = build_model(config)
    own = model.state_dict()
    tied = ({n for n, _ in model.named_parameters(remove_duplicate=False)}
            - {n for n, _ in model.named_parameters()})
    check_keys(set(own) - tied, set(state), where)
    for name, tensor in state.items():
        check_shape(name, tensor, tuple(own[name].shape), where)


# ---------------------------------------------------------------------------------------------
# Writing


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise FromzeroError(f"{out} already exists; pass --force to replace it")
        if not out.is_dir():
            raise FromzeroError(f"{out} exists and is not a directory")


def _write_dir(out: Path, config: dict, state: dict[str, torch.Tensor], tokenizer_src: Path | None,
               extra_files: dict[str, str] | None = None) -> None:
    """Write config.json + model.safetensors (+ tokenizer files) to ``out`` atomically."""
    from fromzero.checkpoint import commit_directory, write_safetensors

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(out, f".tmp-{out.name}-")
    try:
        tmp.chmod(0o755)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        write_safetensors({k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp / "model.safetensors")
        if tokenizer_src is not None:
            for name in TOKENIZER_FILES:
                if (tokenizer_src / name).is_file():
                    shutil.copyfile(tokenizer_src / name, tmp / name)
        for name, text in (extra_files or {}).items():
            if not (tmp / name).exists():
                (tmp / name).write_text(text, encoding="utf-8")
        commit_directory(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FromzeroError(f"could not write {out}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def convert_from_hf(src: str, out: Path, force: bool = False) -> dict:
    """HF directory or hub id -> fromzero checkpoint directory. Returns the fromzero config."""
    out = Path(out)
    _prepare_out(out, force)
    directory = resolve_source(src)
    hf_config = read_hf_config(directory)
    converter = converter_for_hf(str(hf_config["model_type"]))
    state = read_hf_state(directory)
    config, fz_state = converter.from_hf(hf_config, state)
    check_fits(config, fz_state, f"{src} ({hf_config['model_type']})")
    _write_dir(out, config, fz_state, directory)
    return config


def convert_to_hf(src: Path, out: Path, force: bool = False) -> dict:
    """fromzero checkpoint directory -> HF directory that ``transformers`` loads."""
    from fromzero.checkpoint import CONFIG_FILE, load_model, read_json

    src, out = Path(src), Path(out)
    _prepare_out(out, force)
    config = read_json(src / CONFIG_FILE, "model config")
    converter = converter_for_fromzero(str(config.get("model_type")))
    model = load_model(src)  # validates config + weights
    state = dict(model.state_dict())
    hf_config, hf_state = converter.to_hf(config, state)
    extra = {}
    if (src / "tokenizer.json").is_file() and not (src / "tokenizer_config.json").is_file():
        # fromzero's own tokenizers are plain tokenizer.json files; this lets AutoTokenizer load them.
        extra["tokenizer_config.json"] = json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}, indent=2
        ) + "\n"
    _write_dir(out, hf_config, hf_state, src, extra)
    return hf_config
