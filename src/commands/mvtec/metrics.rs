//! Evaluation metrics: image-level AUROC and best F1 (as scikit-learn computes them, the way
//! the official PatchCore evaluation `patchcore/metrics.py` calls it), and pixel-level AUROC
//! and AUPRO over a whole test set ([`PixelMetrics`], the MVTec AD definition).
//!
//! Every area metric is the area under a [`Curve`] built point by point by a
//! [`CurveBuilder`]: the same pass yields the metric (from every point) and the points to draw
//! (thinned to a bounded number), so a plotted curve and its reported area cannot disagree
//! beyond the stated drawing tolerance.

use std::cell::{Cell, Ref, RefCell};

use anyhow::{ensure, Result};
use ndarray::ArrayView2;
use rayon::slice::ParallelSliceMut;
use serde::{Deserialize, Serialize};

use crate::outputs::regions;

/// Area under the ROC curve of `scores` for binary `labels` (true = anomalous), with ties
/// counted as half (what scikit-learn's `roc_auc_score` gives): the area of [`roc_curve`].
/// `None` when one class is absent.
pub fn auroc(scores: &[f32], labels: &[bool]) -> Option<f64> {
    roc_curve(scores, labels).map(|c| c.area)
}

/// The ROC curve of `scores` for binary `labels` (true = anomalous): one point
/// (false-positive rate, true-positive rate) per distinct score, "anomalous" meaning
/// `score >= threshold`, from (0, 0) to (1, 1); tied scores cross together (a diagonal
/// segment, which is what counts ties as half). As scikit-learn's `roc_curve` and `auc`.
/// `None` when one class is absent.
pub fn roc_curve(scores: &[f32], labels: &[bool]) -> Option<Curve> {
    assert_eq!(scores.len(), labels.len());
    let pos = labels.iter().filter(|&&l| l).count();
    let neg = labels.len() - pos;
    if pos == 0 || neg == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let mut curve = CurveBuilder::new([CURVE_RESOLUTION; 2]);
    let (mut tp, mut fp) = (0usize, 0usize);
    let mut i = 0;
    while i < order.len() {
        let t = scores[order[i]];
        loop {
            if labels[order[i]] {
                tp += 1;
            } else {
                fp += 1;
            }
            i += 1;
            if i == order.len() || scores[order[i]] != t {
                break;
            }
        }
        curve.push([fp as f64 / neg as f64, tp as f64 / pos as f64]);
    }
    Some(curve.finish())
}

/// Resolution of the drawn curves, as a share of each axis: see [`CurveBuilder`].
pub const CURVE_RESOLUTION: f64 = 1e-3;

/// A monotone curve from (0, 0) as drawn, and the area under it as a metric.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Curve {
    /// Points `[x, y]` to draw, both coordinates non-decreasing, thinned by
    /// [`CurveBuilder`] (at most about `4 / resolution` of them).
    pub points: Vec<[f64; 2]>,
    /// Trapezoid-rule area under **every** point of the curve, not only the drawn ones (the
    /// metric, before any normalization). The drawn points' area ([`Curve::drawn_area`])
    /// differs from it by at most `resolution / 2` of the bounding box's area.
    pub area: f64,
}

impl Curve {
    /// The area as a share of the box `[0, width] x [0, 1]` the curve spans: AUROC for a ROC
    /// curve (width 1), AUPRO for a PRO curve up to FPR `width`.
    pub fn area_share(&self, width: f64) -> f64 {
        self.area / width
    }

    /// Trapezoid-rule area under the drawn points.
    pub fn drawn_area(&self) -> f64 {
        trapezoid(&self.points)
    }
}

/// Trapezoid-rule area under a polyline given by its points (x non-decreasing).
pub fn trapezoid(points: &[[f64; 2]]) -> f64 {
    let mut area = Neumaier::default();
    for w in points.windows(2) {
        area.add(0.5 * (w[0][1] + w[1][1]) * (w[1][0] - w[0][0]));
    }
    area.sum()
}

/// Builds a [`Curve`] from its points in order: every point enters the area (compensated sum),
/// and the drawn copy keeps a point only when the curve has moved more than `resolution` (per
/// axis) from the last kept point, then keeps both the point before (so the long segment is
/// exact) and that point.
///
/// Why this bounds the drawing error: between two kept points the dropped part of the curve
/// lies in a box of at most `resolution[0] x resolution[1]`, so the area between it and the
/// drawn chord is at most half that box; summed over boxes whose widths add up to at most the
/// curve's width `W`, the drawn area is off by at most `resolution[1] * W / 2`, i.e.
/// `CURVE_RESOLUTION / 2` of the `W x H` box when `resolution[1] = CURVE_RESOLUTION * H`.
/// Each keep moves the last kept point by more than `resolution` along some axis, so at most
/// `2 * (W / resolution[0] + H / resolution[1]) + 2` points are kept.
#[derive(Debug)]
pub struct CurveBuilder {
    resolution: [f64; 2],
    area: Neumaier,
    last: [f64; 2],
    /// The last point seen, when it was not kept.
    pending: Option<[f64; 2]>,
    points: Vec<[f64; 2]>,
}

impl CurveBuilder {
    /// A curve starting at (0, 0); `resolution` per axis, in the axes' units (0 keeps every
    /// distinct point).
    pub fn new(resolution: [f64; 2]) -> Self {
        CurveBuilder {
            resolution,
            area: Neumaier::default(),
            last: [0.0, 0.0],
            pending: None,
            points: vec![[0.0, 0.0]],
        }
    }

    /// Adds the next point (coordinates not below the previous point's).
    pub fn push(&mut self, p: [f64; 2]) {
        self.area
            .add(0.5 * (self.last[1] + p[1]) * (p[0] - self.last[0]));
        self.last = p;
        let k = *self.points.last().expect("starts with (0, 0)");
        if (p[0] - k[0]).abs() > self.resolution[0] || (p[1] - k[1]).abs() > self.resolution[1] {
            self.points.extend(self.pending.take());
            self.points.push(p);
        } else {
            self.pending = Some(p);
        }
    }

    pub fn finish(mut self) -> Curve {
        self.points.extend(self.pending.take());
        Curve {
            points: self.points,
            area: self.area.sum(),
        }
    }
}

/// The best F1 score over thresholds, with the threshold reaching it and its precision and
/// recall. "Predicted anomalous" means `score >= threshold`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BestF1 {
    pub f1: f64,
    pub threshold: f32,
    pub precision: f64,
    pub recall: f64,
}

/// The maximum F1 of `scores` for binary `labels` (true = anomalous) over the thresholds that
/// matter: every distinct score, with "predicted anomalous" meaning `score >= threshold`.
///
/// This is what the official PatchCore evaluation does with scikit-learn:
/// `precision_recall_curve`, then `F1 = 2 * P * R / (P + R)` (0 where `P + R = 0`), then the
/// threshold at `np.argmax(F1)`. Precision, recall and F1 are computed with the same
/// floating-point operations (`P = TP / (TP + FP)`, `R = TP / positives`), so equal F1 values
/// are equal here too, and on equal F1 the **lowest** threshold wins: scikit-learn lists
/// thresholds in increasing order and `np.argmax` takes the first maximum.
///
/// `None` when there is no positive. Scores are ordered with `f32::total_cmp`; NaN scores
/// (which scikit-learn rejects) are not meaningful.
pub fn best_f1(scores: &[f32], labels: &[bool]) -> Option<BestF1> {
    assert_eq!(scores.len(), labels.len());
    let pos = labels.iter().filter(|&&l| l).count();
    if pos == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let mut best: Option<BestF1> = None;
    let (mut tp, mut predicted) = (0usize, 0usize);
    let mut i = 0;
    while i < order.len() {
        // One group of equal scores: all of it crosses the threshold together.
        let threshold = scores[order[i]];
        loop {
            tp += labels[order[i]] as usize;
            predicted += 1;
            i += 1;
            if i == order.len() || scores[order[i]] != threshold {
                break;
            }
        }
        let precision = tp as f64 / predicted as f64;
        let recall = tp as f64 / pos as f64;
        let f1 = if precision + recall == 0.0 {
            0.0
        } else {
            2.0 * precision * recall / (precision + recall)
        };
        // Descending sweep: `>=` lets a later (lower) threshold take an equal F1.
        if best.as_ref().is_none_or(|b| f1 >= b.f1) {
            best = Some(BestF1 {
                f1,
                threshold,
                precision,
                recall,
            });
        }
    }
    best
}

/// Pixel-level metrics over a whole test set, accumulated one image at a time: pixel AUROC
/// and AUPRO (area under the per-region-overlap curve, MVTec AD).
///
/// Memory: 8 bytes a pixel (its `f32` score and a `u32` region number, 0 for normal pixels)
/// plus 8 bytes a region (1 / its area, `f64`); [`bytes`](Self::bytes) reports what is held,
/// including the spare capacity that growing the buffer leaves (up to 2x; avoid it with
/// [`with_capacity`](Self::with_capacity)). `add` also needs, while it runs, 4 bytes a pixel
/// of that image for the region labels. The first `auroc` or `aupro` call sorts the pixels in
/// place (no copy; the struct uses interior mutability for this, so methods take `&self`),
/// and both share that order until the next `add`.
///
/// Both metrics are exact: one curve point per distinct score (exact ties grouped), counts in
/// integers, region overlaps summed in `f64` with compensated summation.
#[derive(Debug, Default)]
pub struct PixelMetrics {
    /// `(score, region)` of every pixel; region 0 is a normal pixel, `r >= 1` is region `r` of
    /// the whole set (numbered across images).
    pixels: RefCell<Vec<(f32, u32)>>,
    /// Whether `pixels` is in descending score order.
    sorted: Cell<bool>,
    /// 1 / area of region `r` at index `r - 1`.
    inv_area: Vec<f64>,
    /// Number of normal pixels.
    normal: u64,
}

impl PixelMetrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// An accumulator with room for `pixels` pixels, so that no spare capacity is held.
    pub fn with_capacity(pixels: usize) -> Self {
        Self {
            pixels: RefCell::new(Vec::with_capacity(pixels)),
            ..Self::default()
        }
    }

    /// Adds one image: its anomaly `scores` and ground-truth `mask` (true = anomalous), of the
    /// same shape. Regions are the 8-connected components of `mask`. Errors on a shape
    /// mismatch or a NaN score, adding nothing.
    pub fn add(&mut self, scores: ArrayView2<f32>, mask: ArrayView2<bool>) -> Result<()> {
        ensure!(
            scores.dim() == mask.dim(),
            "score map is {:?} (rows, columns) but its mask is {:?}",
            scores.dim(),
            mask.dim()
        );
        ensure!(!scores.iter().any(|s| s.is_nan()), "score map contains NaN");
        let (labels, n) = regions::label(mask);
        let base = self.inv_area.len();
        ensure!(
            (base + n) < u32::MAX as usize,
            "more than {} anomalous regions",
            u32::MAX - 1
        );
        let mut area = vec![0u64; n];
        for &l in labels.iter().filter(|&&l| l != 0) {
            area[l as usize - 1] += 1;
        }
        self.inv_area.extend(area.iter().map(|&a| 1.0 / a as f64));
        let pixels = self.pixels.get_mut();
        pixels.reserve(scores.len());
        let mut normal = 0u64;
        pixels.extend(scores.iter().zip(labels.iter()).map(|(&s, &l)| {
            if l == 0 {
                normal += 1;
                (s, 0)
            } else {
                (s, base as u32 + l)
            }
        }));
        self.normal += normal;
        self.sorted.set(false);
        Ok(())
    }

    /// Number of pixels added.
    pub fn pixels(&self) -> usize {
        self.pixels.borrow().len()
    }

    /// Number of anomalous regions added.
    pub fn regions(&self) -> usize {
        self.inv_area.len()
    }

    /// Bytes held (buffer capacities included).
    pub fn bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.pixels.borrow().capacity() * std::mem::size_of::<(f32, u32)>()
            + self.inv_area.capacity() * std::mem::size_of::<f64>()
    }

    /// The pixels in descending score order (sorted on first use).
    fn sorted(&self) -> Ref<'_, Vec<(f32, u32)>> {
        if !self.sorted.get() {
            self.pixels
                .borrow_mut()
                .par_sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
            self.sorted.set(true);
        }
        self.pixels.borrow()
    }

    /// Pixel AUROC over all pixels added (anomalous = inside a mask), ties counted as half, as
    /// `sklearn.metrics.roc_auc_score` on the flattened maps (what the official PatchCore
    /// evaluation computes): the area of [`roc_curve`](Self::roc_curve). `None` when one class
    /// is absent.
    pub fn auroc(&self) -> Option<f64> {
        self.roc_curve().map(|c| c.area)
    }

    /// The pixel ROC curve: one point (FPR, TPR) per distinct score over all pixels added,
    /// as [`roc_curve`] on the flattened maps (no copy of the pixels is made). `None` when one
    /// class is absent.
    pub fn roc_curve(&self) -> Option<Curve> {
        let pixels = self.sorted();
        let neg = self.normal;
        let pos = pixels.len() as u64 - neg;
        if pos == 0 || neg == 0 {
            return None;
        }
        let mut curve = CurveBuilder::new([CURVE_RESOLUTION; 2]);
        let (mut tp, mut fp) = (0u64, 0u64);
        let mut i = 0;
        while i < pixels.len() {
            let t = pixels[i].0;
            loop {
                if pixels[i].1 == 0 {
                    fp += 1;
                } else {
                    tp += 1;
                }
                i += 1;
                if i == pixels.len() || pixels[i].0 != t {
                    break;
                }
            }
            curve.push([fp as f64 / neg as f64, tp as f64 / pos as f64]);
        }
        Some(curve.finish())
    }

    /// Normalized area under the PRO curve up to a false-positive rate of `max_fpr` (in
    /// `(0, 1]`; MVTec AD uses 0.3), as defined by MVTec AD (Bergmann et al., IJCV 2021) and
    /// computed by its public evaluation code (`compute_pro` + `trapezoid`): the area of
    /// [`pro_curve`](Self::pro_curve) divided by `max_fpr`, so a perfect detector gives 1.
    /// `None` when there is no region or no normal pixel.
    pub fn aupro(&self, max_fpr: f64) -> Option<f64> {
        self.pro_curve(max_fpr).map(|c| c.area_share(max_fpr))
    }

    /// The PRO curve up to a false-positive rate of `max_fpr` (in `(0, 1]`), MVTec AD's:
    ///
    /// - regions are the 8-connected components of each image's mask;
    /// - at threshold `t`, a pixel is predicted anomalous when `score >= t`;
    ///   FPR(t) = fraction of all normal pixels (all images) predicted anomalous;
    ///   PRO(t) = mean over all regions of all images of the fraction of the region predicted;
    /// - one curve point per distinct score (MVTec keeps the last point of each run of equal
    ///   sorted scores), starting at (0, 0); PRO is clipped at 1 against rounding;
    /// - the curve ends at `max_fpr`, interpolated linearly between the last point with
    ///   FPR <= `max_fpr` and the next one (no interpolation when a point lies exactly at
    ///   `max_fpr`); its area is the trapezoid rule's (not yet divided by `max_fpr`).
    ///
    /// One difference: MVTec rounds FPRs to `f32`; here they stay exact ratios in `f64`.
    /// `None` when there is no region or no normal pixel.
    pub fn pro_curve(&self, max_fpr: f64) -> Option<Curve> {
        assert!(
            max_fpr > 0.0 && max_fpr <= 1.0,
            "max_fpr must be in (0, 1], got {max_fpr}"
        );
        if self.inv_area.is_empty() || self.normal == 0 {
            return None;
        }
        let pixels = self.sorted();
        let (normal, regions) = (self.normal as f64, self.inv_area.len() as f64);
        let mut curve = CurveBuilder::new([max_fpr * CURVE_RESOLUTION, CURVE_RESOLUTION]);
        let mut fp = 0u64;
        let mut overlap = Neumaier::default();
        let (mut x0, mut y0) = (0f64, 0f64);
        let mut i = 0;
        while i < pixels.len() {
            let t = pixels[i].0;
            loop {
                match pixels[i].1 {
                    0 => fp += 1,
                    r => overlap.add(self.inv_area[r as usize - 1]),
                }
                i += 1;
                if i == pixels.len() || pixels[i].0 != t {
                    break;
                }
            }
            let x1 = fp as f64 / normal;
            let y1 = (overlap.sum() / regions).min(1.0);
            if x1 > max_fpr {
                curve.push([max_fpr, y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)]);
                break;
            }
            curve.push([x1, y1]);
            (x0, y0) = (x1, y1);
        }
        // Otherwise the last point has FPR 1 >= max_fpr.
        Some(curve.finish())
    }
}

/// Neumaier's compensated sum: error independent of the number of terms.
#[derive(Debug, Default)]
struct Neumaier {
    sum: f64,
    compensation: f64,
}

impl Neumaier {
    fn add(&mut self, v: f64) {
        let t = self.sum + v;
        self.compensation += if self.sum.abs() >= v.abs() {
            (self.sum - t) + v
        } else {
            (v - t) + self.sum
        };
        self.sum = t;
    }

    fn sum(&self) -> f64 {
        self.sum + self.compensation
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perfect_inverted_and_tied() {
        assert_eq!(
            auroc(&[0.1, 0.2, 0.8, 0.9], &[false, false, true, true]),
            Some(1.0)
        );
        assert_eq!(
            auroc(&[0.9, 0.8, 0.2, 0.1], &[false, false, true, true]),
            Some(0.0)
        );
        assert_eq!(auroc(&[0.5, 0.5], &[false, true]), Some(0.5));
        assert_eq!(auroc(&[0.5, 0.5], &[true, true]), None);
        // sklearn.metrics.roc_auc_score([0,1,0,1,1], [0.1,0.4,0.35,0.8,0.35]) == 0.91666...
        let a = auroc(
            &[0.1, 0.4, 0.35, 0.8, 0.35],
            &[false, true, false, true, true],
        )
        .unwrap();
        assert!((a - 5.5 / 6.0).abs() < 1e-12);
    }

    #[test]
    fn best_f1_as_sklearn() {
        // precision_recall_curve([0,0,1,1], [0.1,0.4,0.35,0.8]): thresholds [0.1,0.35,0.4,0.8],
        // F1 [2/3, 0.8, 0.5, 2/3] -> 0.8 at 0.35 (P = 2/3, R = 1).
        let b = best_f1(&[0.1, 0.4, 0.35, 0.8], &[false, false, true, true]).unwrap();
        assert_eq!(b.threshold, 0.35);
        assert!((b.f1 - 0.8).abs() < 1e-15);
        assert_eq!((b.precision, b.recall), (2.0 / 3.0, 1.0));
        // Equal F1 (2/3) at thresholds 4 (P=1, R=1/2) and 1 (P=1/2, R=1): argmax picks the
        // first in increasing threshold order, the lowest.
        let b = best_f1(&[4.0, 3.0, 2.0, 1.0], &[true, false, false, true]).unwrap();
        assert_eq!(b.threshold, 1.0);
        assert_eq!((b.precision, b.recall), (0.5, 1.0));
        // Ties in scores cross together.
        let b = best_f1(&[0.5, 0.5, 0.5], &[true, false, true]).unwrap();
        assert_eq!((b.threshold, b.precision, b.recall), (0.5, 2.0 / 3.0, 1.0));
        assert_eq!(best_f1(&[0.1, 0.2], &[false, false]), None);
        assert_eq!(best_f1(&[], &[]), None);
        let b = best_f1(&[0.1, 0.2], &[true, true]).unwrap();
        assert_eq!((b.f1, b.threshold), (1.0, 0.1));
    }

    fn row(v: &[f32]) -> ndarray::Array2<f32> {
        ndarray::Array2::from_shape_vec((1, v.len()), v.to_vec()).unwrap()
    }

    fn mask_row(v: &[u8]) -> ndarray::Array2<bool> {
        ndarray::Array2::from_shape_vec((1, v.len()), v.iter().map(|&b| b != 0).collect()).unwrap()
    }

    fn pixel_metrics(images: &[(&[f32], &[u8])]) -> PixelMetrics {
        let mut m = PixelMetrics::new();
        for (s, g) in images {
            m.add(row(s).view(), mask_row(g).view()).unwrap();
        }
        m
    }

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-12)
    }

    #[test]
    fn aupro_on_paper() {
        // One region of 2 pixels (scores 0.9, 0.5), normal pixels 0.7 and 0.1. Curve:
        // (0,0) (0,1/2) (1/2,1/2) (1/2,1) (1,1).
        let m = pixel_metrics(&[(&[0.9, 0.5, 0.7, 0.1], &[1, 1, 0, 0])]);
        assert!(close(m.aupro(0.3), 0.5)); // 0.3 * 1/2 / 0.3
        assert!(close(m.aupro(1.0), 0.75)); // 1/2 * 1/2 + 1/2 * 1

        // Two images, regions of 3 and 1 pixels, normal pixels 0.4 and 0.1. Thresholds
        // 0.8: PRO (2/3 + 0)/2; 0.6: (2/3 + 1)/2 = 5/6; 0.4: FPR 1/2; 0.2: PRO 1; 0.1: FPR 1.
        // Per region, not per pixel: the pixel TPR at 0.6 would be 3/4.
        let m = pixel_metrics(&[
            (&[0.8, 0.8, 0.2, 0.4], &[1, 1, 1, 0]),
            (&[0.6, 0.1], &[1, 0]),
        ]);
        assert_eq!(m.regions(), 2);
        assert_eq!(m.pixels(), 6);
        assert!(close(m.aupro(0.3), 5.0 / 6.0));
        assert!(close(m.aupro(0.5), 5.0 / 6.0)); // a curve point lies at FPR 0.5
        assert!(close(m.aupro(1.0), 11.0 / 12.0));
        // Pixel AUROC: 7 of 8 (positive, negative) pairs ordered right.
        assert!(close(m.auroc(), 0.875));

        // Interpolation on a sloped segment: the region ties with one normal pixel, so the
        // curve goes (0,0) -> (1/3,1); at FPR 0.3 PRO is 0.9.
        let m = pixel_metrics(&[(&[0.5, 0.5, 0.2, 0.1], &[1, 0, 0, 0])]);
        assert!(close(m.aupro(0.3), 0.5 * 0.9 * 0.3 / 0.3));

        // All scores equal: the diagonal, area max_fpr^2 / 2.
        let m = pixel_metrics(&[(&[0.3; 5], &[0, 1, 0, 1, 1])]);
        assert!(close(m.aupro(0.3), 0.15));
        assert!(close(m.auroc(), 0.5));

        // Perfect and inverted detectors.
        let m = pixel_metrics(&[(&[0.9, 0.8, 0.1, 0.2], &[1, 1, 0, 0])]);
        assert!(close(m.aupro(0.3), 1.0));
        assert!(close(m.auroc(), 1.0));
        let m = pixel_metrics(&[(&[0.1, 0.2, 0.9, 0.8], &[1, 1, 0, 0])]);
        assert!(close(m.aupro(0.3), 0.0));
        assert!(close(m.auroc(), 0.0));
    }

    #[test]
    fn pixel_metrics_degenerate_and_errors() {
        let m = PixelMetrics::new();
        assert_eq!((m.auroc(), m.aupro(0.3), m.pixels()), (None, None, 0));
        let m = pixel_metrics(&[(&[0.1, 0.2], &[0, 0])]);
        assert_eq!((m.auroc(), m.aupro(0.3)), (None, None));
        let m = pixel_metrics(&[(&[0.1, 0.2], &[1, 1])]);
        assert_eq!((m.auroc(), m.aupro(0.3)), (None, None));

        let mut m = PixelMetrics::new();
        let e = m.add(row(&[0.1, 0.2]).view(), mask_row(&[0, 1, 0]).view());
        assert!(e.unwrap_err().to_string().contains("(1, 2)"));
        assert!(m
            .add(row(&[0.1, f32::NAN]).view(), mask_row(&[0, 1]).view())
            .is_err());
        assert_eq!((m.pixels(), m.regions()), (0, 0));
    }

    /// A random monotone curve with `n` steps: tiny random steps, some long jumps.
    fn random_curve(n: usize, seed: u64) -> Vec<[f64; 2]> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let steps: Vec<[f64; 2]> = (0..n)
            .map(|_| {
                let big = if rng.gen_bool(0.001) { 200.0 } else { 1.0 };
                match rng.gen_range(0..3) {
                    0 => [big * rng.gen::<f64>(), 0.0],
                    1 => [0.0, big * rng.gen::<f64>()],
                    _ => [big * rng.gen::<f64>(), big * rng.gen::<f64>()],
                }
            })
            .collect();
        let total = steps
            .iter()
            .fold([0.0, 0.0], |a, s| [a[0] + s[0], a[1] + s[1]]);
        let mut p = [0.0, 0.0];
        let mut out = Vec::with_capacity(n);
        for s in steps {
            p = [p[0] + s[0] / total[0], p[1] + s[1] / total[1]];
            out.push([p[0].min(1.0), p[1].min(1.0)]);
        }
        out
    }

    #[test]
    fn curve_area_is_every_point_and_the_drawing_stays_close_and_small() {
        for (n, seed) in [(10, 1), (3_000, 2), (400_000, 3)] {
            let points = random_curve(n, seed);
            let mut all = vec![[0.0, 0.0]];
            all.extend_from_slice(&points);
            let exact = trapezoid(&all);

            // Resolution 0 keeps every point: the drawn curve is the curve.
            let mut b = CurveBuilder::new([0.0, 0.0]);
            points.iter().for_each(|&p| b.push(p));
            let c = b.finish();
            assert_eq!(c.points, all);
            assert!((c.area - exact).abs() < 1e-12);
            assert!((c.drawn_area() - c.area).abs() < 1e-12);

            // Thinned: the area still comes from every point, the drawing within the bound.
            let mut b = CurveBuilder::new([CURVE_RESOLUTION; 2]);
            points.iter().for_each(|&p| b.push(p));
            let c = b.finish();
            assert!(
                (c.area - exact).abs() < 1e-12,
                "n {n}: {} vs {exact}",
                c.area
            );
            let off = (c.drawn_area() - c.area).abs();
            assert!(
                off <= CURVE_RESOLUTION / 2.0,
                "n {n}: drawn area off by {off}"
            );
            assert!(
                c.points.len() <= (4.0 / CURVE_RESOLUTION) as usize + 2,
                "{}",
                c.points.len()
            );
            assert_eq!(c.points.first(), Some(&[0.0, 0.0]));
            assert_eq!(c.points.last(), all.last(), "ends where the curve ends");
            assert!(c
                .points
                .windows(2)
                .all(|w| w[0][0] <= w[1][0] && w[0][1] <= w[1][1]));
            if n == 400_000 {
                assert!(c.points.len() < n / 50, "thinned: {}", c.points.len());
            }
        }
    }

    #[test]
    fn staircase_under_the_resolution_keeps_its_corners() {
        // Up by 0.9 of the resolution, then right by 2: each step up is dropped alone, but the
        // corner before the long step is kept, so the drawing is exact (a chord straight to
        // the far point would lose 0.9 * resolution * 2 / 2 per stair, 4e-4 in all).
        let mut b = CurveBuilder::new([CURVE_RESOLUTION; 2]);
        let mut all = vec![[0.0, 0.0]];
        let (mut x, mut y) = (0.0, 0.0);
        for _ in 0..450 {
            y += 0.9 * CURVE_RESOLUTION;
            all.push([x, y]);
            x += 2.0 * CURVE_RESOLUTION;
            all.push([x, y]);
        }
        all[1..].iter().for_each(|&p| b.push(p));
        let c = b.finish();
        assert!((c.drawn_area() - trapezoid(&all)).abs() < 1e-12);
        assert!((c.area - trapezoid(&all)).abs() < 1e-12);
    }

    #[test]
    fn roc_and_pro_curves_give_the_metrics() {
        // ROC of [0.1, 0.4, 0.35, 0.8, 0.35] / [0, 1, 0, 1, 1]: thresholds 0.8, 0.4, 0.35
        // (a tie of one negative and one positive: a diagonal), 0.1.
        let c = roc_curve(
            &[0.1, 0.4, 0.35, 0.8, 0.35],
            &[false, true, false, true, true],
        )
        .unwrap();
        let third = 1.0 / 3.0;
        assert_eq!(
            c.points,
            vec![
                [0.0, 0.0],
                [0.0, third],
                [0.0, 2.0 * third],
                [0.5, 1.0],
                [1.0, 1.0]
            ]
        );
        assert!((c.area - 5.5 / 6.0).abs() < 1e-15);
        assert_eq!(roc_curve(&[0.5], &[true]), None);

        // The paper example of aupro_on_paper: (0,0) (0,1/2) (1/2,1/2) ... cut at 0.3.
        let m = pixel_metrics(&[(&[0.9, 0.5, 0.7, 0.1], &[1, 1, 0, 0])]);
        let pro = m.pro_curve(0.3).unwrap();
        assert_eq!(pro.points, vec![[0.0, 0.0], [0.0, 0.5], [0.3, 0.5]]);
        assert!((pro.area_share(0.3) - m.aupro(0.3).unwrap()).abs() < 1e-15);
        let roc = m.roc_curve().unwrap();
        assert_eq!(roc.points.last(), Some(&[1.0, 1.0]));
        assert!((roc.drawn_area() - m.auroc().unwrap()).abs() < 1e-15);
    }

    #[test]
    fn pixel_auroc_matches_image_auroc_and_adds_after_sorting() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut m = PixelMetrics::with_capacity(3 * 40);
        let (mut all_s, mut all_l) = (vec![], vec![]);
        for k in 0..3 {
            let s: Vec<f32> = (0..40).map(|_| rng.gen_range(0..6) as f32 / 5.0).collect();
            let g: Vec<u8> = (0..40).map(|_| rng.gen_bool(0.3) as u8).collect();
            m.add(row(&s).view(), mask_row(&g).view()).unwrap();
            all_s.extend_from_slice(&s);
            all_l.extend(g.iter().map(|&b| b != 0));
            // Sorting happened; the next add must still count.
            let want = auroc(&all_s, &all_l).unwrap();
            assert!((m.auroc().unwrap() - want).abs() < 1e-14, "image {k}");
        }
        assert_eq!(m.pixels(), 120);
        assert!(m.bytes() >= 120 * 8);
        assert!(m.bytes() < 120 * 8 + 8 * m.regions() + 256);
    }
}
