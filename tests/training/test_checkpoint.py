"""Tests for fromzero.checkpoint: atomic save, safe load, exact resume."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save_file as real_save_file

from fromzero.errors import FromzeroError
from fromzero.models.gpt import GPT, GPTConfig
import fromzero.checkpoint as ckpt

CFG = GPTConfig(vocab_size=17, block_size=16, n_layer=2, n_head=2, n_embd=32)


def _info(path) -> dict:
    """info.json without the stamps every writer adds (format version, fromzero version)."""
    info = json.loads(path.read_text())
    assert info.pop("format") == 1 and isinstance(info.pop("fromzero_version"), str)
    return info


def tiny_model(seed: int = 0, cfg: GPTConfig = CFG) -> GPT:
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.05)
    return model.eval()


def save(directory: Path, model: GPT, **kw) -> None:
    ckpt.save_checkpoint(directory, model, model.config.to_dict(), **kw)


def logits_of(model: torch.nn.Module) -> torch.Tensor:
    idx = torch.arange(12).view(2, 6) % 17
    with torch.no_grad():
        return model(idx)[0]


def leftovers(parent: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name not in keep)


class NotATensor:
    """An arbitrary object: a weights_only load must refuse to unpickle it."""

    def __init__(self) -> None:
        self.payload = "anything"


# ----------------------------------------------------------------------------------------
# Saving


def test_save_checkpoint_writes_expected_files(tmp_path: Path) -> None:
    model = tiny_model()
    tok = tmp_path / "tok.json"
    tok.write_text('{"tokenizer": true}')
    out = tmp_path / "ckpt"
    save(out, model, tokenizer_file=tok, info={"step": 7, "val_loss": 1.5},
         trainer_state={"step": 7})
    names = {p.name for p in out.iterdir()}
    assert names == {"config.json", "model.safetensors", "tokenizer.json", "info.json",
                     "trainer_state.pt"}
    config = json.loads((out / "config.json").read_text())
    assert config == CFG.to_dict() and config["model_type"] == "fromzero-gpt"
    assert _info(out / "info.json") == {"step": 7, "val_loss": 1.5}
    assert (out / "tokenizer.json").read_text() == '{"tokenizer": true}'
    assert leftovers(tmp_path, {"tok.json", "ckpt"}) == []  # no temp dirs behind


def test_optional_files_are_omitted(tmp_path: Path) -> None:
    save(tmp_path / "c", tiny_model())
    assert {p.name for p in (tmp_path / "c").iterdir()} == {"config.json", "model.safetensors"}


def test_tied_weight_stored_once(tmp_path: Path) -> None:
    model = tiny_model()
    save(tmp_path / "c", model)
    with safe_open(str(tmp_path / "c" / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert f.metadata() == {"format": "pt"}
        torch.testing.assert_close(f.get_tensor("transformer.wte.weight"),
                                   model.transformer.wte.weight.detach())
    assert "lm_head.weight" not in keys
    assert "transformer.wte.weight" in keys
    assert keys == set(model.state_dict()) - {"lm_head.weight"}


def test_load_model_round_trip_gives_identical_logits(tmp_path: Path) -> None:
    model = tiny_model(seed=3)
    save(tmp_path / "c", model)
    loaded = ckpt.load_model(tmp_path / "c")
    assert isinstance(loaded, GPT) and not loaded.training
    assert loaded.config == CFG
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # still tied
    assert torch.equal(logits_of(loaded), logits_of(model))
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    # A differently initialised model really differs (the check above is not vacuous).
    assert not torch.equal(logits_of(tiny_model(seed=4)), logits_of(model))


def test_round_trip_without_bias(tmp_path: Path) -> None:
    cfg = GPTConfig(vocab_size=17, block_size=16, n_layer=1, n_head=2, n_embd=32, bias=False)
    model = tiny_model(cfg=cfg)
    save(tmp_path / "c", model)
    assert torch.equal(logits_of(ckpt.load_model(tmp_path / "c")), logits_of(model))


class FakeCompiled(torch.nn.Module):
    """What torch.compile returns: the real model under ``_orig_mod``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self._orig_mod = model

    def forward(self, *args, **kwargs):
        return self._orig_mod(*args, **kwargs)


def test_compiled_prefix_is_stripped(tmp_path: Path) -> None:
    model = tiny_model(seed=5)
    wrapped = FakeCompiled(model)
    assert all(k.startswith("_orig_mod.") for k in wrapped.state_dict())
    state = ckpt.model_state_for_saving(wrapped)
    assert set(state) == set(model.state_dict()) - {"lm_head.weight"}
    ckpt.save_checkpoint(tmp_path / "c", wrapped, model.config.to_dict())
    keys = set(load_file(str(tmp_path / "c" / "model.safetensors")))
    assert not any("_orig_mod" in k for k in keys)
    assert torch.equal(logits_of(ckpt.load_model(tmp_path / "c")), logits_of(model))


def test_model_state_for_saving_is_detached_cpu_copy() -> None:
    model = tiny_model()
    state = ckpt.model_state_for_saving(model)
    for name, t in state.items():
        assert t.device.type == "cpu" and not t.requires_grad and t.is_contiguous(), name


# ----------------------------------------------------------------------------------------
# Directory commit and recovery


def test_save_replaces_existing_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "last"
    save(out, tiny_model(seed=1), info={"step": 1}, trainer_state={"step": 1})
    model2 = tiny_model(seed=2)
    save(out, model2, info={"step": 2})
    assert _info(out / "info.json") == {"step": 2}
    assert not (out / "trainer_state.pt").exists()  # the whole directory was replaced
    assert torch.equal(logits_of(ckpt.load_model(out)), logits_of(model2))
    assert leftovers(tmp_path, {"last"}) == []


def test_commit_directory_replaces_existing_dir(tmp_path: Path) -> None:
    final = tmp_path / "final"
    final.mkdir()
    (final / "old.txt").write_text("old")
    new = tmp_path / "new"
    new.mkdir()
    (new / "new.txt").write_text("new")
    ckpt.commit_directory(new, final)
    assert [p.name for p in final.iterdir()] == ["new.txt"]
    assert (final / "new.txt").read_text() == "new"
    assert leftovers(tmp_path, {"final"}) == []  # tmp moved, .old-final deleted


def test_commit_directory_to_new_location_and_stale_old(tmp_path: Path) -> None:
    (tmp_path / ".old-final").mkdir()  # a stale leftover from an earlier crash
    (tmp_path / ".old-final" / "stale").write_text("x")
    final = tmp_path / "final"
    (final).mkdir()
    (final / "a").write_text("a")
    new = tmp_path / "new"
    new.mkdir()
    (new / "b").write_text("b")
    ckpt.commit_directory(new, final)
    assert [p.name for p in final.iterdir()] == ["b"]
    assert leftovers(tmp_path, {"final"}) == []


def test_recover_directory_restores_old_copy(tmp_path: Path) -> None:
    final = tmp_path / "last"
    save(final, tiny_model(seed=1))
    # Crash between the two renames of commit_directory: only .old-last is left.
    os.replace(final, tmp_path / ".old-last")
    ckpt.recover_directory(final)
    assert final.is_dir() and not (tmp_path / ".old-last").exists()
    assert torch.equal(logits_of(ckpt.load_model(final)), logits_of(tiny_model(seed=1)))


def test_recover_directory_keeps_existing_final(tmp_path: Path) -> None:
    final = tmp_path / "last"
    final.mkdir()
    (final / "new").write_text("new")
    (tmp_path / ".old-last").mkdir()
    ckpt.recover_directory(final)
    assert (final / "new").exists()  # a complete final dir is never replaced by the old one
    ckpt.recover_directory(tmp_path / "missing")  # nothing to do: no error
    assert not (tmp_path / "missing").exists()


def test_crash_between_renames_leaves_a_recoverable_old_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    final = tmp_path / "last"
    old_model = tiny_model(seed=1)
    save(final, old_model, info={"step": 1})
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).name.startswith(".tmp-"):  # the second rename: new dir into place
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace)
    with pytest.raises(FromzeroError, match="could not write"):
        save(final, tiny_model(seed=2), info={"step": 2})
    monkeypatch.undo()
    # The old checkpoint was moved aside intact, the half-committed new one removed.
    assert not final.exists()
    assert _info(tmp_path / ".old-last" / "info.json") == {"step": 1}
    assert leftovers(tmp_path, {".old-last"}) == []
    ckpt.recover_directory(final)
    assert leftovers(tmp_path, {"last"}) == []
    assert torch.equal(logits_of(ckpt.load_model(final)), logits_of(old_model))


def test_load_model_recovers_interrupted_commit(tmp_path: Path) -> None:
    final = tmp_path / "best"
    model = tiny_model(seed=1)
    save(final, model)
    os.replace(final, tmp_path / ".old-best")
    assert torch.equal(logits_of(ckpt.load_model(final)), logits_of(model))


# ----------------------------------------------------------------------------------------
# Failures while writing


def test_disk_full_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "last"
    old = tiny_model(seed=1)
    save(out, old, info={"step": 1})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "write_safetensors", full)
    with pytest.raises(FromzeroError, match="disk full") as e:
        save(out, tiny_model(seed=2), info={"step": 2})
    assert str(out) in str(e.value)
    assert _info(out / "info.json") == {"step": 1}
    monkeypatch.undo()
    assert torch.equal(logits_of(ckpt.load_model(out)), logits_of(old))
    assert leftovers(tmp_path, {"last"}) == []


def test_other_os_error_is_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(*args, **kwargs):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(ckpt, "write_safetensors", denied)
    with pytest.raises(FromzeroError, match="could not write .*Permission denied"):
        save(tmp_path / "c", tiny_model())
    assert leftovers(tmp_path, set()) == []


def test_non_os_error_while_writing_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save(tmp_path / "c", tiny_model(seed=1), info={"step": 1})

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "write_safetensors", boom)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path / "c", tiny_model(seed=2), info={"step": 2})
    assert _info(tmp_path / "c" / "info.json") == {"step": 1}
    assert leftovers(tmp_path, {"c"}) == []


_real_write_safetensors = ckpt.write_safetensors


def _to_dev_full(state, path, *args, **kwargs):
    """Call the real weights writer on /dev/full: a genuinely full disk."""
    return _real_write_safetensors(state, Path("/dev/full"), *args, **kwargs)


needs_dev_full = pytest.mark.skipif(
    not (os.path.exists("/dev/full") and stat.S_ISCHR(os.stat("/dev/full").st_mode)),
    reason="needs the /dev/full character device",
)


@needs_dev_full
def test_real_disk_full_in_safetensors_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "last"
    save(out, tiny_model(seed=1), info={"step": 1})
    monkeypatch.setattr(ckpt, "write_safetensors", _to_dev_full)
    with pytest.raises(Exception):
        save(out, tiny_model(seed=2), info={"step": 2})
    assert _info(out / "info.json") == {"step": 1}
    assert leftovers(tmp_path, {"last"}) == []


@needs_dev_full
def test_real_disk_full_in_safetensors_is_fromzero_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ckpt, "write_safetensors", _to_dev_full)
    with pytest.raises(FromzeroError, match="disk full"):
        save(tmp_path / "c", tiny_model())


@needs_dev_full
def test_real_disk_full_in_trainer_state_is_fromzero_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torch.save's error does not carry ENOSPC; save_checkpoint asks the file system instead.
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: real_save(obj, "/dev/full", *a, **k))
    with pytest.raises(FromzeroError, match="could not write"):
        save(tmp_path / "c", tiny_model(), trainer_state={"x": torch.zeros(100_000)})
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: shutil_usage(0))
    with pytest.raises(FromzeroError, match="disk full"):
        save(tmp_path / "c", tiny_model(), trainer_state={"x": torch.zeros(100_000)})
    assert not (tmp_path / "c").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def shutil_usage(free: int):
    import collections

    return collections.namedtuple("usage", "total used free")(1 << 30, (1 << 30) - free, free)


# ----------------------------------------------------------------------------------------
# Loading bad checkpoints


@pytest.mark.parametrize(
    "garbage", [b"", b"not a safetensors file at all" * 5, (8).to_bytes(8, "little") + b"{notjson"]
)
def test_corrupt_weights_are_fromzero_error(tmp_path: Path, garbage: bytes) -> None:
    out = tmp_path / "c"
    save(out, tiny_model())
    (out / "model.safetensors").write_bytes(garbage)
    with pytest.raises(FromzeroError, match="cannot read weights"):
        ckpt.load_model(out)


def test_truncated_weights_are_fromzero_error(tmp_path: Path) -> None:
    out = tmp_path / "c"
    save(out, tiny_model())
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(FromzeroError, match="cannot read weights"):
        ckpt.load_model(out)


def test_wrong_shape_tensor_is_named(tmp_path: Path) -> None:
    out = tmp_path / "c"
    save(out, tiny_model())
    state = load_file(str(out / "model.safetensors"))
    state["transformer.wpe.weight"] = torch.zeros(8, 32)
    real_save_file(state, str(out / "model.safetensors"))
    with pytest.raises(FromzeroError, match=r"'transformer\.wpe\.weight' has shape \(8, 32\).*\(16, 32\)"):
        ckpt.load_model(out)


def test_config_that_does_not_fit_the_weights(tmp_path: Path) -> None:
    out = tmp_path / "c"
    save(out, tiny_model())
    config = json.loads((out / "config.json").read_text())
    config["block_size"] = 32
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(FromzeroError, match="transformer.wpe.weight"):
        ckpt.load_model(out)


def test_missing_and_unexpected_tensors(tmp_path: Path) -> None:
    out = tmp_path / "c"
    save(out, tiny_model())
    state = load_file(str(out / "model.safetensors"))
    del state["transformer.h.1.mlp.c_fc.weight"]
    real_save_file(state, str(out / "model.safetensors"))
    with pytest.raises(FromzeroError, match=r"missing tensors.*transformer\.h\.1\.mlp\.c_fc\.weight"):
        ckpt.load_model(out)
    state = load_file(str(tmp_path / "c" / "model.safetensors"))
    state["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(128, 32)
    state["extra.weight"] = torch.zeros(2)
    real_save_file(state, str(out / "model.safetensors"))
    with pytest.raises(FromzeroError, match="unexpected tensor 'extra.weight'"):
        ckpt.load_model(out)


@pytest.mark.parametrize("model_type", ["llama", None])
def test_unsupported_model_type(tmp_path: Path, model_type: str | None) -> None:
    out = tmp_path / "c"
    save(out, tiny_model())
    config = json.loads((out / "config.json").read_text())
    if model_type is None:
        del config["model_type"]
    else:
        config["model_type"] = model_type
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(FromzeroError, match="unsupported model_type"):
        ckpt.load_model(out)


def test_bad_config_json(tmp_path: Path) -> None:
    out = tmp_path / "c"
    save(out, tiny_model())
    (out / "config.json").write_text("{not json")
    with pytest.raises(FromzeroError, match="not valid JSON"):
        ckpt.load_model(out)
    (out / "config.json").write_text("[1, 2]")
    with pytest.raises(FromzeroError, match="JSON object"):
        ckpt.load_model(out)
    (out / "config.json").write_text(json.dumps({**CFG.to_dict(), "n_embd": 30, "n_head": 4}))
    with pytest.raises(FromzeroError, match="divisible"):
        ckpt.load_model(out)
    (out / "config.json").unlink()
    with pytest.raises(FromzeroError, match="model config not found"):
        ckpt.load_model(out)


def test_missing_directory_and_weights(tmp_path: Path) -> None:
    with pytest.raises(FromzeroError, match="checkpoint directory not found"):
        ckpt.load_model(tmp_path / "nope")
    out = tmp_path / "c"
    save(out, tiny_model())
    (out / "model.safetensors").unlink()
    with pytest.raises(FromzeroError, match="weights not found"):
        ckpt.load_model(out)


# ----------------------------------------------------------------------------------------
# Trainer state


def test_trainer_state_round_trip(tmp_path: Path) -> None:
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _, loss = model(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long))
    loss.backward()
    opt.step()
    gen = torch.Generator().manual_seed(11)
    state = {
        "step": 42,
        "best_val_loss": float("inf"),
        "optimizer": opt.state_dict(),
        "scaler": {},
        "batch_generator": gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "fromzero_version": "0.1.0",
    }
    save(tmp_path / "last", model, trainer_state=state)
    loaded = ckpt.load_trainer_state(tmp_path / "last")
    assert loaded["step"] == 42 and loaded["best_val_loss"] == float("inf")
    assert torch.equal(loaded["torch_rng"], state["torch_rng"])
    assert torch.equal(loaded["batch_generator"], state["batch_generator"])
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt2.load_state_dict(loaded["optimizer"])
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for k in s1:
        assert torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"])


def test_trainer_state_refuses_arbitrary_objects(tmp_path: Path) -> None:
    out = tmp_path / "last"
    save(out, tiny_model(), trainer_state={"step": 1})
    torch.save({"step": 1, "evil": NotATensor()}, out / "trainer_state.pt")
    with pytest.raises(FromzeroError, match="cannot read trainer state"):
        ckpt.load_trainer_state(out)


def test_trainer_state_missing_or_corrupt(tmp_path: Path) -> None:
    out = tmp_path / "c"
    save(out, tiny_model())
    with pytest.raises(FromzeroError, match="no trainer state"):
        ckpt.load_trainer_state(out)
    (out / "trainer_state.pt").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(FromzeroError, match="cannot read trainer state"):
        ckpt.load_trainer_state(out)


# ----------------------------------------------------------------------------------------
# Atomic single-file writes


def test_atomic_write_text(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "dir" / "file.txt"
    ckpt.atomic_write_text(path, "héllo\n")
    assert path.read_bytes() == "héllo\n".encode("utf-8")
    ckpt.atomic_write_text(path, "second")
    assert path.read_text() == "second"
    assert [p.name for p in path.parent.iterdir()] == ["file.txt"]  # no temp files


def test_atomic_write_failure_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "file.txt"
    path.write_text("old")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.os, "fsync", full)
    with pytest.raises(FromzeroError, match="disk full"):
        ckpt.atomic_write_text(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


@pytest.mark.parametrize("umask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_outputs_written_atomically_follow_the_umask(tmp_path: Path, umask: int, dir_mode: int,
                                                     file_mode: int) -> None:
    """Temp files and directories are private when created; renamed into place they must have
    the modes plain open()/mkdir() give, so other users of a shared machine can read runs."""
    from fromzero.files import temp_dir_beside, temp_file_beside

    old = os.umask(umask)
    try:
        save(tmp_path / "ckpt", tiny_model())
        ckpt.atomic_write_bytes(tmp_path / "metrics.json", b"{}")
        fd, name = temp_file_beside(tmp_path / "x", ".x.")
        os.close(fd)
        made = temp_dir_beside(tmp_path / "y", ".y.")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(tmp_path / "ckpt") == mode(made) == dir_mode
    files = [p for p in (tmp_path / "ckpt").iterdir()] + [tmp_path / "metrics.json", Path(name)]
    assert {p.name: mode(p) for p in files} == {p.name: file_mode for p in files}
