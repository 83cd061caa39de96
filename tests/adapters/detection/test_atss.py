import torch

from florence.adapters.detection.atss import (
    atss_assign,
    centerness_targets,
    decode_boxes,
    encode_boxes,
)


def _anchors() -> list[torch.Tensor]:
    # Level 0: six 10x10 anchors side by side in y [0, 10]; level 1: two 30x30 anchors in y [0, 30].
    level0 = torch.tensor([[x, 0, x + 10, 10] for x in range(0, 60, 10)], dtype=torch.float32)
    level1 = torch.tensor([[0, 0, 30, 30], [30, 0, 60, 30]], dtype=torch.float32)
    return [level0, level1]


def test_atss_hand_computed_positives():
    # Box 0 = [10, 0, 30, 10]. Candidates (3 nearest on level 0, both on level 1) have IoUs
    # 0.5, 0.5, 0 (anchors 1, 2 and one of 0 or 3) and 0.222, 0 (anchors 6, 7): mean 0.244,
    # unbiased std 0.250, threshold 0.495, so anchors 1 and 2 are positive.
    # Box 1 = [30, 0, 60, 14]. Candidates 3, 4, 5 have IoU 0.238 each, anchor 7 has 0.467 and
    # anchor 6 has 0: threshold 0.401. Anchor 7 passes it, but its centre (45, 15) lies below the
    # box, so box 1 gets no positive.
    boxes = torch.tensor([[10, 0, 30, 10], [30, 0, 60, 14]], dtype=torch.float32)

    assigned = atss_assign(_anchors(), boxes, top_k=3)

    assert assigned.tolist() == [-1, 0, 0, -1, -1, -1, -1, -1]


def test_atss_centre_inside_box_makes_positive():
    # Box 1 of the test above, 2 pixels taller: anchor 7's centre (45, 15) is now inside it.
    boxes = torch.tensor([[30, 0, 60, 16]], dtype=torch.float32)

    assigned = atss_assign(_anchors(), boxes, top_k=3)

    assert assigned.tolist() == [-1, -1, -1, -1, -1, -1, -1, 0]


def test_atss_overlap_goes_to_highest_iou():
    # The one anchor is the only candidate of both boxes; its IoU is 0.9 with box 0 and 0.9025 with box 1.
    level = [torch.tensor([[0, 0, 20, 20]], dtype=torch.float32)]
    boxes = torch.tensor([[0, 0, 20, 18], [1, 1, 20, 20]], dtype=torch.float32)

    assigned = atss_assign(level, boxes, top_k=1)

    assert assigned.tolist() == [1]


def test_atss_no_boxes_is_all_background():
    assigned = atss_assign(_anchors(), torch.zeros(0, 4), top_k=9)

    assert assigned.tolist() == [-1] * 8


def test_box_coder_round_trip():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 45.0, 25.0]])
    boxes = torch.tensor([[1.0, 2.0, 12.0, 9.0], [0.0, 10.0, 60.0, 30.0]])

    decoded = decode_boxes(anchors, encode_boxes(anchors, boxes))

    torch.testing.assert_close(decoded, boxes)


def test_centerness_centre_and_edge():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [-5.0, 0.0, 5.0, 10.0]])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]])

    targets = centerness_targets(anchors, boxes)

    assert targets[0].item() == 1.0
    assert targets[1].item() == 0.0
