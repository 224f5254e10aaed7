"""LoRA SFT speed and memory: ``fromzero finetune`` (task sft, method lora) vs TRL ``SFTTrainer`` + PEFT.

    FROMZERO_HOME=/tmp/fzhome .venv/bin/python benchmarks/sft_vs_trl.py \
        [--rounds 3] [--steps 8] [--warmup 2] [--dtypes float32,bfloat16] [--threads 1] [--profile]

Model: the real SmolLM2-135M-Instruct. fromzero trains the built-in ``smollm2-135m-instruct``
checkpoint (``$FROMZERO_HOME/models/...``); TRL trains ``AutoModelForCausalLM.from_pretrained`` of
``fromzero convert to-hf`` of that very checkpoint (identical weights), written to a temp dir.

Data: the built-in ``rotten-tomatoes`` SFT chats (user: instruction + review, assistant:
``positive`` / ``negative``), rendered with SmolLM2's own ChatML template (its default system
message included). Both sides train on the SAME examples in the SAME order: the parent replays
fromzero's shuffled train order (DataLoader over the train split, seed 0, as ``finetune_sft``
builds it) and gives TRL exactly those chats in that order (``train_sampling_strategy:
sequential``); each child checks that it saw those batches (fromzero: the padded length and the
number of loss tokens of every batch; TRL: token ids and loss mask of every example equal
fromzero's).

Masking: loss on the assistant reply only, i.e. the tokens of ``positive<|im_end|>\\n``. fromzero:
its template segments (``chat_template: auto``); TRL: a ``messages`` dataset with
``assistant_only_loss=True`` and SmolLM2's template with ``{% generation %}`` around the reply
(``chat_template_path``; same text, checked token for token against fromzero's ids and mask).
Padding: both pad each batch to its longest example (no packing, no padding-free). fromzero feeds
``ids[:-1]`` with labels ``ids[1:]``; HF feeds ``ids`` and shifts inside the loss.

Same on both sides: batch 8, max_length 128 (nothing is truncated: the longest chat has 127
tokens), LoRA r=16, alpha=32, dropout 0.05 on q, k, v, o, gate, up, down (fromzero's fused
``attn.c_attn`` = q|k|v and ``mlp.c_fc`` = gate|up, so one rank-16 adapter covers q, k, v and one
covers gate, up: fewer adapter weights than PEFT's seven per layer -- reported), AdamW (fused)
lr 2e-4 with 1 warm-up step then cosine, weight decay 0, grad clip 1.0, no gradient checkpointing
(TRL's default is on: turned off to match), dropout-free base, seed 0, ``--threads`` torch threads.
dtype: float32, and bfloat16 autocast (fp32 master weights) on both where the CPU has fast bf16.
TRL otherwise keeps its defaults (its fused LM head -- chunked over the vocabulary, no (B, T, V)
logits; on CPU it scores every position, only on Triton devices just the loss positions --,
entropy / token-accuracy metrics, logging every 10 steps); fromzero its own (log_interval 10; no
progress bar on either side). Temp dirs (the HF copy: 538 MB) are removed at the end.

Tokens counted: the non-pad tokens of each chat (``len(ids)``), the same number on both sides
(so the tokens/s ratio equals the step-time ratio); steps ``warmup+1 .. steps`` are timed, each
optimizer step stamped (fromzero: a wrapper around ``Finetuner._optimizer_step``; TRL: a
``TrainerCallback.on_step_end``). Each run is a fresh subprocess; its peak RSS is its own
``ru_maxrss`` (at the end of the timed steps, and at exit). Rounds alternate fromzero, trl per
dtype; medians are reported. ``--profile`` adds one torch.profiler run per side (after the
rounds) over 3 steps after warm-up and writes its top ops into the JSON.

Writes benchmarks/results/sft_vs_trl.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

MODEL = "smollm2-135m-instruct"
DATA = "rotten-tomatoes"
SEED = 0
LORA = {"r": 16, "alpha": 32.0, "dropout": 0.05}
FZ_TARGETS = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR = 2e-4
SIDES = ("fromzero", "trl")
IGNORE = -100

# SmolLM2's chat template (chat_template.jinja of the checkpoint) with the assistant's reply
# (content + <|im_end|>\n, exactly fromzero's loss segment) wrapped in {% generation %}, which
# transformers needs for assistant token masks. Rendered text is the same as the original's.
TRAINING_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' + '\\n' }}{% endgeneration %}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# ---------------------------------------------------------------------------------------------
# the shared schedule: fromzero's train order, replayed in the parent


def fz_config(spec: dict, out_dir: str = ""):
    """The fromzero SFT config of a run (the same fields as recipes/smollm2-sentiment-lora.yaml)."""
    from fromzero.finetune.sft import SFTConfig

    return SFTConfig(
        init_from=MODEL, data=DATA, method="lora", lora_rank=LORA["r"], lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"], lora_targets=list(FZ_TARGETS), chat_template="auto", system_prompt="",
        max_length=spec["max_length"], epochs=1, max_steps=spec["steps"], batch_size=spec["batch_size"],
        eval_batch_size=spec["batch_size"], max_eval_examples=spec["batch_size"], lr=LR, warmup_ratio=0.05,
        weight_decay=0.0, grad_clip=1.0, optimizer="adamw", eval_every=0, log_interval=10,
        dtype=spec["dtype"], device="cpu", compile=False, seed=SEED, progress=False,
        out_dir=out_dir, force=True)


def build_schedule(batch_size: int, steps: int, max_length: int) -> dict:
    """The chats of fromzero's first ``steps`` batches, in order, with their ids and loss masks.

    Replays what ``finetune_sft`` does: load + tokenize the train split with the model's own
    template, then a DataLoader(shuffle=True, generator seeded with cfg.seed) over it."""
    import torch
    from torch.utils.data import DataLoader

    from fromzero.data.sft import add_system_prompt, load_sft_examples, tokenize_sft
    from fromzero.data.tokenizers import TextTokenizer
    from fromzero.finetune.sft import choose_template
    from fromzero.models.builtin import resolve_model

    cfg = fz_config({"max_length": max_length, "steps": steps, "batch_size": batch_size, "dtype": "float32"})
    init_dir = resolve_model(MODEL)
    tokenizer = TextTokenizer.load(init_dir / "tokenizer.json")
    template, template_dir = choose_template(cfg, init_dir)
    if template_dir is None:
        raise SystemExit(f"{init_dir} has no chat template of its own")
    splits = load_sft_examples(cfg.data, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    train = add_system_prompt(splits["train"], cfg.system_prompt)
    sft_set = tokenize_sft(train, tokenizer, template, max_length)
    if sft_set.n_dropped or sft_set.n_truncated or len(sft_set) != len(train):
        raise SystemExit(f"train split: {sft_set.n_dropped} dropped, {sft_set.n_truncated} truncated: "
                         "the index replay below assumes neither")
    loader = DataLoader(range(len(sft_set)), batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(cfg.seed), collate_fn=list)
    batches: list[list[int]] = []
    for batch in loader:
        if len(batches) == steps:
            break
        batches.append(batch)
    if len(batches) < steps:
        raise SystemExit(f"the train split has only {len(batches)} batches of {batch_size}")
    examples = []
    for i in (i for b in batches for i in b):
        ids: list[int] = []
        mask: list[int] = []
        for text, is_target in template.render(train[i]["messages"]):  # as tokenize_sft does
            seg = tokenizer.encode(text)
            ids += seg
            mask += [int(is_target)] * len(seg)
        x, y = sft_set[i]
        if ids[:-1] != x.tolist() or [m for m in mask[1:]] != (y != IGNORE).long().tolist():
            raise SystemExit(f"example {i}: re-tokenization differs from tokenize_sft")
        examples.append({"index": i, "messages": train[i]["messages"], "ids": ids, "mask": mask})
    per_batch = []
    for s in range(steps):
        chunk = examples[s * batch_size:(s + 1) * batch_size]
        lengths = [len(e["ids"]) for e in chunk]
        per_batch.append({"tokens": sum(lengths), "longest": max(lengths),
                          "loss_tokens": sum(sum(e["mask"][1:]) for e in chunk)})
    return {"examples": examples, "batches": per_batch, "n_train": len(sft_set),
            "longest_train_chat": max(len(x) + 1 for x in sft_set.xs)}


# ---------------------------------------------------------------------------------------------
# child processes: one run each


def peak_rss_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


class StepClock:
    """Time stamps of optimizer steps; optionally a torch.profiler over steps warmup+1..warmup+k."""

    def __init__(self, spec: dict) -> None:
        self.spec, self.stamps, self.rss_at_end = spec, [], None
        self.prof = None
        self.k = spec.get("profile_steps", 0)

    def tick(self) -> None:
        import torch

        self.stamps.append(time.perf_counter())
        n = len(self.stamps)
        if n == self.spec["steps"]:
            self.rss_at_end = peak_rss_mib()
        if self.k and n == self.spec["warmup"]:
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                               record_shapes=True)
            self.prof.start()
        if self.prof is not None and n == self.spec["warmup"] + self.k:
            self.prof.stop()

    def profile_rows(self, top: int = 30) -> dict:
        if self.prof is None:
            return {}
        avg = self.prof.key_averages()
        total = sum(e.self_cpu_time_total for e in avg)
        rows = sorted(avg, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
        by_shape = sorted(self.prof.key_averages(group_by_input_shape=True),
                          key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
        return {
            "steps": self.k, "self_cpu_ms_per_step_total": total / 1e3 / self.k,
            "top_ops": [{"op": e.key, "calls_per_step": e.count / self.k,
                         "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / self.k,
                         "share": e.self_cpu_time_total / max(total, 1)} for e in rows],
            "top_ops_by_shape": [{"op": e.key, "shapes": str(e.input_shapes)[:200],
                                  "calls_per_step": e.count / self.k,
                                  "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / self.k} for e in by_shape],
            "table": self.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top),
        }


def run_fromzero(spec: dict) -> dict:
    import torch

    from fromzero.training import trainer as trainer_mod
    from fromzero.finetune.sft import finetune_sft

    clock = StepClock(spec)
    seen: list[dict] = []
    optimizer_step, forward_backward = trainer_mod.Trainer._optimizer_step, trainer_mod.Trainer._forward_backward

    def stamped(self, *args, **kwargs):
        norm = optimizer_step(self, *args, **kwargs)
        clock.tick()
        return norm

    def recorded(self, batch, last):
        x, y = batch
        seen.append({"longest": int(x.shape[1]) + 1, "rows": int(x.shape[0]), "loss_tokens": int((y != IGNORE).sum())})
        return forward_backward(self, batch, last)

    trainer_mod.Trainer._optimizer_step = stamped
    trainer_mod.Trainer._forward_backward = recorded
    out = tempfile.mkdtemp(prefix="fz-bench-sft-")
    cfg = fz_config(spec, out)
    t0 = time.perf_counter()
    try:
        summary = finetune_sft(cfg)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    model_info = {"trainable_params": summary["trainable_params"], "total_params": summary["total_params"],
                  "autocast": spec["dtype"], "optimizer": "torch.optim.AdamW(fused=True)"}
    expected = [{"longest": b["longest"], "rows": spec["batch_size"], "loss_tokens": b["loss_tokens"]}
                for b in spec["batches"]]
    if seen[: spec["steps"]] != expected:
        raise RuntimeError(f"fromzero trained on other batches than the schedule: {seen[:3]} vs {expected[:3]}")
    return {"stamps": [t - t0 for t in clock.stamps], "rss_at_end_mib": clock.rss_at_end,
            "profile": clock.profile_rows(), "model": model_info, "threads": torch.get_num_threads(),
            "batches_checked": True}


def run_trl(spec: dict) -> dict:
    import torch
    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()
    clock = StepClock(spec)

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            clock.tick()

    hf_dir = spec["hf_dir"]
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    dataset = Dataset.from_list([{"messages": e["messages"]} for e in spec["examples"]])
    bf16 = spec["dtype"] == "bfloat16"
    out = tempfile.mkdtemp(prefix="fz-bench-trl-")
    args = SFTConfig(
        output_dir=out, per_device_train_batch_size=spec["batch_size"], max_steps=spec["steps"],
        learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=1, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch_fused", bf16=bf16, fp16=False, gradient_checkpointing=False,
        max_length=spec["max_length"], packing=False, padding_free=False, pad_to_multiple_of=None,
        assistant_only_loss=True, chat_template_path=spec["template_path"],
        train_sampling_strategy="sequential", dataloader_num_workers=0, seed=SEED, data_seed=SEED,
        save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True,
    )
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules=list(HF_TARGETS), bias="none", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[Stamp()])
    # The same tokens and the same loss mask as fromzero, example by example.
    # (TRL folds assistant_masks into labels: the token id where the mask is 1, else -100.)
    mismatches = []
    for n, (row, e) in enumerate(zip(trainer.train_dataset, spec["examples"])):
        labels = [t if m else IGNORE for t, m in zip(e["ids"], e["mask"])]
        if list(row["input_ids"]) != e["ids"] or list(row["labels"]) != labels:
            mismatches.append(n)
    if mismatches or len(trainer.train_dataset) != len(spec["examples"]):
        first = trainer.train_dataset[mismatches[0] if mismatches else 0]
        raise RuntimeError(f"TRL tokenized {len(mismatches)} examples differently from fromzero, e.g. "
                           f"{list(first['input_ids'])[-12:]} labels {list(first['labels'])[-12:]}")
    t0 = time.perf_counter()
    try:
        result = trainer.train()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    model_info = {"trainable_params": trainable, "total_params": total, "autocast": "bfloat16" if bf16 else "float32",
                  "param_dtypes": sorted({str(p.dtype) for p in trainer.model.parameters()}),
                  "optimizer": type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                                    else trainer.optimizer).__name__ + f" ({args.optim})",
                  "attn_implementation": getattr(model.config, "_attn_implementation", None),
                  "train_loss": result.training_loss}
    return {"stamps": [t - t0 for t in clock.stamps], "rss_at_end_mib": clock.rss_at_end,
            "profile": clock.profile_rows(), "model": model_info, "threads": torch.get_num_threads(),
            "examples_checked": len(spec["examples"])}


def child(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    res = (run_fromzero if spec["side"] == "fromzero" else run_trl)(spec)
    stamps, w, n = res["stamps"], spec["warmup"], spec["steps"]
    if len(stamps) < n:
        raise RuntimeError(f"{len(stamps)} optimizer steps stamped, {n} expected")
    window_s = stamps[n - 1] - stamps[w - 1]
    timed = spec["batches"][w:n]
    tokens = sum(b["tokens"] for b in timed)
    step_s = [b - a for a, b in zip(stamps[w - 1:n - 1], stamps[w:n])]
    res.update(side=spec["side"], dtype=spec["dtype"], window_s=window_s, timed_steps=n - w,
               tokens=tokens, tokens_per_s=tokens / window_s, ms_per_step=1e3 * window_s / (n - w),
               median_step_ms=1e3 * statistics.median(step_s), step_ms=[1e3 * s for s in step_s],
               peak_rss_mib=peak_rss_mib(), wall_s=time.perf_counter() - t0)
    Path(result_path).write_text(json.dumps(res))


# ---------------------------------------------------------------------------------------------
# parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (fromzero, trl) per dtype")
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per run (warm-up included)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads in every child (1: on a machine whose cores other processes also use, "
                         "2 threads on 2 cores made every op wait for a descheduled thread: 31 s/step vs 2.6 s)")
    ap.add_argument("--dtypes", default="float32,bfloat16",
                    help="comma list of float32, bfloat16 (bfloat16 is skipped where the CPU has no fast bf16)")
    ap.add_argument("--profile", action="store_true",
                    help="after the rounds, one torch.profiler run per side and dtype (3 steps after warm-up)")
    ap.add_argument("--profile-steps", type=int, default=3, help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=float, default=900, help="seconds one child run may take")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sft_vs_trl.json"))
    ap.add_argument("--child", nargs=2, metavar=("SPEC", "RESULT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.child:
        return child(*args.child)

    import torch
    from rich.console import Console
    from rich.table import Table

    from fromzero.models.builtin import resolve_model
    from fromzero.models.hf import convert_to_hf
    from fromzero.devices import fast_bf16_available

    if not 1 <= args.warmup < args.steps:
        raise SystemExit("need 1 <= --warmup < --steps")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if set(dtypes) - {"float32", "bfloat16"}:
        raise SystemExit("--dtypes takes float32 and/or bfloat16")
    if "bfloat16" in dtypes and not fast_bf16_available(torch.device("cpu")):
        print("note: this CPU has no fast bf16 (AVX512-BF16 / AMX): bfloat16 skipped")
        dtypes.remove("bfloat16")
    console = Console(width=160)
    t_start = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="fz-bench-sft-vs-trl-"))
    init_dir = resolve_model(MODEL)
    hf_dir = workdir / "hf"
    convert_to_hf(init_dir, hf_dir)  # the same weights for transformers
    template_path = workdir / "smollm2_training.jinja"
    template_path.write_text(TRAINING_TEMPLATE)
    schedule = build_schedule(args.batch_size, args.steps, args.max_length)
    timed = schedule["batches"][args.warmup:]
    console.print(f"{MODEL} -> {hf_dir}; {DATA}: {schedule['n_train']} train chats (longest "
                  f"{schedule['longest_train_chat']} tokens); {args.steps} steps of {args.batch_size} "
                  f"({args.warmup} warm-up), timed: {sum(b['tokens'] for b in timed)} chat tokens, "
                  f"{sum(b['loss_tokens'] for b in timed)} loss tokens; dtypes {dtypes}; {args.threads} threads")

    env = dict(os.environ)
    runs: dict[tuple[str, str], list[dict]] = {(d, s): [] for d in dtypes for s in SIDES}
    profiles: dict[str, dict] = {}

    def run_child(side: str, dtype: str, tag: str, profile_steps: int = 0) -> dict | None:
        spec = {"side": side, "dtype": dtype, "threads": args.threads, "steps": args.steps,
                "warmup": args.warmup, "batch_size": args.batch_size, "max_length": args.max_length,
                "hf_dir": str(hf_dir), "template_path": str(template_path), "profile_steps": profile_steps,
                "examples": schedule["examples"], "batches": schedule["batches"]}
        spec_path, result = workdir / f"{tag}.spec.json", workdir / f"{tag}.json"
        spec_path.write_text(json.dumps(spec))
        proc = subprocess.run([sys.executable, __file__, "--child", str(spec_path), str(result)],
                              capture_output=True, text=True, cwd=ROOT, env=env, timeout=args.timeout)
        if proc.returncode != 0 or not result.is_file():
            console.print(f"[red]{tag} failed (exit {proc.returncode}):[/red]\n{proc.stderr[-4000:]}")
            return None
        return json.loads(result.read_text())

    for r in range(args.rounds):
        for dtype in dtypes:
            for side in SIDES:
                res = run_child(side, dtype, f"{side}-{dtype}-{r}")
                if res is None:
                    continue
                res["round"] = r
                runs[(dtype, side)].append(res)
                console.print(f"round {r + 1}/{args.rounds} {dtype:8s} {side:8s}: {res['tokens_per_s']:7.1f} tok/s, "
                              f"{res['ms_per_step']:7.0f} ms/step (median step {res['median_step_ms']:.0f}), "
                              f"peak RSS {res['peak_rss_mib']:.0f} MiB, wall {res['wall_s']:.0f} s")
    if args.profile:
        for dtype in dtypes:
            for side in SIDES:
                res = run_child(side, dtype, f"profile-{side}-{dtype}", profile_steps=args.profile_steps)
                if res is not None:
                    profiles[f"{side}-{dtype}"] = res["profile"]
                    console.print(f"[bold]profile {side} {dtype}[/bold] (self CPU over {args.profile_steps} steps)")
                    console.print(res["profile"]["table"])

    def med(dtype: str, side: str, key: str) -> float:
        xs = [x[key] for x in runs[(dtype, side)] if x.get(key) is not None]
        return statistics.median(xs) if xs else float("nan")

    table = Table(title=f"LoRA SFT of SmolLM2-135M-Instruct on rotten-tomatoes chats: batch {args.batch_size}, "
                        f"pad to longest, max_length {args.max_length}, {args.threads} threads; median of "
                        f"{args.rounds} rounds, steps {args.warmup + 1}..{args.steps}")
    for col in ("dtype", "side", "tokens/s", "ms/step", "median step ms", "peak RSS MiB", "RSS @ last step MiB",
                "fromzero/trl tok/s", "fromzero/trl RSS", "trainable params"):
        table.add_column(col, justify="left" if col in ("dtype", "side") else "right")
    summary = []
    for dtype in dtypes:
        if not all(runs[(dtype, s)] for s in SIDES):  # a failed side, or --rounds 0 (profile only)
            continue
        tps = {s: med(dtype, s, "tokens_per_s") for s in SIDES}
        rss = {s: med(dtype, s, "peak_rss_mib") for s in SIDES}
        ratio, rss_ratio = tps["fromzero"] / tps["trl"], rss["fromzero"] / rss["trl"]
        for side in SIDES:
            params = runs[(dtype, side)][0]["model"]["trainable_params"] if runs[(dtype, side)] else 0
            table.add_row(dtype, side, f"{tps[side]:,.1f}", f"{med(dtype, side, 'ms_per_step'):,.0f}",
                          f"{med(dtype, side, 'median_step_ms'):,.0f}", f"{rss[side]:,.0f}",
                          f"{med(dtype, side, 'rss_at_end_mib'):,.0f}",
                          f"{ratio:.2f}x" if side == "fromzero" else "", f"{rss_ratio:.2f}" if side == "fromzero" else "",
                          f"{params:,}")
        summary.append({"dtype": dtype, "fromzero_tokens_per_s": tps["fromzero"], "trl_tokens_per_s": tps["trl"],
                        "ratio_tokens_per_s": ratio, "fromzero_peak_rss_mib": rss["fromzero"],
                        "trl_peak_rss_mib": rss["trl"], "ratio_peak_rss": rss_ratio,
                        "fromzero_ms_per_step": med(dtype, "fromzero", "ms_per_step"),
                        "trl_ms_per_step": med(dtype, "trl", "ms_per_step"),
                        "bar_1_5x_met": bool(ratio >= 1.5 and rss_ratio < 1.0)})
    console.print(table)
    console.print("tokens = non-pad chat tokens (len(ids) per example, identical batches on both sides); "
                  "ratio >= 1.5 at lower peak RSS is the bar")
    import peft
    import transformers
    import trl

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    strip = lambda r: {k: v for k, v in r.items() if k != "profile"}  # noqa: E731
    out.write_text(json.dumps({
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "threads": args.threads, "load_avg_at_end": os.getloadavg(),
                    "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                    "peft": peft.__version__},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "setup": {"model": MODEL, "data": DATA, "batch_size": args.batch_size, "max_length": args.max_length,
                  "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "padding": "longest in batch",
                  "loss": "assistant reply only (content + <|im_end|>\\n)", "lora": LORA,
                  "fromzero_targets": FZ_TARGETS, "trl_targets": HF_TARGETS, "lr": LR,
                  "tokens_counted": "non-pad chat tokens, same on both sides",
                  "timed_tokens": sum(b["tokens"] for b in timed),
                  "timed_loss_tokens": sum(b["loss_tokens"] for b in timed),
                  "timed_padded_tokens_fromzero": sum(args.batch_size * (b["longest"] - 1) for b in timed),
                  "timed_padded_tokens_trl": sum(args.batch_size * b["longest"] for b in timed)},
        "summary": summary,
        "runs": {f"{d}/{s}": [strip(r) for r in v] for (d, s), v in runs.items()},
        "profiles": profiles,
        "wall_s": time.perf_counter() - t_start,
    }, indent=2) + "\n")
    shutil.rmtree(workdir, ignore_errors=True)
    console.print(f"wrote {out} ({time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
