//! What is said about one scored image, files aside: the thresholds in force, the verdict,
//! the normalized score, the defect mask and its regions (what `NAME.json` holds), and the
//! overlay drawn from them. `predict` writes these; `serve` returns them, so both say the
//! same of the same image.

use anyhow::{bail, Result};
use image::RgbImage;
use ndarray::Array2;

use crate::outputs::files::{self, Thresholds};
use crate::outputs::regions::{self, Region};
use crate::training::calibration;

pub const GOOD: &str = "good";
pub const ANOMALOUS: &str = "anomalous";
/// The verdict of an image that could not be scored (`predict --on-error skip`).
pub const ERROR: &str = "error";

/// The thresholds in force: `--threshold` / `--pixel-threshold` if given, else the model's
/// calibrated `(image, pixel)` thresholds `stored` (an ensemble's are 1 and 1), else none.
pub fn thresholds_from(
    stored: Option<(f32, f32)>,
    threshold: Option<f32>,
    pixel_threshold: Option<f32>,
) -> Result<Option<Thresholds>> {
    for (name, v) in [
        ("--threshold", threshold),
        ("--pixel-threshold", pixel_threshold),
    ] {
        if v.is_some_and(|v| !v.is_finite() || v < 0.0) {
            bail!("{name} must be a non-negative number");
        }
    }
    Ok(match (threshold, stored) {
        (Some(image), _) => Some(Thresholds {
            image,
            // The pixel threshold follows the image threshold in proportion, when the model
            // has both; without calibration the heatmap shares the scores' units.
            pixel: pixel_threshold.unwrap_or_else(|| match stored {
                Some((t, p)) if t > 0.0 => p * image / t,
                _ => image,
            }),
            source: "command line",
        }),
        (None, Some((t, p))) => Some(Thresholds {
            image: t,
            pixel: pixel_threshold.unwrap_or(p),
            source: "calibration",
        }),
        (None, None) => {
            if pixel_threshold.is_some() {
                bail!("--pixel-threshold needs an image threshold: the model has no calibration, pass --threshold too");
            }
            None
        }
    })
}

/// One image's verdict: without thresholds, the score alone.
#[derive(Debug, Clone)]
pub struct Assessment {
    /// Largest patch score (squared L2 distance to the memory bank).
    pub score: f32,
    /// `score / image threshold`: above 1.0 is anomalous.
    pub normalized_score: Option<f32>,
    /// [`GOOD`] or [`ANOMALOUS`].
    pub verdict: Option<&'static str>,
    /// Where the heatmap is above the pixel threshold, at the heatmap's pixels.
    pub mask: Option<Array2<bool>>,
    /// The mask's 8-connected regions.
    pub regions: Vec<Region>,
}

/// The verdict on an image of score `score` and heatmap `heat` (original pixels).
pub fn assess(score: f32, heat: &Array2<f32>, thresholds: Option<Thresholds>) -> Assessment {
    let Some(t) = thresholds else {
        return Assessment {
            score,
            normalized_score: None,
            verdict: None,
            mask: None,
            regions: Vec::new(),
        };
    };
    let mask = heat.mapv(|v| calibration::is_anomalous(v, t.pixel));
    Assessment {
        score,
        normalized_score: Some(if t.image > 0.0 {
            score / t.image
        } else {
            f32::INFINITY
        }),
        verdict: Some(if calibration::is_anomalous(score, t.image) {
            ANOMALOUS
        } else {
            GOOD
        }),
        regions: regions::regions(mask.view()),
        mask: Some(mask),
    }
}

/// The overlay of `NAME.jpg`: with thresholds, the heatmap on a fixed colour scale (blue at
/// 0, the middle at the pixel threshold, red at twice it, so colours compare across images)
/// or, with `contour`, the outlines of the mask's regions; without, the heatmap on a scale
/// spanning this image's own range.
pub fn overlay(
    original: &RgbImage,
    heat: &Array2<f32>,
    assessment: &Assessment,
    thresholds: Option<Thresholds>,
    contour: bool,
) -> RgbImage {
    match (thresholds, &assessment.mask) {
        (Some(_), Some(mask)) if contour => files::contour(original, mask.view()),
        (Some(t), _) => files::overlay(original, heat, 0.0, 2.0 * t.pixel),
        (None, _) => {
            let (lo, hi) = heat
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                    (a.min(v), b.max(v))
                });
            files::overlay(original, heat, lo, hi)
        }
    }
}
