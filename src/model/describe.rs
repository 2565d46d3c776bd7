//! What a model says of itself: its checksum and its description, the body of serve's
//! `GET /model` (one backbone's settings, bank, thresholds and calibration, or an
//! ensemble's sidecar), whichever kind it is.

use std::path::Path;

use serde::Serialize;

use super::bank::{self, ModelInfo};
use super::ensemble::EnsembleInfo;
use super::Sidecar;
use crate::features::images;
use crate::outputs::files::Thresholds;

impl Sidecar {
    /// BLAKE3 (hex) of the sidecar as loaded. It records the index's own BLAKE3 and the
    /// thresholds, so it changes with either (a new `patchcore calibrate` shows).
    pub fn checksum(&self) -> String {
        match self {
            Sidecar::Single(info) => checksum_of(info),
            Sidecar::Ensemble(e) => checksum_of(e),
        }
    }

    /// The model described as JSON, with the thresholds in force and a stamp (its
    /// `checksum` and when it was loaded).
    pub fn describe(
        &self,
        index: &Path,
        thresholds: Option<Thresholds>,
        stamp: (&str, &str),
    ) -> String {
        match self {
            Sidecar::Single(info) => describe(index, info, thresholds, stamp),
            Sidecar::Ensemble(e) => describe_ensemble(index, e, thresholds, stamp),
        }
    }
}

fn checksum_of(info: &impl Serialize) -> String {
    let bytes = serde_json::to_vec(info).expect("plain data serializes");
    blake3::hash(&bytes).to_hex().to_string()
}

/// `GET /model`: what the model is and the thresholds in force (typed, so float32 values
/// print as in the sidecar).
#[derive(Serialize)]
struct ModelSummary<'a> {
    index: String,
    checksum: &'a str,
    loaded_since: &'a str,
    program_version: &'a str,
    backbone: &'a str,
    layers: &'a [String],
    weights: &'a crate::util::records::WeightsInfo,
    preprocess: images::Preprocess,
    tile: Option<u32>,
    precision: crate::util::records::Precision,
    n_neighbors: usize,
    score_reweighting: Option<usize>,
    bank_size: usize,
    thresholds: Option<Thresholds>,
    calibration: Option<CalibrationSummary<'a>>,
    training: &'a bank::TrainingSummary,
}

/// The calibration without its lists of scores.
#[derive(Serialize)]
struct CalibrationSummary<'a> {
    images: usize,
    rule: &'a str,
    method: crate::util::records::Rule,
    image_threshold: f32,
    pixel_threshold: f32,
    false_alarm_bound: f64,
    folder: Option<&'a str>,
}

fn describe(
    index: &Path,
    info: &ModelInfo,
    thresholds: Option<Thresholds>,
    (checksum, loaded_since): (&str, &str),
) -> String {
    let summary = ModelSummary {
        index: index.display().to_string(),
        checksum,
        loaded_since,
        program_version: &info.program_version,
        backbone: &info.backbone,
        layers: &info.layers,
        weights: &info.weights,
        preprocess: info.preprocess,
        tile: info.tile,
        precision: info.precision,
        n_neighbors: info.n_neighbors,
        score_reweighting: info.score_reweighting,
        bank_size: info.bank_size,
        thresholds,
        calibration: info.calibration.as_ref().map(|c| CalibrationSummary {
            images: c.images,
            rule: &c.rule,
            method: c.method,
            image_threshold: c.image_threshold,
            pixel_threshold: c.pixel_threshold,
            false_alarm_bound: c.false_alarm_bound,
            folder: c.folder.as_deref(),
        }),
        training: &info.training,
    };
    serde_json::to_string(&summary).expect("plain data serializes")
}

/// `GET /model` of an ensemble: its sidecar (every backbone with its thresholds) and the
/// thresholds in force on the combined score.
fn describe_ensemble(
    index: &Path,
    info: &EnsembleInfo,
    thresholds: Option<Thresholds>,
    (checksum, loaded_since): (&str, &str),
) -> String {
    serde_json::to_string(&serde_json::json!({
        "index": index.display().to_string(),
        "checksum": checksum,
        "loaded_since": loaded_since,
        "thresholds": thresholds,
        "ensemble": info,
    }))
    .expect("plain data serializes")
}
