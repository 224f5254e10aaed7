"""Decoding speed of a real LLM: fromzero's ``GPT.generate`` vs ``transformers``' ``generate``.

    .venv/bin/python benchmarks/llm_generate.py                     # SmolLM2-135M-Instruct
    .venv/bin/python benchmarks/llm_generate.py --threads 2,1 --rounds 7 --compile
    .venv/bin/python benchmarks/llm_generate.py --random            # same shape, random weights
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/llm_generate.py   # on a busy shared machine

The model is ``--checkpoint`` (default: the built-in ``smollm2-135m-instruct``, the Q4_1 GGUF
converted once to float32 by ``fromzero.models.builtin``; any fromzero LLaMA/GPT-2 checkpoint
works). transformers gets the very same weights: the checkpoint exported with
``fromzero convert to-hf`` (``convert_to_hf``) and read with ``from_pretrained``. ``--random``
builds SmolLM2's architecture (30 layers, width 576, 9 query / 3 key-value heads, vocab 49152,
tied embeddings) in transformers with seeded random weights and converts it with
``convert_from_hf`` instead.

Each case is batch 1, greedy, ``--new-tokens`` (256) new tokens after a ``--prompt-tokens``
(~100) token prompt (an English paragraph through the model's tokenizer; random ids with
``--random``), the same number of torch threads on both sides (``--threads``: each entry is
one block of measurements, ``torch.set_num_threads`` in this one process). transformers stops
at nothing (its generation config's eos is cleared, so both sides generate exactly the same
number of tokens; fromzero gets no eos either). Before timing, the fp32 runs of both must give
the same greedy tokens (asserted); bf16 runs report whether they agree (rounding in bf16 may
flip a near-tie, so it is not asserted).

Rows (per thread count):

* fp32 and bf16, fromzero vs transformers: generate tokens/s (new tokens / wall time of the
  whole call, prefill included; the bar: fromzero >= 1.5x), step tokens/s (1 / the median
  time of one decoding step over all steps of all rounds: fromzero stamps the clock after each
  forward pass, transformers in a stopping criterion that never stops, i.e. once per step; a
  median over thousands of steps shrugs off bursts of a neighbour's load) and prefill tokens/s
  (prompt tokens / time of a ``max_new_tokens=1`` call), and their ratios;
* each dtype three ways: ``fp32`` / ``bf16`` -- each library's default ``generate`` (fromzero
  drafts by prompt lookup, transformers does not; the bar); ``no-lookup`` -- fromzero with
  ``lookup_tokens=0`` vs transformers' default (one-token steps both sides); ``lookup`` --
  both with prompt-lookup drafts of 8 tokens (transformers ``prompt_lookup_num_tokens=8``).
  Before timing, fp32 lookup decoding must give the one-token-step tokens (asserted); for bf16
  the first difference, if any, is reported (a pass over several positions rounds differently);
* fromzero int8-weight and int4-weight (group 64) models (``quantize_model``, as
  ``fromzero quantize`` makes them) with bf16 activations, which run PyTorch's packed CPU
  kernels (``fromzero.compression.quantize``): the same figures;
* with ``--compile``: fromzero with ``torch.compile(model.forward, dynamic=True)`` in fp32 and
  bf16 (tokens checked against eager), against transformers' eager figures of the same dtype.

Interleaved rounds: every round runs every row once (order rotated each round) and the
figures are medians over rounds, so a noisy neighbour slows all rows alike. ``--cpu-time``
times with the thread's CPU time instead (``time.thread_time``; meaningful with 1 thread only), a
figure that contention on a shared machine barely moves. On a machine whose cores are busy with
other work, OpenMP's default spin-waiting makes every multi-threaded matmul wait for a
descheduled thread (2 threads ran ~10x slower than 1 here); ``OMP_WAIT_POLICY=PASSIVE`` (read
when torch starts; recorded in the JSON) avoids that for both sides alike.

Writes benchmarks/results/llm_generate.json (or --out).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fromzero.models.gpt import GPT  # noqa: E402

PROMPT_TEXT = (
    "The history of the Roman Empire spans many centuries, from the founding of the city on the "
    "banks of the Tiber to the fall of Constantinople in 1453. Historians still argue about why an "
    "empire that had survived civil wars, plagues and invasions finally broke apart in the west. "
    "Some point to the economy, which depended on conquest and slave labour; others to the army, "
    "whose generals made and unmade emperors; others again to the sheer size of the territory, "
    "which no single court could govern. In this essay we look at the evidence for each of these "
    "explanations in turn, and ask what the people who lived through the decline thought of it."
)

SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                     rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                     bos_token_id=1, eos_token_id=2, pad_token_id=2)


def random_checkpoint(tmp: Path) -> Path:
    """SmolLM2's architecture with seeded random weights, saved by transformers, converted."""
    import transformers

    from fromzero.models.hf import convert_from_hf

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOLLM2_SHAPE))
    hf.save_pretrained(tmp / "hf-random")
    convert_from_hf(str(tmp / "hf-random"), tmp / "fz-random")
    return tmp / "fz-random"


def load_pair(checkpoint: Path, tmp: Path) -> tuple[GPT, Callable[[torch.dtype], torch.nn.Module]]:
    """(fromzero fp32 model, a function giving transformers' model in a dtype), same weights."""
    import transformers

    from fromzero.models.hf import convert_to_hf
    from fromzero.checkpoint import load_model

    model = load_model(checkpoint).eval()
    if not isinstance(model, GPT):
        raise SystemExit(f"{checkpoint} is not a GPT/LLaMA checkpoint")
    hf_dir = tmp / "hf"
    convert_to_hf(checkpoint, hf_dir)

    def hf_model(dtype: torch.dtype) -> torch.nn.Module:
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).eval()
        hf.generation_config.eos_token_id = None  # generate exactly max_new_tokens
        hf.generation_config.pad_token_id = 0
        return hf

    return model, hf_model


def prompt_ids(checkpoint: Path, n: int, random_ids: bool, vocab: int) -> torch.Tensor:
    if random_ids:
        return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(0))
    from fromzero.data.tokenizers import TextTokenizer

    ids = TextTokenizer.load(checkpoint / "tokenizer.json").encode(PROMPT_TEXT)
    if len(ids) < n:
        raise SystemExit(f"the prompt text has only {len(ids)} tokens; ask for --prompt-tokens <= {len(ids)}")
    return torch.tensor([ids[:n]])


def quantized(model: GPT, method: str) -> GPT:
    from fromzero.models.quantized import QuantizeOptions, quantize_model

    q = copy.deepcopy(model)
    q.use_decode_layout(False)
    quantize_model(q, QuantizeOptions(method=method, group_size=64))
    return q.to(torch.bfloat16).eval()  # bf16 activations: PyTorch's packed int8 / int4 CPU kernels


class Stamps(list):
    """Clock readings taken once per decoding step of the running generate call (a list)."""

    clock: Callable[[], float] = time.perf_counter

    def stamp(self) -> None:
        self.append(self.clock())

    def step_seconds(self) -> list[float]:
        """Seconds of each step after the first (the first includes the prefill)."""
        return [b - a for a, b in zip(self, self[1:])]


def stamp_each_forward(model: GPT, stamps: Stamps) -> None:
    """Make every forward pass of ``model`` (one per generated token) record a reading (once per
    model: several cases share one model)."""
    if getattr(model, "_stamped", False):
        return
    model._stamped = True
    forward = model.forward

    def stamped(*args, **kwargs):
        out = forward(*args, **kwargs)
        stamps.stamp()
        return out

    model.forward = stamped


LOOKUP = 8  # draft tokens of prompt-lookup decoding, both sides (fromzero's default)


def runners(fz: GPT, hf: torch.nn.Module | None, idx: torch.Tensor, new: int, stamps: Stamps,
            lookup: str = "default") -> dict[str, Callable]:
    """generate (new tokens) and prefill (1 new token) calls of one model pair; every step of
    either model records a reading in ``stamps`` (fromzero: after each forward pass;
    transformers: a stopping criterion that never stops, called once per step).

    lookup: ``default`` -- each library's default generate (fromzero drafts by prompt lookup,
    transformers does not); ``off`` -- neither drafts (fromzero ``lookup_tokens=0``); ``both``
    -- both draft by prompt lookup (transformers ``prompt_lookup_num_tokens``), like for like.
    """
    import transformers

    class Stamp(transformers.StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
            stamps.stamp()
            return torch.zeros(input_ids.size(0), dtype=torch.bool, device=input_ids.device)

    stamp_each_forward(fz, stamps)
    fz_kw = {"lookup_tokens": 0} if lookup == "off" else {"lookup_tokens": LOOKUP}
    out = {
        "fromzero": lambda: fz.generate(idx, new, temperature=0.0, **fz_kw),
        "fromzero_prefill": lambda: fz.generate(idx, 1, temperature=0.0, **fz_kw),
    }
    if hf is not None:
        mask = torch.ones_like(idx)
        criteria = transformers.StoppingCriteriaList([Stamp()])
        hf_kw = {"prompt_lookup_num_tokens": LOOKUP} if lookup == "both" else {}
        out["transformers"] = lambda: hf.generate(idx, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                                  stopping_criteria=criteria, **hf_kw)
        out["transformers_prefill"] = lambda: hf.generate(idx, attention_mask=mask, max_new_tokens=1,
                                                          do_sample=False)
    return out


def first_difference(a: torch.Tensor, b: torch.Tensor, start: int) -> int | None:
    """Index (among the new tokens) of the first token where a and b differ; None if equal."""
    if torch.equal(a, b):
        return None
    n = min(a.size(1), b.size(1))
    diff = (a[0, :n] != b[0, :n]).nonzero()
    return int(diff[0, 0]) - start if len(diff) else n - start


def measure(cases: dict[str, dict[str, Callable]], rounds: int, stamps: Stamps
            ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Seconds of each call of each case, and of each of its decoding steps, interleaved: every
    round runs everything once."""
    clock = stamps.clock
    calls = [(case, name, f) for case, fs in cases.items() for name, f in fs.items()]
    times: dict[str, list[float]] = {f"{case}/{name}": [] for case, name, _ in calls}
    steps: dict[str, list[float]] = {f"{case}/{name}": [] for case, name, _ in calls}
    with torch.inference_mode():
        for _, _, f in calls:  # warm-up: first-call paths, allocator, layout switch
            f()
        for r in range(rounds):
            shift = r % len(calls)
            for case, name, f in calls[shift:] + calls[:shift]:
                stamps.clear()
                t0 = clock()
                f()
                times[f"{case}/{name}"].append(clock() - t0)
                steps[f"{case}/{name}"] += stamps.step_seconds()
            print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()
                                                          if not k.endswith("prefill")), flush=True)
    return times, steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="smollm2-135m-instruct",
                    help="fromzero checkpoint directory, .gguf file or built-in name (default: smollm2-135m-instruct)")
    ap.add_argument("--random", action="store_true",
                    help="use SmolLM2's architecture with seeded random weights instead of --checkpoint")
    ap.add_argument("--threads", default="2,1", help="comma-separated torch thread counts, one block each (default 2,1)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds per thread count (median)")
    ap.add_argument("--new-tokens", type=int, default=256, help="tokens to generate per call")
    ap.add_argument("--prompt-tokens", type=int, default=100, help="prompt length in tokens")
    ap.add_argument("--no-quantized", action="store_true", help="skip the int8-weight / int4-weight rows")
    ap.add_argument("--compile", action="store_true",
                    help="add rows for fromzero with torch.compile'd forward passes (fp32, bf16; compiling takes minutes)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with the thread's CPU time instead of wall time (use with --threads 1)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "llm_generate.json"), help="JSON output")
    args = ap.parse_args()
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    stamps = Stamps()
    stamps.clock = time.thread_time if args.cpu_time else time.perf_counter
    new = args.new_tokens

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if args.random:
            checkpoint, source = random_checkpoint(tmp), "SmolLM2-135M architecture, random weights (seed 0)"
        else:
            from fromzero.models.builtin import resolve_model

            checkpoint, source = resolve_model(args.checkpoint), args.checkpoint
        fz32, hf_model = load_pair(checkpoint, tmp)
        idx = prompt_ids(checkpoint, args.prompt_tokens, args.random, fz32.config.vocab_size)
        P = idx.size(1)
        fz16 = copy.deepcopy(fz32).to(torch.bfloat16)
        hf32, hf16 = hf_model(torch.float32), hf_model(torch.bfloat16)
        torch.set_num_threads(threads[0])
        with torch.inference_mode():  # correctness first: same greedy tokens in fp32
            ref = hf32.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=new, do_sample=False)
            got = fz32.generate(idx, new, temperature=0.0, lookup_tokens=0)
            assert ref.shape == got.shape == (1, P + new), (ref.shape, got.shape)
            diff32 = first_difference(got, ref, P)
            assert diff32 is None, f"fp32 greedy tokens differ from transformers' from new token {diff32}"
            diff32_lookup = first_difference(fz32.generate(idx, new, temperature=0.0, lookup_tokens=LOOKUP), ref, P)
            assert diff32_lookup is None, f"fp32 lookup-decoded tokens differ from greedy from new token {diff32_lookup}"
            diff16_lookup = first_difference(fz16.generate(idx, new, temperature=0.0, lookup_tokens=LOOKUP),
                                             fz16.generate(idx, new, temperature=0.0, lookup_tokens=0), P)
            ref16 = hf16.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=new, do_sample=False)
            diff16 = first_difference(fz16.generate(idx, new, temperature=0.0, lookup_tokens=0), ref16, P)
        sample_text = None
        if not args.random:
            from fromzero.data.tokenizers import TextTokenizer

            sample_text = TextTokenizer.load(checkpoint / "tokenizer.json").decode(got[0, P:P + 40].tolist())
        int8, int4 = (None, None) if args.no_quantized else (quantized(fz32, "int8-weight"), quantized(fz32, "int4-weight"))
        compiled, compiled_same = {}, {}
        if args.compile:
            for name, m in (("fp32 compiled", fz32), ("bf16 compiled", fz16)):
                compiled[name] = copy.deepcopy(m)
                compiled[name].forward = torch.compile(compiled[name].forward, dynamic=True)
                with torch.inference_mode():  # compiles (minutes), and checks the tokens against eager
                    compiled_same[name] = torch.equal(compiled[name].generate(idx, new, temperature=0.0),
                                                      m.generate(idx, new, temperature=0.0))
        cases = {}
        for dtype, fz, hf in (("fp32", fz32, hf32), ("bf16", fz16, hf16)):
            cases[dtype] = runners(fz, hf, idx, new, stamps)  # each library's default: the bar
            cases[f"{dtype} no-lookup"] = runners(fz, hf, idx, new, stamps, "off")
            cases[f"{dtype} lookup"] = runners(fz, hf, idx, new, stamps, "both")
        for name, m in compiled.items():
            cases[name] = runners(m, None, idx, new, stamps)
        if not args.no_quantized:
            cases["int8-weight bf16"] = runners(int8, None, idx, new, stamps)
            cases["int4-weight bf16"] = runners(int4, None, idx, new, stamps)

        blocks = []
        for n_threads in threads:
            torch.set_num_threads(n_threads)
            times, steps = measure(cases, args.rounds, stamps)
            med = {k: statistics.median(v) for k, v in times.items()}
            rows = []
            for case in cases:
                row = {"case": case, "threads": n_threads}
                for side in ("fromzero", "transformers"):
                    if f"{case}/{side}" not in med:
                        continue
                    row.update({
                        f"{side}_tok_s": new / med[f"{case}/{side}"],
                        # A lookup pass yields several tokens: step figures only for one-token steps.
                        f"{side}_step_tok_s": (1 / statistics.median(steps[f"{case}/{side}"])
                                               if "no-lookup" in case or (side == "transformers" and " " not in case)
                                               else None),
                        f"{side}_prefill_tok_s": P / med[f"{case}/{side}_prefill"],
                        f"{side}_round_s": [round(t, 3) for t in times[f"{case}/{side}"]],
                    })
                if "transformers_tok_s" in row:
                    for what in ("", "step_", "prefill_"):
                        fz_v, tf_v = row[f"fromzero_{what}tok_s"], row[f"transformers_{what}tok_s"]
                        row[f"{what}speedup"] = fz_v / tf_v if fz_v and tf_v else None
                rows.append(row)
            for row in rows:  # compiled rows: against transformers (eager) in the same dtype
                if row["case"] in compiled:
                    eager = next(r for r in rows if r["case"] == row["case"].split()[0])
                    row["same_tokens_as_eager"] = compiled_same[row["case"]]
                    for what in ("", "step_", "prefill_"):
                        row[f"{what}speedup_vs_transformers_eager"] = (row[f"fromzero_{what}tok_s"]
                                                                       / eager[f"transformers_{what}tok_s"])
            blocks.append({"threads": n_threads, "rows": rows})
            print_block(blocks[-1], new, P, args.rounds, args.cpu_time)

    # The bar: each library's default generate (fromzero drafts by prompt lookup; see the rows
    # "no-lookup" and "lookup" for plain-vs-plain and lookup-vs-lookup).
    bars = {f"{r['case']}_threads{r['threads']}": r["speedup"] for b in blocks for r in b["rows"]
            if r["case"] in ("fp32", "bf16")}
    others = {f"{r['case']}_threads{r['threads']}": r["speedup"] for b in blocks for r in b["rows"]
              if r.get("speedup") and r["case"] not in ("fp32", "bf16")}
    result = {
        "model": source, "prompt_tokens": P, "new_tokens": new, "rounds": args.rounds,
        "clock": "thread CPU time" if args.cpu_time else "wall", "torch": torch.__version__,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "transformers": transformers.__version__, "transformers_attn": hf32.config._attn_implementation,
        "fp32_identical_tokens": diff32 is None, "bf16_first_different_token": diff16,
        "sample_continuation": sample_text, "compiled_rows": bool(compiled), "blocks": blocks, "bar": 1.5, "speedups": bars, "other_speedups": others,
        "fp32_lookup_identical_tokens": diff32_lookup is None, "bf16_lookup_first_different_token": diff16_lookup,
        "passes_bar": all(v >= 1.5 for v in bars.values()),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"fp32 greedy tokens identical to transformers: yes; bf16: "
          f"{'identical' if diff16 is None else f'first difference at new token {diff16}'}")
    print(f"prompt-lookup decoding == one-token greedy steps: fp32 yes; bf16: "
          f"{'identical' if diff16_lookup is None else f'first difference at new token {diff16_lookup}'}")
    if sample_text is not None:
        print(f"continuation (first 40 tokens): {sample_text!r}")
    print(f"wrote {out}")


def print_block(block: dict, new: int, P: int, rounds: int, cpu_time: bool) -> None:
    clock = "thread CPU time" if cpu_time else "wall time"
    print(f"\nbatch 1, greedy, {P} prompt + {new} new tokens, {block['threads']} thread(s), "
          f"median of {rounds} interleaved rounds ({clock})")
    print("  generate: new tokens / time of the whole call; step: 1 / median time of one decoding step; "
          "prefill: prompt tokens / time of a 1-token call")
    cols = [("generate", ""), ("step", "step_"), ("prefill", "prefill_")]
    print(f"{'case':<16}" + "".join(f"{name + ' fz':>13}{name + ' tf':>13}{'ratio':>7}" for name, _ in cols))
    for r in block["rows"]:
        line = f"{r['case']:<16}"
        for _, key in cols:
            fz, tf = r[f"fromzero_{key}tok_s"], r.get(f"transformers_{key}tok_s")
            vs_eager = r.get(f"{key}speedup_vs_transformers_eager")
            ratio = (f"{r[key + 'speedup']:>6.2f}x" if fz and tf else
                     (f"{vs_eager:>6.2f}x" if vs_eager else f"{'-':>7}"))
            line += (f"{fz:>13.1f}" if fz else f"{'-':>13}") + (f"{tf:>13.1f}" if tf else f"{'-':>13}") + ratio
        print(line)
    if any("same_tokens_as_eager" in r for r in block["rows"]):
        print("  compiled rows: ratio against transformers (eager) in the same dtype")


if __name__ == "__main__":
    main()
