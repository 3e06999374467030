"""AutoAssign loss: hand-computed cases for each rule, and equality with the dense reference.

The hand-computed cases use one level of stride 8 with a 4 x 8 map (points x = 0, 8, ..., 56
and y = 0, 8, 16, 24), two classes, and float64.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision

from autoassign.model import assignment
from autoassign.model.box_ops import aligned_giou, aligned_iou
from autoassign.model.center_prior import CenterPrior
from autoassign.model.loss import LossInputError, autoassign_loss
from tests.loss_reference import dense_autoassign_loss

EPS = 1e-12
STRIDE, HEIGHT, WIDTH, NUM_CLASSES = 8, 4, 8, 2
F64 = torch.float64


# ------------------------------------------------------------------ hand-computation helpers


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def gaussian_prior(point, box, mean=(0.0, 0.0), sigma=(1.0, 1.0), stride=STRIDE) -> float:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    dx, dy = (point[0] - cx) / stride, (point[1] - cy) / stride
    return math.exp(-((dx - mean[0]) ** 2) / (2 * sigma[0] ** 2)) * math.exp(
        -((dy - mean[1]) ** 2) / (2 * sigma[1] ** 2)
    )


def iou_giou(a, b) -> tuple[float, float]:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(
        0.0, min(a[3], b[3]) - max(a[1], b[1])
    )
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    enclose = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union, inter / union - (enclose - union) / enclose


def decode(point, ltrb):
    return (point[0] - ltrb[0], point[1] - ltrb[1], point[0] + ltrb[2], point[1] + ltrb[3])


def box_bce(joints, gious, priors) -> float:
    """``-log P_g`` of one box from its inside points' joint probability, GIoU and prior."""
    p_pos = [j * math.exp(-5.0 * (1 - g)) for j, g in zip(joints, gious)]
    weights = [math.exp(3 * p) * w for p, w in zip(p_pos, priors)]
    return -math.log(sum(w * p for w, p in zip(weights, p_pos)) / sum(weights))


def normalised_neg_weights(row_max_ious) -> list[float]:
    t = [1 / (1 - iou) for iou in row_max_ious]
    return [1 - (x - min(t) + EPS) / (max(t) - min(t) + EPS) for x in t]


def focal_bce(x: float) -> float:
    return x * x * -math.log(1 - x)


def neg_sum(joint: torch.Tensor, weights: dict[tuple[int, int], float]) -> float:
    """``sum x^2 BCE(x, 0)`` over ``joint [P, C]`` with ``weights[(point, class)]`` applied."""
    total = sum(focal_bce(x) for x in joint.flatten().tolist())
    for (point, cls), w in weights.items():
        j = joint[point, cls].item()
        total += focal_bce(j * w) - focal_bce(j)
    return total


def index(point) -> int:
    return int(point[1] // STRIDE) * WIDTH + int(point[0] // STRIDE)


class Head:
    """Head outputs of one stride-8 level: logits 0 (probability 0.5), distances 1 pixel."""

    def __init__(self, batch: int = 1):
        self.cls = torch.zeros(batch, NUM_CLASSES, HEIGHT, WIDTH, dtype=F64)
        self.obj = torch.zeros(batch, 1, HEIGHT, WIDTH, dtype=F64)
        self.reg = torch.ones(batch, 4, HEIGHT, WIDTH, dtype=F64)

    def set(self, image, point, ltrb=None, cls=None, obj=None):
        row, col = int(point[1] // STRIDE), int(point[0] // STRIDE)
        if ltrb is not None:
            self.reg[image, :, row, col] = torch.tensor(ltrb, dtype=F64)
        if cls is not None:
            self.cls[image, :, row, col] = torch.tensor(cls, dtype=F64)
        if obj is not None:
            self.obj[image, 0, row, col] = obj

    def joint(self, image) -> torch.Tensor:
        """``[P, C]`` cls * obj probabilities, row-major points."""
        cls = self.cls[image].sigmoid().reshape(NUM_CLASSES, -1).T
        return cls * self.obj[image].sigmoid().reshape(-1, 1)

    def loss(self, boxes, labels, prior, **kwargs):
        self.leaves = [t.clone().requires_grad_() for t in (self.cls, self.reg, self.obj)]
        cls, reg, obj = self.leaves
        return autoassign_loss(
            [cls],
            [reg],
            [obj],
            [STRIDE],
            [torch.tensor(b, dtype=F64).reshape(-1, 4) for b in boxes],
            [torch.tensor(lab, dtype=torch.long) for lab in labels],
            prior,
            **kwargs,
        )


def make_prior(mean0=(0.0, 0.0), sigma0=(1.0, 1.0)) -> CenterPrior:
    prior = CenterPrior(NUM_CLASSES).double()
    with torch.no_grad():
        prior.mean[0] = torch.tensor(mean0, dtype=F64)
        prior.sigma[0] = torch.tensor(sigma0, dtype=F64)
    return prior


def grads_reach_everything(losses, head: Head, prior: CenterPrior) -> None:
    total = losses["loss_pos"] + losses["loss_neg"] + losses["loss_center"]
    total.backward()
    for tensor in (*head.leaves, prior.mean, prior.sigma):
        assert tensor.grad is not None


def test_aligned_iou_and_giou_match_torchvision_and_stay_finite_for_empty_boxes():
    gen = torch.Generator().manual_seed(5)
    corner = torch.rand(50, 2, generator=gen, dtype=F64) * 100
    a = torch.cat((corner, corner + torch.rand(50, 2, generator=gen, dtype=F64) * 50 + 1), 1)
    corner = torch.rand(50, 2, generator=gen, dtype=F64) * 100
    b = torch.cat((corner, corner + torch.rand(50, 2, generator=gen, dtype=F64) * 50 + 1), 1)
    torch.testing.assert_close(aligned_iou(a, b), torchvision.ops.box_iou(a, b).diagonal())
    giou = torchvision.ops.generalized_box_iou(a, b).diagonal()
    torch.testing.assert_close(aligned_giou(a, b), giou)
    point = torch.tensor([[5.0, 5.0, 5.0, 5.0]], dtype=F64, requires_grad=True)
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]], dtype=F64)
    value = aligned_giou(point, box)
    value.sum().backward()
    assert value.item() == pytest.approx(-(100 - 100) / 100) and aligned_iou(point, box) == 0
    assert torch.isfinite(point.grad).all()


# ---------------------------------------------------------------------------- the rules


def test_inside_is_strict_and_points_have_no_half_stride_offset():
    levels = assignment.make_levels([(HEIGHT, WIDTH)], [STRIDE], "cpu", F64)
    # Points 0, 8, 16 lie on the edges or inside of (0, 0, 16, 16): only (8, 8) is inside.
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0], [1.0, 1.0, 7.0, 7.0]], dtype=F64)
    box, point = assignment.inside_pairs(boxes, levels)
    assert box.tolist() == [0] and point.tolist() == [index((8, 8))]
    # (1, 1, 7, 7) holds no point; with FCOS's half-stride offset (4, 4) would be inside.
    head = Head()
    losses = head.loss([[[0.0, 0.0, 16.0, 16.0]]], [[0]], make_prior())
    assert losses["loss_center"].item() == pytest.approx(0.75 * 1 / 1.0)  # prior at the centre is 1
    losses = head.loss([[[1.0, 1.0, 7.0, 7.0]]], [[0]], make_prior())
    assert losses["loss_center"].item() == 0.0
    assert losses["loss_pos"].item() == pytest.approx(0.25 * 100.0)  # BCE's log clamp at -100


def test_positive_center_and_negative_losses_of_one_box():
    box = (4.0, 4.0, 20.0, 12.0)  # inside points A = (8, 8), B = (16, 8)
    a, b = (8.0, 8.0), (16.0, 8.0)
    ltrb_a, ltrb_b = (4.0, 4.0, 8.0, 4.0), (8.0, 8.0, 8.0, 8.0)
    head = Head()
    head.set(0, a, ltrb=ltrb_a, cls=(1.0, -2.0), obj=0.5)
    head.set(0, b, ltrb=ltrb_b)
    mean = (0.25, 0.0)
    prior = make_prior(mean0=mean)
    losses = head.loss([[box]], [[0]], prior)

    joint = head.joint(0)
    j_a, j_b = sigmoid(1.0) * sigmoid(0.5), 0.25
    assert joint[index(a), 0].item() == pytest.approx(j_a)
    iou_a, giou_a = iou_giou(decode(a, ltrb_a), box)
    iou_b, giou_b = iou_giou(decode(b, ltrb_b), box)
    assert (iou_a, giou_a) == pytest.approx((0.75, 0.75))
    assert (iou_b, giou_b) == pytest.approx((1 / 3, 1 / 3 - 0.1))
    prior_a, prior_b = gaussian_prior(a, box, mean), gaussian_prior(b, box, mean)
    assert (prior_a, prior_b) == pytest.approx((math.exp(-0.28125), math.exp(-0.03125)))

    bce = box_bce([j_a, j_b], [giou_a, giou_b], [prior_a, prior_b])
    assert losses["loss_pos"].item() == pytest.approx(0.25 * bce / 1, rel=1e-10)
    assert losses["loss_center"].item() == pytest.approx(0.75 * 1 / (prior_a + prior_b), rel=1e-10)
    w_a, w_b = normalised_neg_weights([iou_a, iou_b])
    assert w_a == pytest.approx(0.0) and w_b == pytest.approx(1.0)
    expected_neg = neg_sum(joint, {(index(a), 0): w_a, (index(b), 0): w_b})
    expected_neg = 0.75 * expected_neg / max(prior_a + prior_b, 1.0)  # S = 1.72 > 1
    assert losses["loss_neg"].item() == pytest.approx(expected_neg, rel=1e-10)
    grads_reach_everything(losses, head, prior)


def one_box_case():
    """The box and head of the one-box test: inside points A = (8, 8) and B = (16, 8)."""
    box = (4.0, 4.0, 20.0, 12.0)
    a, b = (8.0, 8.0), (16.0, 8.0)
    ltrb_a, ltrb_b = (4.0, 4.0, 8.0, 4.0), (8.0, 8.0, 8.0, 8.0)
    head = Head()
    head.set(0, a, ltrb=ltrb_a, cls=(1.0, -2.0), obj=0.5)
    head.set(0, b, ltrb=ltrb_b)
    gious = [iou_giou(decode(a, ltrb_a), box)[1], iou_giou(decode(b, ltrb_b), box)[1]]
    p_pos = [
        sigmoid(1.0) * sigmoid(0.5) * math.exp(-5.0 * (1 - gious[0])),
        0.25 * math.exp(-5.0 * (1 - gious[1])),
    ]
    return box, (a, b), head, p_pos


def test_without_confidence_weighting_the_prior_alone_weighs_the_positives():
    box, (a, b), head, p_pos = one_box_case()
    mean = (0.25, 0.0)
    losses = head.loss([[box]], [[0]], make_prior(mean0=mean), confidence_weighting=False)
    priors = [gaussian_prior(a, box, mean), gaussian_prior(b, box, mean)]
    weights = [w / sum(priors) for w in priors]  # w_i = prior_i, normalised per box
    assert weights == pytest.approx([0.4378235, 0.5621765], rel=1e-6)
    box_prob = sum(w * p for w, p in zip(weights, p_pos))
    assert losses["loss_pos"].item() == pytest.approx(0.25 * -math.log(box_prob), rel=1e-10)
    with_confidence = head.loss([[box]], [[0]], make_prior(mean0=mean))["loss_pos"].item()
    # exp(3 p_pos) favours A, whose p_pos is higher: P_g rises and the loss falls.
    assert p_pos[0] > p_pos[1] and with_confidence < losses["loss_pos"].item()


def test_uniform_prior_weighs_every_inside_point_alike():
    box, _, head, p_pos = one_box_case()
    prior = CenterPrior(NUM_CLASSES, kind="uniform").double()
    losses = head.loss([[box]], [[0]], prior)
    confidence = [math.exp(3 * p) for p in p_pos]  # times a prior of 1 at both points
    box_prob = sum(c * p for c, p in zip(confidence, p_pos)) / sum(confidence)
    assert losses["loss_pos"].item() == pytest.approx(0.25 * -math.log(box_prob), rel=1e-10)
    # loss_center = G / sum(prior) = 1 / 2; nothing in it is trained.
    assert losses["loss_center"].item() == pytest.approx(0.75 * 1 / 2, rel=1e-12)
    assert not losses["loss_center"].requires_grad
    assert not (prior.mean.requires_grad or prior.sigma.requires_grad)


def test_iou_row_max_is_taken_over_all_boxes_before_masking():
    box1 = (4.0, 4.0, 20.0, 12.0)  # class 0, inside points A = (8, 8) and B = (16, 8)
    box2 = (8.5, 8.5, 15.0, 15.0)  # class 1, no point strictly inside (A is outside it)
    a, b = (8.0, 8.0), (16.0, 8.0)
    ltrb_a, ltrb_b = (0.0, 0.0, 7.0, 7.0), (8.0, 4.0, 4.0, 4.0)
    head = Head()
    head.set(0, a, ltrb=ltrb_a, cls=(1.5, 0.0))
    head.set(0, b, ltrb=ltrb_b)
    losses = head.loss([[box1, box2]], [[0, 1]], make_prior())

    iou_a1, giou_a = iou_giou(decode(a, ltrb_a), box1)
    iou_a2, _ = iou_giou(decode(a, ltrb_a), box2)
    iou_b1, giou_b = iou_giou(decode(b, ltrb_b), box1)
    iou_b2, _ = iou_giou(decode(b, ltrb_b), box2)
    # A's best IoU is with box2, a box A is not inside, and it beats B's best.
    assert iou_a2 > iou_b1 > iou_a1 and iou_b1 > iou_b2
    weights = normalised_neg_weights([max(iou_a1, iou_a2), max(iou_b1, iou_b2)])
    masked_first = normalised_neg_weights([iou_a1, iou_b1])
    assert weights == pytest.approx([0.0, 1.0]) and masked_first == pytest.approx([1.0, 0.0])

    joint = head.joint(0)
    prior_sum = gaussian_prior(a, box1) + gaussian_prior(b, box1)
    expected = neg_sum(joint, {(index(a), 0): weights[0], (index(b), 0): weights[1]})
    wrong = neg_sum(joint, {(index(a), 0): masked_first[0], (index(b), 0): masked_first[1]})
    assert losses["loss_neg"].item() == pytest.approx(0.75 * expected / prior_sum, rel=1e-10)
    assert abs(expected - wrong) > 1e-3
    # box2 has no inside point: P = 0, BCE clamps its log at -100.
    bce1 = box_bce(
        [sigmoid(1.5) * 0.5, 0.25],
        [giou_a, giou_b],
        [gaussian_prior(a, box1), gaussian_prior(b, box1)],
    )
    assert losses["loss_pos"].item() == pytest.approx(0.25 * (bce1 + 100.0) / 2, rel=1e-10)
    assert losses["loss_center"].item() == pytest.approx(0.75 * 2 / prior_sum, rel=1e-10)


def three_point_head():
    """Points Y = (8, 8), X = (16, 8), Z = (24, 8) with predictions of growing IoU."""
    y, x, z = (8.0, 8.0), (16.0, 8.0), (24.0, 8.0)
    ltrb = {y: (2.0, 2.0, 2.0, 2.0), x: (4.0, 4.0, 4.0, 4.0), z: (8.0, 4.0, 4.0, 4.0)}
    head = Head()
    for point, distances in ltrb.items():
        head.set(0, point, ltrb=distances)
    return head, (y, x, z), ltrb


def test_negative_weights_are_normalised_per_box_over_its_inside_points():
    head, (y, x, z), ltrb = three_point_head()
    box = (4.0, 4.0, 28.0, 12.0)
    losses = head.loss([[box]], [[0]], make_prior())
    ious = [iou_giou(decode(p, ltrb[p]), box)[0] for p in (y, x, z)]
    assert ious == pytest.approx([16 / 192, 64 / 192, 96 / 192])
    weights = normalised_neg_weights(ious)
    assert weights[0] == pytest.approx(1.0) and weights[2] == pytest.approx(0.0)
    assert 0.1 < weights[1] < 0.9
    expected = neg_sum(head.joint(0), {(index(p), 0): w for p, w in zip((y, x, z), weights)})
    prior_sum = sum(gaussian_prior(p, box) for p in (y, x, z))
    assert losses["loss_neg"].item() == pytest.approx(0.75 * expected / prior_sum, rel=1e-10)


def test_point_inside_two_same_class_boxes_takes_the_higher_box_index():
    head, (y, x, z), ltrb = three_point_head()
    left, right = (4.0, 4.0, 20.0, 12.0), (12.0, 4.0, 28.0, 12.0)  # X is inside both
    row_max = {p: max(iou_giou(decode(p, ltrb[p]), b)[0] for b in (left, right)) for p in (y, x, z)}
    w_left = dict(zip((y, x), normalised_neg_weights([row_max[y], row_max[x]])))
    w_right = dict(zip((x, z), normalised_neg_weights([row_max[x], row_max[z]])))
    assert w_left[x] == pytest.approx(0.0) and w_right[x] == pytest.approx(1.0)
    prior_sum = sum(gaussian_prior(p, left) for p in (y, x)) + sum(
        gaussian_prior(p, right) for p in (x, z)
    )
    joint = head.joint(0)
    for boxes, last in (([left, right], w_right), ([right, left], w_left)):
        weights = {(index(p), 0): w for p, w in {**w_left, **w_right}.items()}
        weights[(index(x), 0)] = last[x]
        losses = head.loss([boxes], [[0, 0]], make_prior())
        expected = 0.75 * neg_sum(joint, weights) / prior_sum
        assert losses["loss_neg"].item() == pytest.approx(expected, rel=1e-10)
    # Different classes: each box writes its own class column, no overwrite.
    losses = head.loss([[left, right]], [[0, 1]], make_prior())
    weights = {(index(p), 0): w for p, w in w_left.items()}
    weights.update({(index(p), 1): w for p, w in w_right.items()})
    expected = 0.75 * neg_sum(joint, weights) / prior_sum
    assert losses["loss_neg"].item() == pytest.approx(expected, rel=1e-10)


def test_normalisers_over_a_batch():
    """loss_pos / N_gt, loss_neg / sum of priors, loss_center averaged over images."""
    head = Head(batch=2)
    box0 = (4.0, 4.0, 20.0, 12.0)  # image 0: points (8, 8), (16, 8)
    box1, tiny = (4.0, 4.0, 28.0, 12.0), (40.5, 0.5, 47.5, 7.5)  # image 1: 3 points, 0 points
    for image in (0, 1):
        head.set(image, (8.0, 8.0), ltrb=(2.0, 2.0, 2.0, 2.0))
        head.set(image, (16.0, 8.0), ltrb=(4.0, 4.0, 4.0, 4.0))
        head.set(image, (24.0, 8.0), ltrb=(8.0, 4.0, 4.0, 4.0), cls=(0.5, 0.0))
    losses = head.loss([[box0], [box1, tiny]], [[0], [0, 1]], make_prior())

    sums = []
    for image, box in ((0, box0), (1, box1)):
        points = [(8.0, 8.0), (16.0, 8.0)] + ([(24.0, 8.0)] if image == 1 else [])
        ltrb = [tuple(head.reg[image, :, 1, int(p[0] // 8)].tolist()) for p in points]
        joint = head.joint(image)
        joints = [joint[index(p), 0].item() for p in points]
        ious, gious = zip(*(iou_giou(decode(p, d), box) for p, d in zip(points, ltrb)))
        priors = [gaussian_prior(p, box) for p in points]
        weights = dict(zip([(index(p), 0) for p in points], normalised_neg_weights(ious)))
        sums.append((box_bce(joints, gious, priors), sum(priors), neg_sum(joint, weights)))
    (bce0, s0, neg0), (bce1, s1, neg1) = sums
    assert losses["loss_pos"].item() == pytest.approx(0.25 * (bce0 + bce1 + 100.0) / 3, rel=1e-10)
    assert losses["loss_neg"].item() == pytest.approx(0.75 * (neg0 + neg1) / (s0 + s1), rel=1e-10)
    assert losses["loss_center"].item() == pytest.approx(0.75 * (1 / s0 + 2 / s1) / 2, rel=1e-10)


def test_negative_normaliser_is_at_least_one():
    box = (4.0, 4.0, 20.0, 12.0)
    head = Head()
    prior = make_prior(mean0=(2.0, 2.0), sigma0=(0.5, 0.5))
    losses = head.loss([[box]], [[0]], prior)
    prior_sum = sum(gaussian_prior(p, box, (2, 2), (0.5, 0.5)) for p in ((8, 8), (16, 8)))
    assert prior_sum < 1e-3
    ious = [iou_giou(decode(p, (1, 1, 1, 1)), box)[0] for p in ((8, 8), (16, 8))]
    weights = dict(zip([(index((8, 8)), 0), (index((16, 8)), 0)], normalised_neg_weights(ious)))
    expected = 0.75 * neg_sum(head.joint(0), weights) / 1.0
    assert losses["loss_neg"].item() == pytest.approx(expected, rel=1e-10)
    assert losses["loss_center"].item() == pytest.approx(0.75 * 1 / prior_sum, rel=1e-8)


def test_image_without_boxes_in_a_batch_with_boxes():
    head = Head(batch=2)
    torch.manual_seed(0)
    head.cls.normal_()
    box = (4.0, 4.0, 20.0, 12.0)
    losses = head.loss([[box], []], [[0], []], make_prior())
    points = [(8.0, 8.0), (16.0, 8.0)]
    priors = [gaussian_prior(p, box) for p in points]
    ious, gious = zip(*(iou_giou(decode(p, (1, 1, 1, 1)), box) for p in points))
    joints = [head.joint(0)[index(p), 0].item() for p in points]
    weights = dict(zip([(index(p), 0) for p in points], normalised_neg_weights(ious)))
    neg = neg_sum(head.joint(0), weights) + neg_sum(head.joint(1), {})  # image 1: all background
    assert losses["loss_neg"].item() == pytest.approx(0.75 * neg / sum(priors), rel=1e-10)
    assert losses["loss_pos"].item() == pytest.approx(0.25 * box_bce(joints, gious, priors))
    # The image without boxes adds 0 to the mean over images.
    assert losses["loss_center"].item() == pytest.approx(0.75 * (1 / sum(priors) + 0) / 2)


def test_batch_without_boxes_is_zero_but_connected():
    head = Head(batch=2)
    torch.manual_seed(1)
    head.cls.normal_()
    head.obj.normal_()
    prior = make_prior()
    losses = head.loss([[], []], [[], []], prior)
    assert losses["loss_pos"].item() == 0.0 and losses["loss_center"].item() == 0.0
    x = (head.cls.sigmoid() * head.obj.sigmoid()).flatten()
    expected = 0.75 * float((x**2 * -torch.log1p(-x)).sum())  # normaliser 1
    assert losses["loss_neg"].item() == pytest.approx(expected, rel=1e-10)
    for name in ("loss_pos", "loss_center"):
        for tensor in (*head.leaves, prior.mean, prior.sigma):
            tensor.grad = None
        losses = head.loss([[], []], [[], []], prior)
        losses[name].backward()
        for tensor in (*head.leaves, prior.mean, prior.sigma):
            assert tensor.grad is not None, name
            assert float(tensor.grad.abs().sum()) == 0.0


def test_boxes_without_inside_points_keep_every_input_connected():
    head = Head()
    prior = make_prior()
    losses = head.loss([[(1.0, 1.0, 7.0, 7.0), (33.0, 9.0, 39.0, 15.0)]], [[0, 1]], prior)
    assert losses["loss_pos"].item() == pytest.approx(0.25 * 200.0 / 2)
    assert losses["loss_center"].item() == 0.0
    grads_reach_everything(losses, head, prior)


def test_gradients_reach_the_center_prior():
    head, _, _ = three_point_head()
    prior = make_prior(mean0=(0.3, -0.2), sigma0=(1.2, 0.9))
    losses = head.loss([[(4.0, 4.0, 28.0, 12.0)]], [[0]], prior)
    (losses["loss_pos"] + losses["loss_center"]).backward()
    assert prior.mean.grad[0].abs().min() > 0 and prior.sigma.grad[0].abs().min() > 0
    assert prior.mean.grad[1].tolist() == [0.0, 0.0]  # class 1 has no box
    # loss_center = 0.75 / sum(prior): its gradient w.r.t. mean_x, by hand.
    prior.mean.grad = None
    losses = head.loss([[(4.0, 4.0, 28.0, 12.0)]], [[0]], prior)
    losses["loss_center"].backward()
    points = [(8.0, 8.0), (16.0, 8.0), (24.0, 8.0)]
    values = [gaussian_prior(p, (4, 4, 28, 12), (0.3, -0.2), (1.2, 0.9)) for p in points]
    d_sum = sum(v * ((p[0] - 16) / 8 - 0.3) / 1.2**2 for v, p in zip(values, points))
    assert prior.mean.grad[0, 0].item() == pytest.approx(-0.75 / sum(values) ** 2 * d_sum)


def test_force_topk_marks_the_highest_prior_points_of_empty_boxes():
    box = (2.0, 2.0, 6.0, 6.0)  # no grid point strictly inside
    mean = (0.4, 0.4)
    head = Head()
    assert head.loss([[box]], [[0]], make_prior(mean0=mean))["loss_center"].item() == 0.0
    # Peak at (4 + 0.4 * 8) = 7.2 px: (8, 8) best, then (0, 8) and (8, 0) tied, (16, 8) next.
    losses = head.loss([[box]], [[0]], make_prior(mean0=mean), force_topk=3)
    chosen = [(8.0, 8.0), (8.0, 0.0), (0.0, 8.0)]
    priors = [gaussian_prior(p, box, mean) for p in chosen]
    assert losses["loss_center"].item() == pytest.approx(0.75 / sum(priors), rel=1e-10)
    ious, gious = zip(*(iou_giou(decode(p, (1, 1, 1, 1)), box) for p in chosen))
    bce = box_bce([0.25] * 3, gious, priors)
    assert losses["loss_pos"].item() == pytest.approx(0.25 * bce, rel=1e-10)

    # Over all levels: on stride 16 the points (16, 16), then (16, 0) and (0, 16) tie, beat
    # every stride-8 point but (8, 8); ties go to the lower point index.
    levels = assignment.make_levels([(4, 8), (2, 4)], [8, 16], "cpu", F64)
    boxes = torch.tensor([box], dtype=F64)
    box_ids, points = assignment.forced_pairs(
        boxes, torch.tensor([0]), torch.tensor([0]), levels, make_prior(mean0=mean), 3
    )
    level2 = 32  # first point of the stride-16 level
    assert box_ids.tolist() == [0, 0, 0]
    assert points.tolist() == [index((8, 8)), level2 + 1 * 4 + 1, level2 + 0 * 4 + 1]


def test_bad_inputs_raise_errors_naming_the_argument():
    head = Head()
    with pytest.raises(LossInputError, match=r"gt_labels\[0\] has values outside 0..1"):
        head.loss([[(4.0, 4.0, 20.0, 12.0)]], [[2]], make_prior())
    with pytest.raises(LossInputError, match=r"gt_boxes\[0\] has boxes with x2 < x1"):
        head.loss([[(4.0, 4.0, 2.0, 12.0)]], [[0]], make_prior())
    with pytest.raises(LossInputError, match="2 gt_boxes"):
        head.loss([[], []], [[], []], make_prior())
    with pytest.raises(LossInputError, match="center_prior has 3 classes"):
        head.loss([[]], [[]], CenterPrior(3).double())


def test_half_precision_outputs_are_computed_in_float32():
    head, _, _ = three_point_head()
    prior = make_prior().float()
    boxes, labels = [torch.tensor([[4.0, 4.0, 28.0, 12.0]])], [torch.tensor([0])]
    full = autoassign_loss(
        [head.cls.float()], [head.reg.float()], [head.obj.float()], [STRIDE], boxes, labels, prior
    )
    # As under AMP: half-precision logits, float32 distances.
    leaves = [head.cls.bfloat16(), head.reg.float(), head.obj.bfloat16()]
    leaves = [t.requires_grad_() for t in leaves]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = autoassign_loss(
            [leaves[0]], [leaves[1]], [leaves[2]], [STRIDE], boxes, labels, prior
        )
    sum(half.values()).backward()
    for name, value in half.items():
        assert value.dtype == torch.float32
        assert value.item() == pytest.approx(full[name].item(), rel=1e-5)
    assert [leaf.grad.dtype for leaf in leaves] == [torch.bfloat16, torch.float32, torch.bfloat16]


# ------------------------------------------------------ equality with the dense reference

IMAGE_HEIGHT, IMAGE_WIDTH, STRIDES = 256, 320, [8, 16, 32, 64, 128]


def random_batch(boxes_per_image, num_classes=4, dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sizes = [(math.ceil(IMAGE_HEIGHT / s), math.ceil(IMAGE_WIDTH / s)) for s in STRIDES]
    batch = len(boxes_per_image)
    cls = [torch.randn(batch, num_classes, h, w, generator=gen, dtype=dtype) for h, w in sizes]
    obj = [torch.randn(batch, 1, h, w, generator=gen, dtype=dtype) for h, w in sizes]
    reg = [
        torch.relu(torch.randn(batch, 4, h, w, generator=gen, dtype=dtype) + 0.5) * 3 * s
        for (h, w), s in zip(sizes, STRIDES)
    ]
    boxes, labels = [], []
    for count in boxes_per_image:
        corner = torch.rand(count, 2, generator=gen, dtype=dtype) * torch.tensor(
            [IMAGE_WIDTH, IMAGE_HEIGHT], dtype=dtype
        )
        size = torch.exp(torch.rand(count, 2, generator=gen, dtype=dtype) * 5.5)  # 1 to 245 px
        image_boxes = torch.cat((corner, corner + size), 1)
        image_labels = torch.randint(0, num_classes, (count,), generator=gen)
        # Overlapping same-class boxes: every fourth box is a jittered copy of an earlier one.
        for i in range(3, count, 4):
            j = int(torch.randint(0, i, (1,), generator=gen))
            jitter = torch.randn(4, generator=gen, dtype=dtype) * 4
            jittered = image_boxes[j] + jitter
            image_boxes[i, :2] = jittered[:2].minimum(jittered[2:])
            image_boxes[i, 2:] = jittered[:2].maximum(jittered[2:])
            image_labels[i] = image_labels[j]
        boxes.append(image_boxes)
        labels.append(image_labels)
    prior = CenterPrior(num_classes).to(dtype)
    with torch.no_grad():
        prior.mean.copy_(torch.randn(num_classes, 2, generator=gen) * 0.3)
        prior.sigma.copy_(0.6 + torch.rand(num_classes, 2, generator=gen))
    return cls, reg, obj, boxes, labels, prior


def losses_and_grads(loss_fn, cls, reg, obj, boxes, labels, prior, force_topk, **switches):
    leaves = [t.clone().requires_grad_() for t in (*cls, *reg, *obj)]
    n = len(STRIDES)
    prior.zero_grad(set_to_none=True)
    losses = loss_fn(
        leaves[:n], leaves[n : 2 * n], leaves[2 * n :], STRIDES, boxes, labels, prior,
        force_topk=force_topk, **switches,
    )  # fmt: skip
    total = 1.3 * losses["loss_pos"] + 0.7 * losses["loss_neg"] + 1.1 * losses["loss_center"]
    total.backward()
    grads = [t.grad for t in leaves]
    if prior.learnable:
        grads += [prior.mean.grad.clone(), prior.sigma.grad.clone()]
    return {k: v.item() for k, v in losses.items()}, grads


@pytest.mark.parametrize("force_topk", [0, 9])
@pytest.mark.parametrize("boxes_per_image", [(0, 0), (1, 1), (7, 7), (300, 300), (0, 7)])
def test_matches_dense_reference(boxes_per_image, force_topk):
    torch.set_num_threads(1)
    inputs = random_batch(boxes_per_image, seed=sum(boxes_per_image))
    sparse, sparse_grads = losses_and_grads(autoassign_loss, *inputs, force_topk)
    dense, dense_grads = losses_and_grads(dense_autoassign_loss, *inputs, force_topk)
    assert sparse == pytest.approx(dense, rel=1e-9, abs=1e-12)
    for got, want in zip(sparse_grads, dense_grads):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)
    if sum(boxes_per_image):
        assert sparse["loss_pos"] > 0 and sparse["loss_center"] > 0


@pytest.mark.parametrize(
    ("kind", "learnable", "confidence_weighting"),
    [("gaussian", True, False), ("gaussian", False, True), ("uniform", True, True)],
)
def test_ablations_match_the_dense_reference(kind, learnable, confidence_weighting):
    torch.set_num_threads(1)
    cls, reg, obj, boxes, labels, prior = random_batch((7, 30), seed=5)
    ablated = CenterPrior(4, kind=kind, learnable=learnable).double()
    with torch.no_grad():
        ablated.mean.copy_(prior.mean)
        ablated.sigma.copy_(prior.sigma)
    inputs = (cls, reg, obj, boxes, labels, ablated)
    switch = {"confidence_weighting": confidence_weighting}
    sparse, sparse_grads = losses_and_grads(autoassign_loss, *inputs, 9, **switch)
    dense, dense_grads = losses_and_grads(dense_autoassign_loss, *inputs, 9, **switch)
    assert sparse == pytest.approx(dense, rel=1e-9, abs=1e-12)
    assert len(sparse_grads) == len(dense_grads) == 15 + 2 * ablated.learnable
    for got, want in zip(sparse_grads, dense_grads):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)
    full, _ = losses_and_grads(autoassign_loss, cls, reg, obj, boxes, labels, prior, 9)
    if kind == "gaussian" and learnable:  # only the positive weights change
        assert sparse["loss_pos"] != pytest.approx(full["loss_pos"], rel=1e-6)
        assert (sparse["loss_neg"], sparse["loss_center"]) == pytest.approx(
            (full["loss_neg"], full["loss_center"]), rel=1e-12
        )
    elif kind == "gaussian":  # a fixed prior changes no value, only what is trained
        assert sparse == pytest.approx(full, rel=1e-12)


def test_matches_dense_reference_with_small_iou_tiles_and_chunks(monkeypatch):
    monkeypatch.setattr(assignment, "IOU_TILE", 2)
    monkeypatch.setattr(assignment, "IOU_CHUNK_PAIRS", 100)
    inputs = random_batch((120, 40), num_classes=5, seed=3)
    sparse, sparse_grads = losses_and_grads(autoassign_loss, *inputs, 9)
    dense, dense_grads = losses_and_grads(dense_autoassign_loss, *inputs, 9)
    assert sparse == pytest.approx(dense, rel=1e-9)
    for got, want in zip(sparse_grads, dense_grads):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)


def test_matches_dense_reference_in_float32():
    inputs = random_batch((50, 20), num_classes=3, dtype=torch.float32, seed=4)
    sparse, sparse_grads = losses_and_grads(autoassign_loss, *inputs, 0)
    dense, dense_grads = losses_and_grads(dense_autoassign_loss, *inputs, 0)
    assert sparse == pytest.approx(dense, rel=1e-5)
    for got, want in zip(sparse_grads, dense_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------- data-parallel normalisers


def _distributed_worker(rank, world_size, init_file, boxes_per_rank, results):
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        torch.set_num_threads(1)
        inputs = random_batch((boxes_per_rank[rank],), seed=10 + rank)
        losses = autoassign_loss(*inputs[:3], STRIDES, *inputs[3:])
        results[rank] = {k: v.item() for k, v in losses.items()}
    finally:
        dist.destroy_process_group()


def inside_prior_sum(boxes: torch.Tensor, labels: torch.Tensor, prior: CenterPrior) -> float:
    """Sum of the prior over all (point, box) pairs with the point strictly inside the box."""
    total = 0.0
    for stride in STRIDES:
        height, width = math.ceil(IMAGE_HEIGHT / stride), math.ceil(IMAGE_WIDTH / stride)
        xs = torch.arange(width, dtype=F64) * stride
        ys = torch.arange(height, dtype=F64) * stride
        for box, label in zip(boxes, labels):
            cols = xs[(xs > box[0]) & (xs < box[2])]
            rows = ys[(ys > box[1]) & (ys < box[3])]
            gx = torch.exp(
                -(((cols - (box[0] + box[2]) / 2) / stride - prior.mean[label, 0]) ** 2)
                / (2 * prior.sigma[label, 0] ** 2)
            )
            gy = torch.exp(
                -(((rows - (box[1] + box[3]) / 2) / stride - prior.mean[label, 1]) ** 2)
                / (2 * prior.sigma[label, 1] ** 2)
            )
            total += float(gx.sum() * gy.sum())
    return total


@pytest.mark.parametrize("boxes_per_rank", [(3, 8), (0, 8)])
def test_normalisers_are_averaged_across_workers(tmp_path, boxes_per_rank):
    results = mp.Manager().dict()
    context = mp.start_processes(
        _distributed_worker,
        args=(2, str(tmp_path / "store"), boxes_per_rank, results),
        nprocs=2,
        join=False,
        start_method="fork",
    )
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        if time.monotonic() > deadline:  # a worker skipped a collective: they hang
            for process in context.processes:
                process.kill()
            pytest.fail("data-parallel loss workers did not finish within 120 s")
    # Each worker alone gives the same sums, normalised by its own N_gt and prior sum.
    alone, prior_sums = [], []
    for rank in range(2):
        cls, reg, obj, boxes, labels, prior = random_batch((boxes_per_rank[rank],), seed=10 + rank)
        losses = autoassign_loss(cls, reg, obj, STRIDES, boxes, labels, prior)
        alone.append({k: v.item() for k, v in losses.items()})
        with torch.no_grad():
            prior_sums.append(inside_prior_sum(boxes[0], labels[0], prior))
    mean_count, mean_prior = sum(boxes_per_rank) / 2, sum(prior_sums) / 2
    for rank in range(2):
        count = boxes_per_rank[rank]
        expected_pos = alone[rank]["loss_pos"] * max(count, 1) / max(mean_count, 1)
        expected_neg = alone[rank]["loss_neg"] * max(prior_sums[rank], 1) / max(mean_prior, 1)
        assert results[rank]["loss_pos"] == pytest.approx(expected_pos, rel=1e-10)
        assert results[rank]["loss_neg"] == pytest.approx(expected_neg, rel=1e-10)
        assert results[rank]["loss_center"] == pytest.approx(alone[rank]["loss_center"])
    assert mean_count > 1 and mean_prior > 1 and prior_sums[1] != mean_prior
