"""CUDA paths (run by benchmarks/gpu_check.sh on a GPU machine; skipped without one): bf16
autocast training, torch.compile, fused AdamW, SDPA's flash kernel, DDP-free trainer on cuda."""

from __future__ import annotations

import pytest
import torch

from fromzero.models.gpt import GPT, GPTConfig
from fromzero.devices import autocast_context, resolve_dtype

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def small_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=512, block_size=128, n_layer=2, n_head=4, n_embd=128)).cuda().train()


def test_auto_dtype_is_bf16_on_a_modern_gpu() -> None:
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    assert resolve_dtype(torch.device("cuda"), "auto") == "bfloat16"


def test_bf16_autocast_step_with_fused_adamw_lowers_the_loss() -> None:
    model = small_gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
    idx = torch.randint(0, 512, (8, 128), device="cuda")
    losses = []
    for _ in range(20):
        with autocast_context(torch.device("cuda"), "bfloat16"):
            _, loss = model(idx, idx)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 1.0


def test_compiled_forward_matches_eager() -> None:
    model = small_gpt().eval()
    idx = torch.randint(0, 512, (2, 128), device="cuda")
    with torch.no_grad():
        eager, _ = model(idx)
        compiled, _ = torch.compile(model)(idx)
    torch.testing.assert_close(compiled, eager, atol=2e-3, rtol=2e-3)


def test_sdpa_flash_kernel_runs_the_model() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = small_gpt()
    idx = torch.randint(0, 512, (2, 128), device="cuda")
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), autocast_context(torch.device("cuda"), "bfloat16"):
        _, loss = model(idx, idx)  # raises if the flash kernel cannot take these inputs
    loss.backward()
    assert torch.isfinite(loss)
