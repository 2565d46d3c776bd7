//! Thresholds from held-out good images, so predict can say "good" or "anomalous" without
//! anyone normalizing scores over a test set.
//!
//! At train time a share of the good images (`--calibration-ratio`) is kept out of the memory
//! bank and scored against it like any image predict sees. The rule, for a list of such
//! scores: `threshold = q99 + 0.1 * (q99 - median)`, where q99 is the 99th percentile
//! (linear interpolation, as `numpy.quantile`). The image threshold applies the rule to image
//! scores (max patch score); the pixel threshold applies it to each calibration image's
//! largest heatmap value, so a good image's mask is empty about as often as its verdict is
//! good.
//!
//! What to expect: with n held-out images, q99 sits near their largest score, and a new good
//! image from the same process lands above the threshold with probability at most
//! `(c + 1) / (n + 1)`, c being the number of held-out scores at or above it (the rank
//! argument of conformal prediction: the new score is equally likely to take any rank among
//! the n + 1). That bound is stored as `false_alarm_bound`: about 3-6% with the default 32
//! images of a 320-image set, 1% needs about 100 or more. Scores from a drifted process
//! (lighting, material) are not covered by it.
use serde::{Deserialize, Serialize};

/// Quantile of the rule.
pub const QUANTILE: f64 = 0.99;
/// Margin of the rule, as a fraction of (quantile - median).
pub const MARGIN: f64 = 0.1;
/// Fewest held-out images that make a calibration.
pub const MIN_IMAGES: usize = 5;
/// Most held-out images: more add little to a 99th percentile and cost training images.
pub const MAX_IMAGES: usize = 1000;
/// The rule in words, stored in the model.
pub const RULE: &str = "q99 + 0.1 * (q99 - median) of held-out good images (numpy-style quantiles)";

/// What the sidecar stores about the held-out images.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Calibration {
    pub images: usize,
    pub rule: String,
    /// Image scores of the held-out images, ascending.
    pub image_scores: Vec<f32>,
    /// Largest heatmap value of each held-out image, ascending.
    pub heatmap_maxima: Vec<f32>,
    pub image_threshold: f32,
    pub pixel_threshold: f32,
    /// Upper bound on the share of good images (like the held-out ones) whose image score
    /// exceeds the threshold: `(c + 1) / (n + 1)`, see the module's documentation.
    #[serde(default)]
    pub false_alarm_bound: f64,
}

impl Calibration {
    pub fn from_scores(mut image_scores: Vec<f32>, mut heatmap_maxima: Vec<f32>) -> Self {
        image_scores.sort_by(f32::total_cmp);
        heatmap_maxima.sort_by(f32::total_cmp);
        let image_threshold = threshold(&image_scores);
        let at_or_above = image_scores
            .iter()
            .filter(|&&s| s >= image_threshold)
            .count();
        Calibration {
            images: image_scores.len(),
            rule: RULE.to_string(),
            image_threshold,
            pixel_threshold: threshold(&heatmap_maxima),
            false_alarm_bound: (at_or_above + 1) as f64 / (image_scores.len() + 1) as f64,
            image_scores,
            heatmap_maxima,
        }
    }
}

/// How many of `n` training images to hold out for `ratio` (0 when too few images).
pub fn held_out_count(n: usize, ratio: f64) -> usize {
    if ratio <= 0.0 {
        return 0;
    }
    let k = ((n as f64 * ratio).ceil() as usize).clamp(MIN_IMAGES, MAX_IMAGES);
    // The bank keeps at least as many images as the calibration.
    if n < k + MIN_IMAGES {
        0
    } else {
        k
    }
}

/// The rule on `sorted` (ascending, non-empty) scores.
pub fn threshold(sorted: &[f32]) -> f32 {
    let q = quantile(sorted, QUANTILE);
    let median = quantile(sorted, 0.5);
    (q + MARGIN * (q - median)) as f32
}

/// numpy's default ("linear") quantile of ascending data.
pub fn quantile(sorted: &[f32], q: f64) -> f64 {
    assert!(!sorted.is_empty());
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(sorted.len() - 1);
    let t = pos - lo as f64;
    sorted[lo] as f64 + t * (sorted[hi] as f64 - sorted[lo] as f64)
}

/// The verdict of a score against a threshold: anomalous when strictly above.
pub fn is_anomalous(score: f32, threshold: f32) -> bool {
    score > threshold
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_match_numpy() {
        // numpy.quantile([1, 2, 3, 4, 10], [0.5, 0.99, 0.25]) == [3.0, 9.76, 2.0]
        let v = [1.0, 2.0, 3.0, 4.0, 10.0];
        assert_eq!(quantile(&v, 0.5), 3.0);
        assert!((quantile(&v, 0.99) - 9.76).abs() < 1e-9);
        assert_eq!(quantile(&v, 0.25), 2.0);
        assert_eq!(quantile(&[7.0], 0.99), 7.0);
    }

    #[test]
    fn rule_is_quantile_plus_margin() {
        let v = [1.0, 2.0, 3.0, 4.0, 10.0];
        let t = threshold(&v) as f64;
        assert!((t - (9.76 + 0.1 * (9.76 - 3.0))).abs() < 1e-5);
        // Identical scores: the threshold is that score, and it is not anomalous.
        assert_eq!(threshold(&[2.5; 8]), 2.5);
        assert!(!is_anomalous(2.5, 2.5));
        assert!(is_anomalous(2.6, 2.5));
    }

    #[test]
    fn held_out_counts() {
        assert_eq!(held_out_count(320, 0.1), 32);
        assert_eq!(held_out_count(12, 0.1), 5);
        assert_eq!(held_out_count(9, 0.1), 0);
        assert_eq!(held_out_count(10, 0.1), 5);
        assert_eq!(held_out_count(320, 0.0), 0);
        assert_eq!(held_out_count(100_000, 0.1), MAX_IMAGES);
    }

    #[test]
    fn calibration_sorts_and_thresholds() {
        let c = Calibration::from_scores(vec![3.0, 1.0, 2.0, 5.0, 4.0], vec![2.0; 5]);
        assert_eq!(c.image_scores, vec![1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(c.images, 5);
        assert!(c.image_threshold > 4.9 && c.image_threshold < 5.5);
        assert_eq!(c.pixel_threshold, 2.0);
        // The threshold (5.16) is above all 5 scores: at most 1 / 6 of new good images.
        assert!((c.false_alarm_bound - 1.0 / 6.0).abs() < 1e-12);
        // 99 ones and a 10: the threshold (1.099) is below the 10, at most 2 / 101.
        let mut v = vec![1.0; 99];
        v.push(10.0);
        let c = Calibration::from_scores(v, vec![1.0; 100]);
        assert!(
            (c.image_threshold - 1.099).abs() < 1e-5,
            "{}",
            c.image_threshold
        );
        assert!((c.false_alarm_bound - 2.0 / 101.0).abs() < 1e-12);
        let c = Calibration::from_scores((1..=99).map(|v| v as f32).collect(), vec![1.0; 99]);
        assert!(
            (c.false_alarm_bound - 1.0 / 100.0).abs() < 1e-12,
            "above all 99"
        );
    }
}
