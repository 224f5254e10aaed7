"""Object detection: MNIST scenes, the COCO reader, CenterNet's targets / loss / decoding, COCO mAP
against hand-made cases, and the task end to end (training on real scenes, exact resume, predict,
evaluate, ONNX export, FCOS).

The real MNIST digits are read once per module (a small slice of each split is kept); every
dataset here is a few dozen 64 x 64 scenes, every model a few thousand parameters.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fromzero.data.detection import (INK, MAX_IOU, box_iou, ink_box, make_scenes, read_coco, read_coco_folder,
                                     write_coco_split)
from fromzero.data.mnist import CLASSES, ImageSplit
from fromzero.errors import FromzeroError
from fromzero.evaluation.detection import coco_metrics
from fromzero.models.centernet import decode, encode_targets, focal_loss

SIZES = {"train": 48, "val": 16, "test": 16}


@pytest.fixture(scope="module")
def mnist() -> dict[str, ImageSplit]:
    from fromzero.data.mnist import load_mnist

    full = load_mnist()
    return {name: ImageSplit(split.images[:300].clone(), split.labels[:300].clone())
            for name, split in full.items()}


@pytest.fixture(scope="module")
def coco_dir(mnist: dict[str, ImageSplit], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("scenes") / "data"
    for k, (split, n) in enumerate(SIZES.items()):
        scenes = make_scenes(mnist[split].images, mnist[split].labels, n, seed=k)
        write_coco_split(root / split, scenes, CLASSES)
    return root


def tiny_cfg(data: Path, out: Path, **overrides: Any) -> Any:
    from fromzero.finetune.detection import DetectionConfig

    values = dict(data_dir=str(data), arch="centernet", width=8, blocks=1, epochs=4, batch_size=8, lr=5e-3,
                  warmup_ratio=0.0, device="cpu", dtype="float32", out_dir=str(out), progress=False,
                  log_interval=1)
    cfg = DetectionConfig(**{**values, **overrides})
    cfg.validate()
    return cfg


@pytest.fixture(scope="module")
def run(coco_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fromzero.finetune.detection import finetune_detection

    out = tmp_path_factory.mktemp("det-run") / "R"
    finetune_detection(tiny_cfg(coco_dir, out))
    return out


# ---------------------------------------------------------------------------------------------
# Scenes and the COCO format


def test_scenes_have_tight_boxes_bounded_overlap_and_are_deterministic(mnist: dict[str, ImageSplit]) -> None:
    images, labels = mnist["train"].images, mnist["train"].labels
    scenes = make_scenes(images, labels, 40, seed=7)
    assert {len(s.boxes) for s in scenes} <= set(range(1, 6)) and max(len(s.boxes) for s in scenes) >= 4
    for s in scenes:
        assert s.labels == [int(labels[i]) for i in s.digits]
        ink = s.image >= INK
        covered = np.zeros_like(ink)
        for x, y, w, h in s.boxes:
            assert x >= 0 and y >= 0 and x + w <= 64 and y + h <= 64
            covered[y:y + h, x:x + w] = True
            inside = ink[y:y + h, x:x + w]  # every edge of a tight box touches ink
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
        assert not (ink & ~covered).any()  # no ink outside the boxes
        if len(s.boxes) == 1:
            assert ink_box(s.image) == s.boxes[0]  # one digit: its box is exactly the scene's ink box
        iou = box_iou(np.array(s.boxes), np.array(s.boxes))
        assert (iou[~np.eye(len(s.boxes), dtype=bool)] <= MAX_IOU + 1e-9).all()
    again = make_scenes(images, labels, 40, seed=7)
    assert all((a.image == b.image).all() and a.boxes == b.boxes for a, b in zip(scenes, again))
    assert any(a.boxes != b.boxes for a, b in zip(scenes, make_scenes(images, labels, 40, seed=8)))


def test_coco_round_trip(coco_dir: Path) -> None:
    splits, cats = read_coco_folder(coco_dir)
    assert [c["name"] for c in cats] == list(CLASSES)
    train = splits["train"]
    raw = json.loads((coco_dir / "train" / "annotations.json").read_text())
    assert len(train) == SIZES["train"] and train.num_objects == len(raw["annotations"])
    first = [a for a in raw["annotations"] if a["image_id"] == train.image_ids[0]]
    x, y, w, h = first[0]["bbox"]
    assert train.boxes[0][0].tolist() == [x, y, x + w, y + h]
    assert train.labels[0][0] == first[0]["category_id"]
    assert train.images[0].shape == (1, 64, 64) and train.images[0].dtype == torch.uint8


def _mutate(coco_dir: Path, tmp_path: Path, change: Any) -> Path:
    import shutil

    folder = tmp_path / "bad"
    shutil.copytree(coco_dir / "val", folder)
    data = json.loads((folder / "annotations.json").read_text())
    change(data, folder)
    (folder / "annotations.json").write_text(json.dumps(data))
    return folder / "annotations.json"


def _set_bbox(value: list) -> Any:
    return lambda d, f: d["annotations"][3].__setitem__("bbox", value)


BAD = {
    "missing image": (lambda d, f: (f / d["images"][2]["file_name"]).unlink(), ["image 2", "not found"]),
    "corrupt image": (lambda d, f: (f / d["images"][2]["file_name"]).write_bytes(b"\x89PNG\r\n\x1a\nnope"),
                      ["image 2", "not a readable image"]),
    "box outside": (_set_bbox([50, 10, 20, 10]), ["annotation 4", "outside image"]),
    "zero width": (_set_bbox([5, 5, 0, 10]), ["annotation 4", "width 0"]),
    "no annotations": (lambda d, f: d.__setitem__("annotations", []), ["holds no annotations"]),
    "unknown category": (lambda d, f: d["annotations"][3].__setitem__("category_id", 12),
                         ["annotation 4", "unknown category id 12"]),
    "duplicate image id": (lambda d, f: d["images"][1].__setitem__("id", d["images"][0]["id"]),
                           ["duplicate image id 0"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_coco_reader_refuses_bad_input(coco_dir: Path, tmp_path: Path, case: str) -> None:
    change, fragments = BAD[case]
    path = _mutate(coco_dir, tmp_path, change)
    with pytest.raises(FromzeroError) as e:
        read_coco(path)
    message = str(e.value)
    assert "\n" not in message and str(path) in message and all(f in message for f in fragments), message


def test_finetune_cli_refuses_bad_data_with_one_line(cli, one_line_error, coco_dir: Path,
                                                     tmp_path: Path) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(coco_dir, data)
    path = data / "test" / "annotations.json"
    raw = json.loads(path.read_text())
    raw["annotations"][0]["category_id"] = 42
    path.write_text(json.dumps(raw))
    out = tmp_path / "run"
    result = cli("finetune", "--config", "recipes/mnist-centernet.yaml", "--data.source", data,
                 "--out_dir", out)
    one_line_error(result, "unknown category id 42", "annotation 1")
    assert not out.exists()  # refused before the run directory was made


# ---------------------------------------------------------------------------------------------
# CenterNet: targets, loss, decoding


def test_target_heatmap_by_hand() -> None:
    # box [9, 8, 25, 32] px -> cells [2.25, 2, 6.25, 8]: centre (4.25, 5), size (4, 6), centre cell (4, 5)
    t = encode_targets([torch.tensor([[9.0, 8.0, 25.0, 32.0]])], [torch.tensor([3])], 10, 16, 16)
    assert t["heatmap"][0, 3, 5, 4] == 1.0 and t["heatmap"][0, 3].eq(1).sum() == 1
    assert t["heatmap"][0, 2].sum() == 0
    sx, sy = 0.54 * 4 / 6, 0.54 * 6 / 6
    assert math.isclose(float(t["heatmap"][0, 3, 5, 5]), math.exp(-1 / (2 * sx * sx)), rel_tol=1e-5)
    assert math.isclose(float(t["heatmap"][0, 3, 6, 4]), math.exp(-1 / (2 * sy * sy)), rel_tol=1e-5)
    assert t["size"][0, :, 5, 4].tolist() == [4.0, 6.0] and t["offset"][0, :, 5, 4].tolist() == [0.25, 0.0]
    assert t["mask"].sum() == 1 and t["mask"][0, 5, 4] == 1


def test_focal_loss_by_hand() -> None:
    logits = torch.tensor([0.0, 0.0, math.log(3.0)]).reshape(1, 1, 1, 3)   # p = 0.5, 0.5, 0.75
    target = torch.tensor([1.0, 0.5, 0.0]).reshape(1, 1, 1, 3)
    pos = 0.5 ** 2 * math.log(2)                                          # -(1-p)^2 log p
    neg = 0.5 ** 4 * 0.5 ** 2 * math.log(2) + 1.0 * 0.75 ** 2 * -math.log(0.25)  # -(1-y)^4 p^2 log(1-p)
    assert math.isclose(float(focal_loss(logits, target)), pos + neg, rel_tol=1e-6)


def test_decode_inverts_encode_on_a_real_scene(coco_dir: Path) -> None:
    split = read_coco(coco_dir / "val" / "annotations.json")
    i = max(range(len(split)), key=lambda j: len(split.boxes[j]))  # the busiest scene
    boxes, labels = split.boxes[i], split.labels[i]
    t = encode_targets([boxes], [labels], 10, 16, 16)
    out = decode(t["heatmap"], t["size"], t["offset"], threshold=0.999, logits=False)[0]
    order = torch.argsort(out["boxes"][:, 0] * 1000 + out["boxes"][:, 1])
    expect = torch.argsort(boxes[:, 0] * 1000 + boxes[:, 1])
    torch.testing.assert_close(out["boxes"][order], boxes[expect])
    assert out["labels"][order].tolist() == labels[expect].tolist()


# ---------------------------------------------------------------------------------------------
# COCO mAP against hand-made cases


def _gt(boxes: list[list[float]], cats: list[int], image_ids: list[int] | None = None,
        n_cats: int = 2) -> dict:
    """A COCO ground truth (annotation ids from 0 on purpose: COCOeval needs them renumbered)."""
    image_ids = image_ids or [0] * len(boxes)
    return {"images": [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.png"}
                       for i in sorted(set(image_ids))],
            "annotations": [{"id": k, "image_id": im, "category_id": c, "bbox": b, "area": b[2] * b[3],
                             "iscrowd": 0} for k, (b, c, im) in enumerate(zip(boxes, cats, image_ids))],
            "categories": [{"id": c, "name": f"c{c}"} for c in range(n_cats)]}


def _det(box: list[float], score: float, cat: int = 0, image_id: int = 0) -> dict:
    return {"image_id": image_id, "category_id": cat, "bbox": box, "score": score}


def test_map_perfect_predictions() -> None:
    gt = _gt([[10, 10, 20, 20], [50, 50, 30, 20]], [0, 1])
    m = coco_metrics(gt, [_det([10, 10, 20, 20], 0.9, 0), _det([50, 50, 30, 20], 0.8, 1)])
    assert m["map"] == pytest.approx(1.0) and m["map_50"] == pytest.approx(1.0)
    assert m["per_class"] == {"c0": {"ap": pytest.approx(1.0), "ap_50": pytest.approx(1.0)},
                              "c1": {"ap": pytest.approx(1.0), "ap_50": pytest.approx(1.0)}}


def test_map_a_shifted_box_counts_at_half_not_at_three_quarters() -> None:
    # 10 x 10 box moved 2 px: IoU 80 / 120 = 0.667, a match at IoU 0.50, 0.55, 0.60, 0.65 (4 of 10)
    m = coco_metrics(_gt([[10, 10, 10, 10]], [0], n_cats=1), [_det([12, 10, 10, 10], 0.9)])
    assert m["map_50"] == pytest.approx(1.0) and m["map_75"] == pytest.approx(0.0)
    assert m["map"] == pytest.approx(0.4)


def test_map_a_higher_scoring_false_positive_costs_what_it_should() -> None:
    # ranked: TP (0.95), FP (0.9), TP (0.8): recall 0.5 at precision 1, recall 1 at precision 2/3;
    # COCO's 101 recall points: 51 at precision 1 (recall 0..0.5), 50 at 2/3.
    gt = _gt([[10, 10, 20, 20], [60, 60, 20, 20]], [0, 0], n_cats=1)
    tp1, tp2 = _det([10, 10, 20, 20], 0.95), _det([60, 60, 20, 20], 0.8)
    m = coco_metrics(gt, [tp1, _det([40, 0, 20, 20], 0.9), tp2])
    assert m["map_50"] == pytest.approx((51 + 50 * 2 / 3) / 101, abs=1e-9)
    # the same false positive ranked last costs nothing
    m = coco_metrics(gt, [tp1, _det([40, 0, 20, 20], 0.5), tp2])
    assert m["map_50"] == pytest.approx(1.0)


def test_map_per_class_and_a_missed_class() -> None:
    gt = _gt([[10, 10, 20, 20], [50, 50, 20, 20]], [0, 1])
    m = coco_metrics(gt, [_det([10, 10, 20, 20], 0.9, 0)])
    assert m["per_class"]["c0"]["ap"] == pytest.approx(1.0)
    assert m["per_class"]["c1"]["ap"] == pytest.approx(0.0)
    assert m["map"] == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------
# The task end to end


def test_training_on_real_scenes_lowers_the_loss_and_writes_the_run(run: Path) -> None:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 4 * (SIZES["train"] // 8)
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4]), losses
    assert any("val_map_50" in r for r in rows) and any("test_map_50" in r for r in rows)
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["per_class"]) == set(CLASSES) and 0 <= metrics["map"] <= metrics["map_50"] <= 1
    for name in ("config.json", "model.safetensors", "info.json"):
        assert (run / "checkpoints" / "best" / name).is_file()
    assert (run / "plots" / "test_detections.png").is_file() and (run / "plots" / "loss.png").is_file()


def test_resume_is_exact(coco_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fromzero.finetune.detection import finetune_detection
    from tests.finetune.resume import assert_resume_is_exact

    assert_resume_is_exact(finetune_detection, lambda out: tiny_cfg(coco_dir, out, epochs=1, eval_every=2),
                           tmp_path, monkeypatch, stop_at=3)


def test_predict_prints_boxes_and_draws_a_png(cli, one_line_error, run: Path, coco_dir: Path,
                                              tmp_path: Path) -> None:
    from PIL import Image

    image = coco_dir / "test" / "images" / "000000.png"
    out = tmp_path / "boxes.png"
    best = run / "checkpoints" / "best"
    result = cli("predict", "--checkpoint", best, "--image", image, "--out", out, "--threshold", "0.01")
    assert result.code == 0, result.err
    rows = [json.loads(line) for line in result.out.splitlines()]
    assert rows and all(r["image"] == str(image) and r["label"] in CLASSES for r in rows)
    assert all(r["score"] >= 0.01 for r in rows)
    assert all(len(r["box"]) == 4 and r["box"][2] > 0 for r in rows)
    with Image.open(out) as im:
        assert im.size == (256, 256) and im.mode == "RGB"
    one_line_error(cli("predict", "--checkpoint", best, "--image", image, "--out", out), "already exists")
    folder = tmp_path / "drawn"
    result = cli("predict", "--checkpoint", best, "--input", coco_dir / "val" / "images", "--out", folder)
    assert result.code == 0, result.err
    assert len(list(folder.glob("*.boxes.png"))) == SIZES["val"]
    one_line_error(cli("predict", "--checkpoint", best, "--image", tmp_path / "nope.png"), "not found")


def test_evaluate_reproduces_the_test_metrics(cli, run: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    result = cli("evaluate", "--checkpoint", run / "checkpoints" / "best", "--out", out)
    assert result.code == 0, result.err
    assert "mAP@0.5" in result.out
    got, expected = json.loads(out.read_text()), json.loads((run / "metrics.json").read_text())
    for key in ("map", "map_50", "map_75", "ar_100"):
        assert got[key] == pytest.approx(expected[key], abs=1e-9), key


def test_onnx_export_matches_pytorch_heads_and_boxes(run: Path, tmp_path: Path) -> None:
    from fromzero.checkpoint import load_model
    from fromzero.inference.export import export_onnx, onnx_session

    best = run / "checkpoints" / "best"
    result = export_onnx(best, tmp_path / "det.onnx")
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-4
    assert [o.name for o in result.outputs] == ["heatmap", "size", "offset"]
    x = torch.rand(2, 1, 64, 64)
    got = onnx_session(tmp_path / "det.onnx").run(None, {"pixel_values": x.numpy()})
    model = load_model(best).eval()
    with torch.no_grad():
        want = decode(*model(x), threshold=0.05)
    for g, w in zip(decode(*(torch.from_numpy(a) for a in got), threshold=0.05), want):
        assert g["labels"].tolist() == w["labels"].tolist()
        torch.testing.assert_close(g["boxes"], w["boxes"], atol=1e-3, rtol=0)


def test_fcos_trains_saves_and_evaluates(cli, coco_dir: Path, tmp_path: Path) -> None:
    from fromzero.finetune.detection import finetune_detection

    out = tmp_path / "fcos"
    cfg = tiny_cfg(coco_dir, out, arch="fcos", image_size=32, fpn_channels=32, head_convs=1, epochs=1,
                   max_steps=2, lr=1e-3)
    summary = finetune_detection(cfg)
    assert math.isfinite(summary["test"]["map"])
    config = json.loads((out / "checkpoints" / "best" / "config.json").read_text())
    assert config["model_type"] == "fromzero-fcos" and config["labels"] == list(CLASSES)
    result = cli("evaluate", "--checkpoint", out / "checkpoints" / "best", "--out", tmp_path / "e.json")
    assert result.code == 0, result.err
    got = json.loads((tmp_path / "e.json").read_text())["map"]
    assert got == pytest.approx(summary["test"]["map"], abs=1e-9)


def test_export_images_writes_coco(cli, one_line_error, mnist: dict[str, ImageSplit], tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import fromzero.data.detection as detection
    import fromzero.data.mnist as mnist_module

    monkeypatch.setenv("FROMZERO_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(detection, "SCENES", {"train": 6, "val": 3, "test": 3})
    monkeypatch.setattr(mnist_module, "load_mnist", lambda: copy.copy(mnist))
    out = tmp_path / "export"
    result = cli("data", "export-images", "mnist-detection", out)
    assert result.code == 0, result.err
    splits, _ = read_coco_folder(out)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [6, 3, 3]
    assert json.loads((out / "meta.json").read_text())["max_iou"] == MAX_IOU
    one_line_error(cli("data", "export-images", "mnist-detection", out), "already exists")
