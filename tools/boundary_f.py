"""The boundary F-score (--boundary-f): GALD v2 Table V's metric, with the GSCNN protocol (Takikawa
et al., "Gated-SCNN: Gated Shape CNNs for Semantic Segmentation", ICCV 2019, arXiv:1907.05740).

    python train.py --method galdv2 ... --boundary-f          # adds 'boundary_f' to the metrics
"""
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from common import IGNORE_INDEX


def add_args(parser):
    parser.add_argument_group("boundary F-score").add_argument(
        "--boundary-f", action="store_true",
        help="also report the boundary F-score within 3, 5, 9 and 12 px (GALD v2 Table V)")


BOUNDARY_TOLERANCES = (3, 5, 9, 12)                            # pixels (GSCNN; --boundary-f)


def boundaries(masks):
    """(K, H, W) bool -> (K, H, W) bool: pixels whose right, lower or lower-right neighbour differs
    (GSCNN's seg2bmap, 1 px thick)."""
    edge = torch.zeros_like(masks)
    edge[:, :, :-1] |= masks[:, :, :-1] != masks[:, :, 1:]
    edge[:, :-1, :] |= masks[:, :-1, :] != masks[:, 1:, :]
    edge[:, :-1, :-1] |= masks[:, :-1, :-1] != masks[:, 1:, 1:]
    return edge


def within(edge, tolerance):
    """(K, H, W) bool: pixels closer than `tolerance` (Euclidean, inclusive) to a pixel of `edge`."""
    if tolerance == 0:
        return edge
    r = torch.arange(-tolerance, tolerance + 1, device=edge.device)
    disk = ((r[:, None] ** 2 + r[None, :] ** 2) <= tolerance ** 2).float()[None, None]
    return F.conv2d(edge.float()[:, None], disk, padding=tolerance)[:, 0] > 0


def boundary_f_counts(pred, label, num_classes, tolerances=BOUNDARY_TOLERANCES):
    """Per tolerance and class: [predicted boundary pixels, of them within tolerance of the true
    boundary, true boundary pixels, of them within tolerance of the predicted one] -> (T, K, 4).
    Both masks are cleared under ignored pixels first (as GSCNN), so the border of an ignored region
    is a boundary of both. NOTE(paper-gap): counts are summed over the split (they all-reduce under
    DDP) before F1 is taken; GSCNN averages per-image F1."""
    valid = label != IGNORE_INDEX
    classes = torch.arange(num_classes, device=label.device)[:, None, None]
    pred_edge = boundaries((pred[None] == classes) & valid)
    true_edge = boundaries((label[None] == classes) & valid)
    counts = []
    for t in tolerances:
        counts.append(torch.stack([pred_edge.sum((1, 2)), (pred_edge & within(true_edge, t)).sum((1, 2)),
                                   true_edge.sum((1, 2)), (true_edge & within(pred_edge, t)).sum((1, 2))], 1))
    return torch.stack(counts)


def boundary_f_scores(counts, tolerances=BOUNDARY_TOLERANCES, class_names=None):
    """F1 of boundary precision and recall per class (percent), and their mean over classes that have
    a boundary in the ground truth or the prediction, for each tolerance in pixels."""
    names = class_names or [str(i) for i in range(counts.shape[1])]
    scores = {}
    for t, c in zip(tolerances, counts.double()):
        precision, recall = c[:, 1] / c[:, 0], c[:, 3] / c[:, 2]
        precision = torch.where(c[:, 0] == 0, torch.zeros_like(precision), precision)
        recall = torch.where(c[:, 2] == 0, torch.zeros_like(recall), recall)
        f1 = (2 * precision * recall / (precision + recall)).nan_to_num(0.0)
        f1[(c[:, 0] == 0) & (c[:, 2] == 0)] = float("nan")     # no boundary anywhere: not counted
        scores[f"{t}px"] = {"mBF": round(100 * f1.nanmean().item(), 2),
                            "per_class": {n: None if math.isnan(v) else round(100 * v, 2)
                                          for n, v in zip(names, f1.tolist())}}
    return scores


class BoundaryF:
    """An evaluation extra (train.evaluate): boundary counts summed over the split and over ranks."""

    def __init__(self, num_classes, class_names, device):
        self.class_names = class_names
        self.counts = torch.zeros(len(BOUNDARY_TOLERANCES), num_classes, 4, dtype=torch.long, device=device)

    def add(self, index, image, pred, label):
        """pred, label: (B, H, W) of one evaluated image."""
        self.counts += boundary_f_counts(pred[0], label[0], self.counts.shape[1])

    def result(self, world):
        if world > 1:
            dist.all_reduce(self.counts)
        return {"boundary_f": boundary_f_scores(self.counts.cpu(), class_names=self.class_names)}
