"""--levels: Table 9 and Fig. 3 of Specialize and Fuse (Hsiao et al., ICCV 2021, arXiv:2108.01866,
Sec. 5.5): does each level of the semantic pyramid specialise in the pixels that the fusion takes from it?

    python train.py --eval-only --checkpoint OUT/best.pt --levels [--data-root DIR] [--val-split S]

An evaluation extra (as --boundary-f): at each evaluation every image also goes once through the model
whole, at one scale; the counts are summed over the split (and over ranks), then the first process
prints both tables as Markdown and 'levels' joins the metrics (summary.json, metrics.jsonl). Only a
pyramidal specialize_fuse model has levels to analyse.
"""
import torch
import torch.distributed as dist

from common import InputError, autocast, confusion_matrix, segmentation_metrics


def add_args(parser):
    parser.add_argument_group("pyramid levels (specialize_fuse)").add_argument(
        "--levels", action="store_true",
        help="also report Table 9 and Fig. 3 (S&F Sec. 5.5): each level's mIoU on the pixels fused from each level")


def check_args(args):
    """--levels reads the fusion of the pyramids: refused, before any work, for a model without one."""
    output_format = getattr(args, "output_format", None)
    if args.levels and (args.method != "specialize_fuse" or output_format != "pyramidal"):
        raise InputError(f"--levels analyses the pyramid levels of --method specialize_fuse --output-format "
                         f"pyramidal, not of --method {args.method}" +
                         (f" --output-format {output_format}" if output_format else ""))


def level_confusion(predictions, level, target, num_classes):
    """(L, L, K, K) int64: [l, l'] is the confusion matrix (rows ground truth) of predictions[l'] over the
    pixels of `target` that the fusion took from level l. predictions: L (B, H, W) class maps, each level
    brought to the pixels as 'out' is (SpecializeFuse.level_outputs), so where the fusion takes level l'
    everywhere the two agree; level, target: (B, H, W), the model's 'level' and the labels. Ignore pixels
    are skipped. Sum it over a split."""
    groups = [level == l for l in range(len(predictions))]                     # (B, H, W) bool each
    return torch.stack([torch.stack([confusion_matrix(pred[group], target[group], num_classes)
                                     for pred in predictions]) for group in groups])


def level_tables(confusion, fused, class_names=None):
    """Table 9: mIoU[l'][l] of level l' on the pixels taken from level l, and each group's share of
    the pixels (%). Fig. 3: per-class IoU of each level l' over all pixels, and of the fused output
    (`fused`: the (K, K) confusion matrix of 'out'). Percentages; NaN / None where a class or group is empty."""
    L = len(confusion)
    table9 = [[segmentation_metrics(confusion[l, l_sem])["mIoU"] for l in range(L)] for l_sem in range(L)]
    share = [100 * confusion[l, 0].sum().item() / max(confusion[:, 0].sum().item(), 1) for l in range(L)]
    per_level = [segmentation_metrics(confusion[:, l_sem].sum(0), class_names)["IoU"] for l_sem in range(L)]
    return table9, share, per_level, segmentation_metrics(fused, class_names)["IoU"]


def markdown_tables(table9, share, per_level, fused):
    """Table 9 (rows l', columns l) and Fig. 3 (per class: the fused IoU, then each level's IoU minus
    it) as Markdown, levels numbered as the paper (1 = coarsest) and listed finest first."""
    levels = list(reversed(range(len(table9))))
    fmt = lambda v: "-" if v is None or v != v else f"{v:.2f}"
    row = lambda cells: "| " + " | ".join(cells) + " |"
    lines = ["Table 9: mIoU of semantic level l' (rows) on the pixels fused from level l (columns)", "",
             row(["l' \\ l"] + [str(l + 1) for l in levels]), row(["---"] * (len(levels) + 1))]
    lines += [row([str(r + 1)] + [fmt(table9[r][l]) for l in levels]) for r in levels]
    lines += [row(["pixels (%)"] + [fmt(share[l]) for l in levels]), "",
              "Fig. 3: per-class IoU of the fused output, and of each level l' minus it", "",
              row(["class", "fused"] + [f"l'={r + 1}" for r in levels]), row(["---"] * (len(levels) + 2))]
    for name, iou in fused.items():
        deltas = [None if iou is None or per_level[r][name] is None else per_level[r][name] - iou for r in levels]
        lines.append(row([name, fmt(iou)] + [fmt(d) for d in deltas]))
    return "\n".join(lines)


class LevelTables:
    """An evaluation extra (train.evaluate): level_confusion and the confusion matrix of 'out', summed
    over the split and over ranks, of one more forward of each image (whole, one scale, under --amp)."""

    def __init__(self, model, num_classes, class_names, amp, device):
        self.model, self.class_names, self.amp = model, class_names, amp
        L = len(model.strides)
        self.confusion = torch.zeros(L, L, num_classes, num_classes, dtype=torch.long, device=device)
        self.fused = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)

    @torch.no_grad()
    def add(self, index, image, pred, label):
        """image (1, 3, H, W), label (1, H, W) of one evaluated image; `pred` (the evaluation's) unused."""
        K = self.fused.shape[0]
        with autocast(self.amp, image.device):
            outputs = self.model(image)
            levels = self.model.level_outputs(outputs["semantic"], label.shape[-2:])   # (1, K, H, W) each
            predictions = [logits.argmax(1) for logits in levels]
        self.confusion += level_confusion(predictions, outputs["level"], label, K)
        self.fused += confusion_matrix(outputs["out"].argmax(1), label, K)

    def result(self, world):
        if world > 1:
            dist.all_reduce(self.confusion)
            dist.all_reduce(self.fused)
        table9, share, per_level, fused = level_tables(self.confusion.cpu(), self.fused.cpu(), self.class_names)
        if world == 1 or dist.get_rank() == 0:
            print(markdown_tables(table9, share, per_level, fused), flush=True)
        return {"levels": {"table9": table9, "pixels": share, "per_level_IoU": per_level}}
