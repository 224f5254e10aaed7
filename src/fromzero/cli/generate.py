"""``fromzero generate`` and ``fromzero chat``: text from a GPT checkpoint, one-shot or as a conversation."""

from __future__ import annotations

import argparse
from pathlib import Path

from fromzero.cli import _OWN_DEFAULT, _add_parser
from fromzero.errors import FromzeroError


def _add_generate(sub: argparse._SubParsersAction) -> None:
    gen = _add_parser(sub, "generate", "sample text from a checkpoint", func=_cmd_generate,
                      description="Sample a continuation of a prompt.\n\nexample:\n  fromzero generate "
                      "--checkpoint runs/latest/checkpoints/best --prompt 'ROMEO:' --max-new-tokens 300")
    gen.add_argument("--checkpoint", required=True, help="checkpoint directory (config.json, model.safetensors, tokenizer.json), "
                     "a .gguf file, or a built-in model: smollm2-135m-instruct (fetched and converted once; "
                     "every --checkpoint takes these)")
    gen.add_argument("--prompt", default="", help="text to continue")
    gen.add_argument("--prompt-file", help="read the prompt from this UTF-8 file instead")
    gen.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate")
    gen.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy")
    gen.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    gen.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest token set with this probability")
    gen.add_argument("--seed", type=int, default=1337, help="random seed (same seed, same text)")
    gen.add_argument("--num-samples", type=int, default=1, help="independent samples to draw")
    gen.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    gen.add_argument("--chat", action="store_true",
                     help="send the prompt as a user message in the checkpoint's chat template (as `fromzero chat` "
                     "does) and print only the reply")
    gen.add_argument("--system", default=None,
                     help="--chat: a system message before the prompt (default: none)" + _OWN_DEFAULT)
    gen.add_argument("--chat-template", metavar="FILE", default=None,
                     help="--chat: a Jinja chat template to use instead of the checkpoint's own (default: the "
                     "checkpoint's chat_template.jinja / tokenizer_config.json, else its SFT template)" + _OWN_DEFAULT)
    gen.add_argument("--no-cache", action="store_true", help="recompute attention over the whole context each step (slower; for checking)")
    gen.add_argument("--lookup-tokens", type=int, default=8,
                     help="greedy decoding (--temperature 0) of one sample: draft up to this many tokens by prompt "
                     "lookup (what followed the last few tokens where they occurred before) and check them in one "
                     "forward pass; same tokens in fp32, fewer passes when text repeats (its prompt, code, lists). "
                     "0 = one token per pass")


def _add_chat(sub: argparse._SubParsersAction) -> None:
    ch = _add_parser(
        sub, "chat", "chat with a chat model: an interactive multi-turn conversation", func=_cmd_chat,
        description="Type a message, get the reply streamed token by token. The conversation is rendered with "
        "the checkpoint's chat template: --chat-template FILE if given, else its own Jinja template "
        "(chat_template.jinja or tokenizer_config.json, kept by `convert`), else the SFT template of a "
        "`finetune --task sft` checkpoint. A reply ends at an end-of-text or end-of-turn token (e.g. "
        "<|im_end|>) or after --max-new-tokens.\n\nThe history is kept within the model's context "
        "(block_size - --max-new-tokens): the oldest messages are dropped (never the system message), and "
        "a note on stderr says so. /reset clears the history; /exit or Ctrl-D ends; Ctrl-C stops a reply "
        "(at the prompt: ends). Piped input is one message per line, and the replies (one per line) are all "
        "that goes to stdout.\n\nexamples:\n  fromzero chat --checkpoint checkpoints/smollm2 --system "
        "'You are a helpful assistant.'\n  printf 'Hi!\\nWhat is 2+2?\\n' | fromzero chat --checkpoint "
        "checkpoints/smollm2 --temperature 0",
    )
    ch.add_argument("--checkpoint", required=True, help="GPT checkpoint directory with a chat template (or see --chat-template)" + _OWN_DEFAULT)
    ch.add_argument("--system", default=None, help="system message that opens the conversation (default: none)" + _OWN_DEFAULT)
    ch.add_argument("--chat-template", metavar="FILE", default=None,
                    help="a Jinja chat template to use instead of the checkpoint's own (needed for a model without "
                    "one; default: the checkpoint's)" + _OWN_DEFAULT)
    ch.add_argument("--max-new-tokens", type=int, default=None,
                    help="longest reply in tokens (default: 512 or half the model's context, whichever is smaller)"
                    + _OWN_DEFAULT)
    ch.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 = greedy")
    ch.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens (default: all)" + _OWN_DEFAULT)
    ch.add_argument("--top-p", type=float, default=None,
                    help="nucleus sampling: smallest token set with this probability (default: off)" + _OWN_DEFAULT)
    ch.add_argument("--seed", type=int, default=1337, help="random seed (same seed and messages, same replies)")
    ch.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")


def _check_sampling(args: argparse.Namespace) -> None:
    """One-line errors for sampling options that cannot work (generate and chat share them)."""
    if args.temperature < 0:
        raise FromzeroError("--temperature must be >= 0 (0 = greedy)")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise FromzeroError("--top-p must be in (0, 1]")
    if args.top_k is not None and args.top_k <= 0:
        raise FromzeroError("--top-k must be positive")


def _cmd_generate(args: argparse.Namespace) -> int:
    from fromzero.inference.generate import generate_chat_replies, generate_text

    if args.max_new_tokens < 0:
        raise FromzeroError("--max-new-tokens must be >= 0")
    _check_sampling(args)
    if args.num_samples <= 0:
        raise FromzeroError("--num-samples must be positive")
    if args.lookup_tokens < 0:
        raise FromzeroError("--lookup-tokens must be >= 0 (0 = one token per forward pass)")
    if not args.chat and (args.system is not None or args.chat_template):
        raise FromzeroError("--system and --chat-template go with --chat")
    prompt = args.prompt
    if args.prompt_file:
        try:
            prompt = Path(args.prompt_file).read_text(encoding="utf-8")
        except OSError as e:
            raise FromzeroError(f"cannot read --prompt-file {args.prompt_file}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise FromzeroError(f"--prompt-file {args.prompt_file} is not UTF-8 text") from None
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed, num_samples=args.num_samples, device=args.device,
                    use_cache=not args.no_cache, lookup_tokens=args.lookup_tokens)
    if args.chat:  # one user message (plus --system) rendered as `chat` renders it; the reply only
        samples = generate_chat_replies(args.checkpoint, prompt, system=args.system,
                                        chat_template=args.chat_template, **sampling)
    else:
        samples = generate_text(args.checkpoint, prompt, **sampling)
    for i, text in enumerate(samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(text)
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from fromzero.inference.chat import COMMANDS_HELP, open_chat_session, run_repl

    _check_sampling(args)
    if args.max_new_tokens is not None and args.max_new_tokens <= 0:
        raise FromzeroError("--max-new-tokens must be positive")
    session = open_chat_session(args.checkpoint, args.chat_template, args.device, system=args.system,
                                max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    banner = (f"chatting with {args.checkpoint} (template: {session.chat.source}; {session.context}-token context, "
              f"replies up to {session.max_new_tokens} tokens). {COMMANDS_HELP}.")
    return run_repl(session, banner=banner)


# verb -> the function that adds its parser (cli.build_parser calls them in --help order)
def _add_generate_image(sub: argparse._SubParsersAction) -> None:
    gi = _add_parser(
        sub, "generate-image", "draw images with a diffusion checkpoint, from a class label or a text prompt",
        func=_cmd_generate_image,
        description="Sample images from an image-generation checkpoint (`fromzero finetune` with task "
        "image-generation, e.g. recipes/mnist-diffusion.yaml) and write them as one PNG grid. --prompt is any "
        "text, embedded by the checkpoint's sentence encoder (all-MiniLM-L6-v2); --label is a class name or "
        "index.\n\nexamples:\n  fromzero generate-image --checkpoint runs/mnist-diffusion/checkpoints/best "
        "--prompt 'a thick seven' --out seven.png\n  fromzero generate-image --checkpoint "
        "runs/mnist-diffusion/checkpoints/best --label 3 --num 64 --sampler ddpm --steps 200 --out threes.png")
    gi.add_argument("--checkpoint", required=True, help="image-generation checkpoint directory")
    gi.add_argument("--prompt", default=None, help="what to draw, in words (text-conditioned models)" + _OWN_DEFAULT)
    gi.add_argument("--label", default=None, help="what to draw, as a class name or index (class-conditioned "
                    "models)" + _OWN_DEFAULT)
    gi.add_argument("--num", type=int, default=16, help="images to draw")
    gi.add_argument("--steps", type=int, default=50, help="denoising steps")
    gi.add_argument("--guidance", type=float, default=3.0,
                    help="classifier-free guidance scale (1 = none; higher follows the condition more closely)")
    gi.add_argument("--seed", type=int, default=0, help="random seed (same seed, same images)")
    gi.add_argument("--sampler", default="ddim", choices=("ddim", "ddpm"),
                    help="ddim (deterministic) | ddpm (ancestral, fresh noise at each step)")
    gi.add_argument("--columns", type=int, default=0, help="images per row of the grid (0 = about square)")
    gi.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    gi.add_argument("--out", required=True, help="the PNG grid to write")
    gi.add_argument("--force", action="store_true", help="overwrite --out if it exists")


def _cmd_generate_image(args: argparse.Namespace) -> int:
    from fromzero.inference.generate_image import ImageSampling, generate_images, save_image_grid

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise FromzeroError(f"--out {out} must be a .png file")
    if out.exists() and not args.force:  # checked before the (slow) sampling
        raise FromzeroError(f"{out} exists: use --force to overwrite it")
    if args.columns < 0:
        raise FromzeroError(f"--columns must be >= 0, got {args.columns}")
    sampling = ImageSampling(num=args.num, steps=args.steps, guidance=args.guidance, seed=args.seed,
                             sampler=args.sampler, device=args.device)
    images = generate_images(args.checkpoint, prompt=args.prompt, label=args.label, sampling=sampling)
    path = save_image_grid(images, out, columns=args.columns, force=args.force)
    print(f"wrote {len(images)} images to {path}")
    return 0


PARSERS = {"generate": _add_generate, "chat": _add_chat, "generate-image": _add_generate_image}
