import json

import torch

from florence.adapters.detection.evaluate import coco_evaluate, to_coco_detections


def _ground_truth(coco128, count: int = 16):
    from pycocotools.coco import COCO

    coco = COCO(str(coco128 / "instances.json"))
    image_ids = sorted(coco.getImgIds())[:count]
    return coco, image_ids


def _detections_from_ground_truth(coco, image_ids, shift: float = 0.0) -> list[dict]:
    category_ids = sorted(coco.getCatIds())
    detections = []
    for image_id in image_ids:
        annotations = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id)) if not a["iscrowd"]]
        boxes = torch.tensor([[x + shift, y, x + shift + w, y + h] for x, y, w, h in (a["bbox"] for a in annotations)])
        prediction = {
            "boxes": boxes.reshape(-1, 4),
            "scores": torch.ones(len(annotations)),
            "labels": torch.tensor([category_ids.index(a["category_id"]) for a in annotations], dtype=torch.long),
        }
        detections += to_coco_detections(image_id, prediction, category_ids)
    return detections


def test_ground_truth_predictions_give_ap_one(coco128):
    coco, image_ids = _ground_truth(coco128)

    metrics = coco_evaluate(coco, _detections_from_ground_truth(coco, image_ids), image_ids)

    assert metrics["AP"] == 1.0
    assert metrics["AP50"] == 1.0
    assert metrics["AP75"] == 1.0
    for size in ("APs", "APm", "APl"):
        assert metrics[size] in (1.0, -1.0)


def test_shifted_predictions_score_below_one(coco128):
    coco, image_ids = _ground_truth(coco128)

    metrics = coco_evaluate(coco, _detections_from_ground_truth(coco, image_ids, shift=8.0), image_ids)

    assert metrics["AP"] < 1.0
    assert metrics["AP50"] > metrics["AP75"]


def test_resize_scale_maps_boxes_back():
    prediction = {"boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0]]), "scores": torch.tensor([0.5]), "labels": torch.tensor([1])}

    records = to_coco_detections(7, prediction, [3, 9], scale=0.5)

    assert json.loads(json.dumps(records)) == [{"image_id": 7, "category_id": 9, "bbox": [20.0, 40.0, 40.0, 80.0], "score": 0.5}]


def test_no_detections_give_zero(coco128):
    coco, image_ids = _ground_truth(coco128, count=2)

    assert coco_evaluate(coco, [], image_ids)["AP"] == 0.0
