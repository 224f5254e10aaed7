"""``fromzero embed``, ``evaluate``, ``predict`` and ``explain``: use a checkpoint on inputs or a data split."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fromzero.cli import _add_parser
from fromzero.errors import FromzeroError


def _add_embed(sub: argparse._SubParsersAction) -> None:
    emb = _add_parser(sub, "embed", "sentence embeddings from an encoder checkpoint (JSON on stdout)",
                      description="Mean-pooled (over the attention mask), L2-normalised sentence embeddings, "
                      "as sentence-transformers computes them.\n\nexample:\n  fromzero embed --checkpoint "
                      "checkpoints/minilm --text 'A man is eating.' --text 'Someone eats.'", func=_cmd_embed)
    emb.add_argument("--checkpoint", required=True, help="encoder checkpoint directory (e.g. converted MiniLM)")
    emb.add_argument("--text", action="append", help="a sentence to embed (repeat for several)")
    emb.add_argument("--input", help="UTF-8 file with one sentence per line")
    emb.add_argument("--batch-size", type=int, default=32, help="sentences per forward pass")
    emb.add_argument("--no-normalize", action="store_true", help="skip L2 normalisation")
    emb.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    ev = _add_parser(sub, "evaluate", "score a checkpoint on a data split (metrics.json)", func=_cmd_evaluate,
                     description="Classifiers: accuracy, precision / recall / F1 (macro, weighted), per-class "
                     "report, confusion matrix. Language models: loss and perplexity. A chat model (a converted "
                     "chat model or an sft checkpoint) with --data rotten-tomatoes: asked for each review's "
                     "sentiment; accuracy / macro-F1 of its greedy reply (and how many replies name no label) "
                     "and of its first-token logits. Question answering: SQuAD exact match and F1 (in percent); "
                     "--data FILE scores every answerable question of a SQuAD .json / .jsonl file. Object detectors: COCO "
                     "mAP@[.5:.95], mAP@0.5, mAP@0.75, AR@100 and AP per class (pycocotools); --data a COCO folder "
                     "(<split>/annotations.json) or one annotation file."
                     "\n\nexamples:\n"
                     "  fromzero evaluate --checkpoint runs/latest/checkpoints/best --split test --out eval.json\n"
                     "  fromzero evaluate --checkpoint smollm2-135m-instruct --data rotten-tomatoes --limit 200\n"
                     "  fromzero evaluate --checkpoint runs/qa/checkpoints/best --data dev-v1.1.json")
    ev.add_argument("--checkpoint", required=True, help="checkpoint directory (a fine-tuned one, or a pretrained GPT)")
    ev.add_argument("--data", help="data source (default: the data of the run that made the checkpoint); "
                    "for a pretrained GPT a prepared data directory")
    ev.add_argument("--split", default="test", help="train | val | test")
    ev.add_argument("--out", help="write the metrics to this JSON file (+ a confusion-matrix PNG)")
    ev.add_argument("--batch-size", type=int, default=64, help="examples per forward pass")
    ev.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    ev.add_argument("--limit", type=int, default=0,
                    help="score only the first N examples of the split (classifiers, chat models; 0 = all)")


def _add_predict(sub: argparse._SubParsersAction) -> None:
    pr = _add_parser(sub, "predict", "label texts or images with a classifier, answer questions, translate, or "
                     "recommend items to a user (JSON lines on stdout)",
                     description="A classifier: one JSON object per input, the label and every class's "
                     "probability.\nA question-answering checkpoint: the answer (a span of the context: its text, "
                     "character offsets start / end, and its probability among the best spans).\nA translation "
                     "checkpoint: the translation of each --text (as fromzero translate, with its defaults).\n"
                     "A recommender (--user): one JSON object per recommended item, best first "
                     "(rank, item, title and genres when the data has them, score), leaving out the "
                     "items the user already has in the training data.\nAn object detector (--image): one JSON "
                     "object per box scoring >= --threshold (image, label, score, box [x, y, w, h] in pixels); "
                     "--out draws them on a PNG.\n\n"
                     "examples:\n  fromzero predict --checkpoint runs/latest/checkpoints/best --text 'Exeunt.'\n"
                     "  fromzero predict --checkpoint runs/DIGITS/checkpoints/best --image 3.png\n"
                     "  fromzero predict --checkpoint runs/qa/checkpoints/best --question 'Who says \"Speak\"?' "
                     "--context-file scene.txt\n"
                     "  fromzero predict --checkpoint runs/movielens-neumf --user 196 --k 10\n"
                     "  fromzero predict --checkpoint runs/mnist-centernet/checkpoints/best --image scene.png "
                     "--out boxes.png",
                     func=_cmd_predict)
    pr.add_argument("--checkpoint", required=True,
                    help="a classifier, question-answering or translation checkpoint directory, or a "
                    "recommendation checkpoint or run directory")
    pr.add_argument("--user", help="recommenders: the raw user id to recommend items to")
    pr.add_argument("--k", type=int, default=10, help="recommenders: how many items to list")
    pr.add_argument("--rated", help="recommenders: a CSV with an item column (and optionally user) of "
                    "further items the user has rated, left out too")
    pr.add_argument("--text", action="append", help="a text to label (repeat for several)")
    pr.add_argument("--image", action="append", help="an image file to label (repeat for several)")
    pr.add_argument("--input", help="texts: .txt (one per line), .csv or .jsonl with 'text'; images: a folder; "
                    "questions: a SQuAD .json or .jsonl with context and question (answers optional)")
    pr.add_argument("--question", action="append", help="a question about --context (repeat for several)")
    pr.add_argument("--context", help="the text the answers are taken from")
    pr.add_argument("--context-file", help="a UTF-8 file holding the context")
    pr.add_argument("--threshold", type=float, default=0.3, help="detectors: lowest score of a box listed / drawn")
    pr.add_argument("--out", help="detectors: draw the boxes into this PNG (several images: a folder that receives "
                    "<name>.boxes.png each)")
    pr.add_argument("--force", action="store_true", help="detectors: replace existing --out files")
    pr.add_argument("--batch-size", type=int, default=64, help="inputs per forward pass")
    pr.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")


def _add_explain(sub: argparse._SubParsersAction) -> None:
    xp = _add_parser(sub, "explain", "explain a checkpoint's decision: token attributions, Grad-CAM, attention maps",
                     description="ig: Integrated Gradients of the tokens of a text classifier (HTML page + JSON).\n"
                     "gradcam: Grad-CAM heat map over the image of a CNN / ResNet / ViT classifier (PNG + JSON).\n"
                     "attention: attention maps per layer and head of a BERT, ViT or GPT (PNG grid + JSON).\n"
                     "Files go to --out as NNN.METHOD.{html,png,json}, one set per input.\n\n"
                     "examples:\n  fromzero explain --checkpoint runs/latest/checkpoints/best --text 'the film was good'\n"
                     "  fromzero explain --checkpoint runs/DIGITS/checkpoints/best --image 3.png --method gradcam\n"
                     "  fromzero explain --checkpoint runs/latest/checkpoints/best --text 'ROMEO:' --method attention",
                     func=_cmd_explain)
    xp.add_argument("--checkpoint", required=True, help="checkpoint directory (classifier, LoRA adapter, BERT, ViT, GPT)")
    xp.add_argument("--text", action="append", help="a text to explain (repeat for several)")
    xp.add_argument("--image", action="append", help="an image file to explain (repeat for several)")
    xp.add_argument("--input", help="texts: .txt (one per line), .csv or .jsonl with 'text'; images: a folder or a list of paths")
    xp.add_argument("--method", default="auto",
                    help="ig (text classifiers) | gradcam (image classifiers) | attention (transformers) | "
                    "auto (ig, else gradcam, else attention)")
    xp.add_argument("--target", default="auto", help="ig / gradcam: the class to explain, by name (auto: the predicted one)")
    xp.add_argument("--steps", type=int, default=50, help="ig: integration steps (raise when the delta is large)")
    xp.add_argument("--baseline", default="pad", help="ig: the token replacing every word in the baseline: pad | mask")
    xp.add_argument("--out", default="runs/explanations", help="output directory (under runs/, which git ignores)")
    xp.add_argument("--force", action="store_true", help="overwrite existing output files")
    xp.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")


def _cmd_embed(args: argparse.Namespace) -> int:
    from fromzero.models.bert import embed_checkpoint
    from fromzero.devices import resolve_device

    texts = list(args.text or [])
    if args.input:
        try:
            texts += [line for line in Path(args.input).read_text(encoding="utf-8").splitlines() if line.strip()]
        except OSError as e:
            raise FromzeroError(f"cannot read --input {args.input}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise FromzeroError(f"--input {args.input} is not UTF-8 text") from None
    if not texts:
        raise FromzeroError("nothing to embed: give --text TEXT (repeatable) or --input FILE")
    if args.batch_size <= 0:
        raise FromzeroError("--batch-size must be positive")
    vectors = embed_checkpoint(
        Path(args.checkpoint), texts, normalize=not args.no_normalize, batch_size=args.batch_size,
        device=resolve_device(args.device),
    )
    json.dump({"model": str(args.checkpoint), "dim": len(vectors[0]), "normalized": not args.no_normalize,
               "embeddings": vectors}, sys.stdout)
    sys.stdout.write("\n")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from fromzero.evaluation.metrics import format_report
    from fromzero.inference.predict import evaluate_checkpoint, to_json_line, write_evaluation

    metrics = evaluate_checkpoint(Path(args.checkpoint), args.data, args.split, args.batch_size, args.device,
                                  limit=args.limit)
    if metrics.get("task") == "chat-classification":  # a chat model asked for labels
        from fromzero.inference.chat_eval import format_chat_report

        print(format_chat_report(metrics))
    elif metrics.get("task") == "object-detection":
        from fromzero.evaluation.detection import format_detection_report

        print(format_detection_report(metrics))
    elif "confusion_matrix" in metrics:
        print(format_report(metrics))
    else:
        print(to_json_line(metrics))
    if args.out:
        write_evaluation(metrics, Path(args.out))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from fromzero.checkpoint import checkpoint_info
    from fromzero.inference.predict import Classifier, read_inputs, recommend_for_user, to_json_line
    from fromzero.tasks import get_task

    if args.user is not None:
        if args.text or args.image or args.input:
            raise FromzeroError("--user (a recommender) takes no --text, --image or --input")
        if args.k <= 0:
            raise FromzeroError(f"--k must be positive, got {args.k}")
        rated = Path(args.rated) if args.rated else None
        for row in recommend_for_user(Path(args.checkpoint), args.user, args.k, rated, args.device):
            print(to_json_line(row))
        return 0
    if args.rated:
        raise FromzeroError("--rated goes with --user (recommenders)")
    about = get_task(checkpoint_info(Path(args.checkpoint)).get("task"))
    if about is not None and about.kind == "recommender":
        raise FromzeroError(f"{args.checkpoint} is a recommender: give --user USER (and --k N) to list its top items")
    if about is not None and about.is_reader:
        return _answer_questions(args)
    if about is not None and about.kind == "detector":
        return _detect_boxes(args)
    if args.out:
        raise FromzeroError("--out draws boxes: it is for object-detection checkpoints")
    if about is not None and about.kind == "translator":  # the same as `fromzero translate` with its defaults
        if args.image or args.question or args.context is not None or args.context_file:
            raise FromzeroError(f"{args.checkpoint} translates texts: give --text or --input")
        return _cmd_translate(argparse.Namespace(**{**vars(args), "beams": 0, "length_penalty": None,
                                                    "max_new_tokens": 0}))
    if args.question or args.context is not None or args.context_file:
        raise FromzeroError(f"{args.checkpoint} is not a question-answering checkpoint: --question, --context "
                            "and --context-file are for those")
    if bool(args.text) + bool(args.image) + bool(args.input) != 1:
        raise FromzeroError("give exactly one of --text, --image or --input (or --user for a recommender)")
    classifier = Classifier(Path(args.checkpoint), args.device)
    if args.image or (args.input and classifier.inputs == "image"):
        paths = [Path(p) for p in args.image] if args.image else _image_inputs(Path(args.input))
        inputs: list[str] = [str(p) for p in paths]
        logits = classifier.image_logits(paths)
    else:
        inputs = list(args.text) if args.text else read_inputs(Path(args.input))
        logits = classifier.text_logits(inputs, args.batch_size)
    for item, result in zip(inputs, classifier.label(logits)):
        print(to_json_line({"input": item, **result}))
    return 0


def _detect_boxes(args: argparse.Namespace) -> int:
    """predict with an object-detection checkpoint: --image (repeatable) or --input (a folder or a list)."""
    from fromzero.inference.detection import predict_boxes
    from fromzero.inference.predict import to_json_line

    if args.text or args.question or args.context is not None or args.context_file:
        raise FromzeroError(f"{args.checkpoint} detects objects in images: give --image or --input")
    if bool(args.image) + bool(args.input) != 1:
        raise FromzeroError("give --image FILE (repeatable) or --input (a folder of images or a list of paths)")
    paths = [Path(p) for p in args.image] if args.image else _image_inputs(Path(args.input))
    rows = predict_boxes(Path(args.checkpoint), paths, args.threshold, Path(args.out) if args.out else None,
                         args.force, args.device)
    for row in rows:
        print(to_json_line(row))
    if args.out:
        print(f"drew {len(rows)} boxes on {args.out}", file=sys.stderr)
    return 0


def _answer_questions(args: argparse.Namespace) -> int:
    """predict with a question-answering checkpoint: --question (+ --context / --context-file) or --input."""
    from fromzero.data.qa import QAExample, read_qa_file
    from fromzero.finetune.qa import Reader
    from fromzero.inference.predict import to_json_line

    if args.text or args.image:
        raise FromzeroError(f"{args.checkpoint} answers questions: give --question with --context or "
                            "--context-file, or --input FILE")
    if bool(args.question) + bool(args.input) != 1:
        raise FromzeroError("give --question (with --context or --context-file) or --input FILE, not both")
    if args.input:
        if args.context is not None or args.context_file:
            raise FromzeroError("--input holds its own contexts: drop --context / --context-file")
        examples = read_qa_file(Path(args.input), require_answers=False).examples
        if not examples:
            raise FromzeroError(f"{args.input} holds no questions")
    else:
        if (args.context is not None) + bool(args.context_file) != 1:
            raise FromzeroError("give the context once: --context TEXT or --context-file FILE")
        context = args.context
        if args.context_file:
            try:
                context = Path(args.context_file).read_text(encoding="utf-8-sig")
            except FileNotFoundError:
                raise FromzeroError(f"context file not found: {args.context_file}") from None
            except (OSError, UnicodeDecodeError) as e:
                raise FromzeroError(f"cannot read --context-file {args.context_file}: {e}") from None
        if not context.strip():
            raise FromzeroError("the context is empty")
        if any(not q.strip() for q in args.question):
            raise FromzeroError("a --question is empty")
        examples = [QAExample(str(n), q, context) for n, q in enumerate(args.question)]
    answers, _ = Reader(Path(args.checkpoint), args.device).answer(examples, args.batch_size)
    for ex, a in zip(examples, answers):
        row = {"id": ex.id} if args.input else {}
        print(to_json_line({**row, "question": ex.question, "answer": a["answer"], "start": a["start"],
                            "end": a["end"], "probability": round(a["probability"], 6)}))
    return 0


def _add_translate(sub: argparse._SubParsersAction) -> None:
    tr = _add_parser(sub, "translate", "translate texts with a seq2seq checkpoint (JSON lines on stdout)",
                     description="One JSON object per input: the source and its translation, decoded by beam "
                     "search (the width the run was trained with, unless --beams).\n\nexamples:\n"
                     "  fromzero translate --checkpoint runs/g2p/checkpoints/best --text table --text fromzero\n"
                     "  fromzero translate --checkpoint runs/g2p/checkpoints/best --input words.txt --beams 1",
                     func=_cmd_translate)
    tr.add_argument("--checkpoint", required=True, help="translation checkpoint directory (fromzero finetune, "
                    "task translation)")
    tr.add_argument("--text", action="append", help="a text to translate (repeat for several)")
    tr.add_argument("--input", help="UTF-8 file with one text per line")
    tr.add_argument("--beams", type=int, default=0, help="beam width; 1 = greedy (0: the checkpoint's num_beams)")
    tr.add_argument("--length-penalty", type=float, default=None,
                    help="beam search: score = sum log p / length ** this (default: the checkpoint's)")
    tr.add_argument("--max-new-tokens", type=int, default=0,
                    help="longest output in tokens (0: the checkpoint's, a little more than its longest training target)")
    tr.add_argument("--batch-size", type=int, default=256, help="inputs decoded together")
    tr.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")


def _cmd_translate(args: argparse.Namespace) -> int:
    from fromzero.devices import resolve_device
    from fromzero.finetune.translation import load_translator, translate_batch
    from fromzero.inference.predict import read_inputs, to_json_line

    if bool(args.text) + bool(args.input) != 1:
        raise FromzeroError("give exactly one of --text or --input")
    if args.beams < 0 or args.max_new_tokens < 0 or args.batch_size < 1:
        raise FromzeroError("--beams and --max-new-tokens must be >= 0 and --batch-size >= 1")
    device = resolve_device(args.device)
    model, vocab, info = load_translator(args.checkpoint, device)
    texts = list(args.text) if args.text else read_inputs(Path(args.input))
    beams = args.beams or int(info.get("num_beams", 1))
    penalty = args.length_penalty if args.length_penalty is not None else float(info.get("length_penalty", 1.0))
    outputs = translate_batch(model, vocab, texts, device, beams, penalty, args.batch_size,
                              args.max_new_tokens or info.get("max_new_tokens"), strict=True)
    for text, output in zip(texts, outputs):
        print(to_json_line({"input": text, "translation": output}))
    return 0


def _image_inputs(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"))
        if not files:
            raise FromzeroError(f"{path} holds no images")
        return files
    if not path.is_file():
        raise FromzeroError(f"input not found: {path}")
    return [Path(line.strip()) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _cmd_explain(args: argparse.Namespace) -> int:
    from fromzero.inference.explain import ExplainConfig, Explainer, write_explanations
    from fromzero.inference.predict import read_inputs

    if bool(args.text) + bool(args.image) + bool(args.input) != 1:
        raise FromzeroError("give exactly one of --text, --image or --input")
    explainer = Explainer(ExplainConfig(checkpoint=args.checkpoint, method=args.method, target=args.target,
                                        steps=args.steps, baseline=args.baseline, out=args.out, force=args.force,
                                        device=args.device))
    texts, images = args.text, [Path(p) for p in args.image] if args.image else None
    if args.input:
        if explainer.takes_images:
            images = _image_inputs(Path(args.input))
        else:
            texts = read_inputs(Path(args.input))
    write_explanations(explainer, texts, images)
    return 0


# verb -> the function that adds its parser (cli.build_parser calls them in --help order)
PARSERS = {"embed": _add_embed, "evaluate": _add_evaluate, "predict": _add_predict, "translate": _add_translate,
           "explain": _add_explain}
