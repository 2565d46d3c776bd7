"""Reference numbers for tests/metrics.rs, computed with scikit-learn, SciPy and NumPy.

Image and pixel AUROC are `sklearn.metrics.roc_auc_score`; the best F1 is what the official
PatchCore evaluation (patchcore-inspection, patchcore/metrics.py) does: `precision_recall_curve`,
F1 = 2PR/(P+R) (0 where P+R = 0), `np.argmax`. The AUPRO is deliberately the straightforward
form of the MVTec AD definition, not the sort-and-sweep the Rust code uses: regions from
`scipy.ndimage.label` with 8-connectivity; for every distinct score t, FPR(t) = fraction of
normal pixels with score >= t and PRO(t) = mean over all regions of the fraction of the region
with score >= t, each counted directly; the curve from (0, 0), integrated with the trapezoid
rule up to max_fpr (interpolating linearly at max_fpr unless a point lies there, as MVTec's
`trapezoid`), divided by max_fpr.

Usage: python metrics_reference.py DIR
Reads DIR/cases.json ({"max_fprs": [...], "cases": [names], "label_masks": count}); for each
case DIR/NAME/{scores,masks,image_scores,image_labels}.npy; DIR/label_K.npy (2-D bool masks).
Writes DIR/label_K_labels.npy (int32) and DIR/results.json.
"""
import json
import sys

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

STRUCTURE = np.ones((3, 3), dtype=int)


def auroc(labels, scores):
    if len(np.unique(labels)) < 2:
        return None
    return float(roc_auc_score(labels.astype(int), scores))


def best_f1(labels, scores):
    if not labels.any():
        return None
    precision, recall, thresholds = precision_recall_curve(labels.astype(int), scores)
    f1 = np.divide(
        2 * precision * recall,
        precision + recall,
        out=np.zeros_like(precision),
        where=(precision + recall) != 0,
    )
    i = int(np.argmax(f1))
    return {
        "f1": float(f1[i]),
        "threshold": float(thresholds[i]),
        "precision": float(precision[i]),
        "recall": float(recall[i]),
    }


def pro_curve(scores, masks):
    """(FPRs, PROs) from (0, 0) over every distinct score, descending; None if undefined."""
    normal_scores = scores[~masks]
    region_scores = []
    for image_scores, mask in zip(scores, masks):
        labeled, n = ndimage.label(mask, structure=STRUCTURE)
        for k in range(1, n + 1):
            region_scores.append(image_scores[labeled == k])
    if not region_scores or normal_scores.size == 0:
        return None
    fprs, pros = [0.0], [0.0]
    for t in np.unique(scores)[::-1]:
        fprs.append(np.count_nonzero(normal_scores >= t) / normal_scores.size)
        pros.append(float(np.mean([np.count_nonzero(r >= t) / r.size for r in region_scores])))
    return np.array(fprs), np.array(pros)


def aupro(curve, max_fpr):
    """Normalized area under the curve up to max_fpr; also whether a point lies at max_fpr."""
    x, y = curve
    assert np.all(np.diff(x) >= 0) and x[-1] == 1.0
    inside = x <= max_fpr
    xi, yi = x[inside], y[inside]
    area = float(np.sum((xi[1:] - xi[:-1]) * (yi[1:] + yi[:-1]) / 2))
    exact = bool(np.any(x == max_fpr))
    if not exact:
        j = int(np.argmax(x > max_fpr))
        x0, y0, x1, y1 = x[j - 1], y[j - 1], x[j], y[j]
        y_at = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
        area += (max_fpr - x0) * (y0 + y_at) / 2
    return area / max_fpr, exact


def main():
    out = sys.argv[1]
    with open(f"{out}/cases.json") as f:
        spec = json.load(f)
    results = {"cases": {}, "labels": []}
    for name in spec["cases"]:
        d = f"{out}/{name}"
        scores = np.load(f"{d}/scores.npy")
        masks = np.load(f"{d}/masks.npy")
        image_scores = np.load(f"{d}/image_scores.npy")
        image_labels = np.load(f"{d}/image_labels.npy")
        assert scores.dtype == np.float32 and masks.dtype == bool
        curve = pro_curve(scores, masks)
        aupros = [None if curve is None else aupro(curve, m) for m in spec["max_fprs"]]
        results["cases"][name] = {
            "image_auroc": auroc(image_labels, image_scores),
            "image_best_f1": best_f1(image_labels, image_scores),
            "pixel_auroc": auroc(masks.ravel(), scores.ravel()),
            "pixel_best_f1": best_f1(masks.ravel(), scores.ravel()),
            "aupro": [None if a is None else a[0] for a in aupros],
            "exact_hit": [None if a is None else a[1] for a in aupros],
        }
    for k in range(spec["label_masks"]):
        mask = np.load(f"{out}/label_{k}.npy")
        labeled, n = ndimage.label(mask, structure=STRUCTURE)
        np.save(f"{out}/label_{k}_labels.npy", labeled.astype(np.int32))
        regions = []
        for i, sl in enumerate(ndimage.find_objects(labeled)):
            rows, cols = sl
            area = int(np.count_nonzero(labeled[sl] == i + 1))
            regions.append([cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start, area])
        results["labels"].append({"n": int(n), "regions": regions})
    with open(f"{out}/results.json", "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
