//! Thresholds from good images, so predict can say "good" or "anomalous" without anyone
//! normalizing scores over a test set.
//!
//! At train time a share of the good images (`--calibration-ratio`) is kept out of the memory
//! bank and scored against it like any image predict sees; later, `patchcore calibrate`
//! scores a folder of new good images the same way and replaces the thresholds (when
//! lighting or material drift). Both go through [`score_images`], which scores exactly as
//! predict does. Two rules turn a list of such scores into a threshold:
//!
//! - `quantile` (the default): `threshold = q99 + 0.1 * (q99 - median)`, where q99 is the
//!   99th percentile (linear interpolation, as `numpy.quantile`);
//! - `sigma`: `threshold = mean + K * std`, the rule of the project this tool grew from
//!   (K = 5 there), std being the population standard deviation (ddof = 0, as numpy's
//!   default `std`).
//!
//! The image threshold applies the rule to image scores (max patch score); the pixel
//! threshold applies it to each calibration image's largest heatmap value, so a good image's
//! mask is empty about as often as its verdict is good.
//!
//! What to expect: with n calibration images, a new good image from the same process lands
//! above the threshold with probability at most `(c + 1) / (n + 1)`, c being the number of
//! calibration scores at or above it (the rank argument of conformal prediction: the new score
//! is equally likely to take any rank among the n + 1), whichever the rule. That bound is
//! stored as `false_alarm_bound`: about 3-6% with the default 32 images of a 320-image set,
//! 1% needs about 100 or more. Scores from a drifted process (lighting, material) are not
//! covered by it.
use anyhow::Result;

use crate::features::extractor::Extractor;
use crate::features::images::ImageFile;
use crate::model::knn::Knn;
use crate::model::scoring;
use crate::util::progress;
use crate::util::records::{Calibration, Rule, ScoredFile};

/// Quantile of the quantile rule.
pub const QUANTILE: f64 = 0.99;
/// Margin of the quantile rule, as a fraction of (quantile - median).
pub const MARGIN: f64 = 0.1;
/// K of the sigma rule unless given (the seed project's `-e 5`).
pub const DEFAULT_SIGMA_COEF: f64 = 5.0;
/// Fewest images that make a calibration.
pub const MIN_IMAGES: usize = 5;
/// Most held-out images: more add little to a 99th percentile and cost training images.
pub const MAX_IMAGES: usize = 1000;

/// Fewer calibration images than this with a false-alarm bound above [`LOOSE_BOUND`]: a loose
/// bound, warned about.
pub const LOOSE_BELOW_IMAGES: usize = 10;
/// See [`LOOSE_BELOW_IMAGES`].
pub const LOOSE_BOUND: f64 = 0.10;

// The two types are defined in `config` (the sidecar records them, and `bank` must not import
// this later stage); what they compute is here.
impl Rule {
    /// The rule from the command line's name and optional coefficient (`coef_option` names
    /// the option in errors).
    pub fn parse(name: &str, coef: Option<f64>, coef_option: &str) -> Result<Rule> {
        match (name, coef) {
            ("quantile", None) => Ok(Rule::Quantile),
            ("quantile", Some(_)) => {
                anyhow::bail!("{coef_option} applies to the sigma rule only, not to quantile")
            }
            ("sigma", coef) => {
                let coef = coef.unwrap_or(DEFAULT_SIGMA_COEF);
                if !(coef.is_finite() && coef >= 0.0) {
                    anyhow::bail!("{coef_option} must be a non-negative number, got {coef}");
                }
                Ok(Rule::Sigma { coef })
            }
            (other, _) => anyhow::bail!("unknown calibration rule '{other}' (quantile or sigma)"),
        }
    }

    /// The rule in words, stored in the sidecar's `rule`.
    pub fn describe(&self) -> String {
        match self {
            Rule::Quantile => {
                "q99 + 0.1 * (q99 - median) of good images (numpy-style quantiles)".to_string()
            }
            Rule::Sigma { coef } => {
                format!("mean + {coef} * std of good images (population std, ddof=0, as numpy.std)")
            }
        }
    }

    /// A short name for messages: `quantile` or `sigma (K = 5)`.
    pub fn short(&self) -> String {
        match self {
            Rule::Quantile => "quantile".to_string(),
            Rule::Sigma { coef } => format!("sigma (K = {coef})"),
        }
    }

    /// The threshold of `sorted` (ascending, non-empty) scores.
    pub fn threshold(&self, sorted: &[f32]) -> f32 {
        match self {
            Rule::Quantile => threshold(sorted),
            Rule::Sigma { coef } => {
                let (mean, std) = mean_std(sorted);
                (mean + coef * std) as f32
            }
        }
    }
}

impl Calibration {
    pub fn from_scores(scores: Scores, rule: Rule) -> Self {
        let mut scored_images: Vec<ScoredFile> = scores
            .names
            .iter()
            .zip(scores.image_scores.iter().zip(&scores.heatmap_maxima))
            .map(|(file, (&score, &heatmap_max))| ScoredFile {
                file: file.clone(),
                score,
                heatmap_max,
            })
            .collect();
        scored_images.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.file.cmp(&b.file)));
        let (mut image_scores, mut heatmap_maxima) = (scores.image_scores, scores.heatmap_maxima);
        image_scores.sort_by(f32::total_cmp);
        heatmap_maxima.sort_by(f32::total_cmp);
        let image_threshold = rule.threshold(&image_scores);
        let at_or_above = image_scores
            .iter()
            .filter(|&&s| s >= image_threshold)
            .count();
        Calibration {
            images: image_scores.len(),
            rule: rule.describe(),
            method: rule,
            folder: None,
            image_threshold,
            pixel_threshold: rule.threshold(&heatmap_maxima),
            false_alarm_bound: (at_or_above + 1) as f64 / (image_scores.len() + 1) as f64,
            image_scores,
            heatmap_maxima,
            scored_images,
        }
    }

    /// The image with the highest score (the one the threshold rests on most), when the
    /// sidecar names them: `NAME (score S)`.
    pub fn highest(&self) -> Option<String> {
        self.scored_images
            .first()
            .map(|s| format!("{} (score {})", s.file, s.score))
    }

    /// The warning for a loose false-alarm bound: above 10% from fewer than 10 images.
    pub fn loose_warning(&self) -> Option<String> {
        (self.false_alarm_bound > LOOSE_BOUND && self.images < LOOSE_BELOW_IMAGES).then(|| {
            format!(
                "the false-alarm bound is loose: {:.1}% from only {} calibration images; \
                 calibrate on more good images (`patchcore calibrate`; 20 give at most about \
                 5%, 100 about 1%)",
                100.0 * self.false_alarm_bound,
                self.images
            )
        })
    }
}

/// Per image, in the order given: its score and its heatmap's largest value, as predict
/// computes them, and its size.
#[derive(Debug, Clone, Default)]
pub struct Scores {
    pub image_scores: Vec<f32>,
    pub heatmap_maxima: Vec<f32>,
    /// Original `(width, height)` of each image.
    pub sizes: Vec<(u32, u32)>,
    /// Each image's file, relative to the folder it was found in.
    pub names: Vec<String>,
}

/// Scores `files` against the bank with predict's scoring step ([`scoring::ImageScorer`]:
/// same extractor batches, k, heatmaps and tiles). The heatmap maximum is taken over the
/// network inputs' heatmaps, before they are mapped back to the original pixels. Used by
/// train's held-out images and by `calibrate`.
pub fn score_images(
    extractor: &Extractor,
    knn: &mut Knn,
    files: &[ImageFile],
    n_neighbors: usize,
    reweighting: Option<usize>,
    batch_size: usize,
    quiet: bool,
) -> Result<Scores> {
    let bar = progress::items(files.len() as u64, "calibrating", quiet);
    let mut out = Scores::default();
    let mut scorer = scoring::ImageScorer::new(knn, n_neighbors, reweighting, false);
    extractor.extract(files, batch_size, |batch| {
        crate::util::interrupt::check()?;
        for image in scorer.score(&batch)?.images {
            out.image_scores.push(image.score);
            out.heatmap_maxima.push(image.input_heatmap_max);
            out.sizes.push(image.original.dimensions());
            out.names.push(image.file.relative.display().to_string());
            bar.inc(1);
        }
        Ok(())
    })?;
    bar.finish_and_clear();
    Ok(out)
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

/// The quantile rule on `sorted` (ascending, non-empty) scores.
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

/// Mean and population standard deviation (ddof = 0, numpy's default) of non-empty
/// `scores`, accumulated in f64 with the mean subtracted first (two passes, as numpy).
pub fn mean_std(scores: &[f32]) -> (f64, f64) {
    assert!(!scores.is_empty());
    let n = scores.len() as f64;
    let mean = scores.iter().map(|&s| s as f64).sum::<f64>() / n;
    let var = scores
        .iter()
        .map(|&s| (s as f64 - mean).powi(2))
        .sum::<f64>()
        / n;
    (mean, var.sqrt())
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

    fn scores(image_scores: Vec<f32>, heatmap_maxima: Vec<f32>) -> Scores {
        Scores {
            image_scores,
            heatmap_maxima,
            sizes: Vec::new(),
            names: Vec::new(),
        }
    }

    #[test]
    fn calibration_names_each_image_highest_first_and_warns_when_loose() {
        let mut s = scores(vec![6.0, 23.6, 8.0, 7.0, 10.0, 9.0], vec![1.0; 6]);
        s.names = ["a", "b", "c", "d", "e", "f"].map(String::from).to_vec();
        let c = Calibration::from_scores(s, Rule::Quantile);
        let order: Vec<&str> = c.scored_images.iter().map(|s| s.file.as_str()).collect();
        assert_eq!(order, ["b", "e", "f", "c", "d", "a"]);
        assert_eq!(c.scored_images[0].score, 23.6);
        assert_eq!(c.highest().unwrap(), "b (score 23.6)");
        // 6 images: bound (0 + 1) / 7 = 14.3%, loose.
        assert!(c.loose_warning().unwrap().contains("14.3% from only 6"));
        // Older sidecars, without names, still read.
        let mut v = serde_json::to_value(&c).unwrap();
        v.as_object_mut().unwrap().remove("scored_images");
        let old: Calibration = serde_json::from_value(v).unwrap();
        assert!(old.scored_images.is_empty() && old.highest().is_none());
        let many = Calibration::from_scores(
            scores((1..=20).map(|v| v as f32).collect(), vec![1.0; 20]),
            Rule::Quantile,
        );
        assert_eq!(many.loose_warning(), None);
        assert!(many.scored_images.is_empty(), "no names given");
    }

    #[test]
    fn calibration_sorts_and_thresholds() {
        let c = Calibration::from_scores(
            scores(vec![3.0, 1.0, 2.0, 5.0, 4.0], vec![2.0; 5]),
            Rule::Quantile,
        );
        assert_eq!(c.method, Rule::Quantile);
        assert_eq!(c.image_scores, vec![1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(c.images, 5);
        assert!(c.image_threshold > 4.9 && c.image_threshold < 5.5);
        assert_eq!(c.pixel_threshold, 2.0);
        // The threshold (5.16) is above all 5 scores: at most 1 / 6 of new good images.
        assert!((c.false_alarm_bound - 1.0 / 6.0).abs() < 1e-12);
        // 99 ones and a 10: the threshold (1.099) is below the 10, at most 2 / 101.
        let mut v = vec![1.0; 99];
        v.push(10.0);
        let c = Calibration::from_scores(scores(v, vec![1.0; 100]), Rule::Quantile);
        assert!(
            (c.image_threshold - 1.099).abs() < 1e-5,
            "{}",
            c.image_threshold
        );
        assert!((c.false_alarm_bound - 2.0 / 101.0).abs() < 1e-12);
        let c = Calibration::from_scores(
            scores((1..=99).map(|v| v as f32).collect(), vec![1.0; 99]),
            Rule::Quantile,
        );
        assert!(
            (c.false_alarm_bound - 1.0 / 100.0).abs() < 1e-12,
            "above all 99"
        );
    }

    #[test]
    fn sigma_rule_is_mean_plus_k_population_std() {
        // numpy: np.mean = 5.0, np.std (ddof=0) = 2.0; the sample std (ddof=1) would be 2.138.
        let v = [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0];
        assert_eq!(mean_std(&v), (5.0, 2.0));
        assert_eq!(Rule::Sigma { coef: 5.0 }.threshold(&v), 15.0);
        assert_eq!(Rule::Sigma { coef: 0.0 }.threshold(&v), 5.0);
        // Both thresholds and the bound follow the rule: 15 is above all 8 scores, 1 / 9.
        let c = Calibration::from_scores(
            scores(v.to_vec(), v.iter().map(|x| x / 2.0).collect()),
            Rule::Sigma { coef: 5.0 },
        );
        assert_eq!((c.image_threshold, c.pixel_threshold), (15.0, 7.5));
        assert!((c.false_alarm_bound - 1.0 / 9.0).abs() < 1e-12);
        // K = 1: 7 is below 2 of the 8 scores (7 and 9): (2 + 1) / 9.
        let c = Calibration::from_scores(scores(v.to_vec(), v.to_vec()), Rule::Sigma { coef: 1.0 });
        assert_eq!(c.image_threshold, 7.0);
        assert!((c.false_alarm_bound - 3.0 / 9.0).abs() < 1e-12);
        assert!(c.rule.contains("ddof=0"), "{}", c.rule);
    }

    #[test]
    fn rules_from_the_command_line_and_the_sidecar() {
        assert_eq!(
            Rule::parse("quantile", None, "--coef").unwrap(),
            Rule::Quantile
        );
        assert_eq!(
            Rule::parse("sigma", None, "--coef").unwrap(),
            Rule::Sigma { coef: 5.0 }
        );
        assert_eq!(
            Rule::parse("sigma", Some(3.0), "--coef").unwrap(),
            Rule::Sigma { coef: 3.0 }
        );
        let e = Rule::parse("quantile", Some(3.0), "--coef").unwrap_err();
        assert!(e.to_string().contains("--coef"), "{e}");
        assert!(Rule::parse("sigma", Some(-1.0), "--coef").is_err());
        assert!(Rule::parse("sigma", Some(f64::NAN), "--coef").is_err());

        let c = Calibration::from_scores(
            scores(vec![1.0; 5], vec![1.0; 5]),
            Rule::Sigma { coef: 3.0 },
        );
        let text = serde_json::to_string(&c).unwrap();
        assert!(
            text.contains(r#""method":{"name":"sigma","coef":3.0}"#),
            "{text}"
        );
        assert!(!text.contains("folder"), "{text}");
        let back: Calibration = serde_json::from_str(&text).unwrap();
        assert_eq!(back, c);
        // A model from before the choice: no method, the quantile rule.
        let mut old: serde_json::Value = serde_json::from_str(&text).unwrap();
        old.as_object_mut().unwrap().remove("method");
        let old: Calibration = serde_json::from_value(old).unwrap();
        assert_eq!(old.method, Rule::Quantile);
    }
}
