//! Which model a request was scored with: what `GET /model` and `GET /health` say of it (its
//! checksum and since when it is loaded), and what the handlers need of it (preprocessing,
//! thresholds). One [`ModelView`] per load; a reload swaps it.
//!
//! The checksum is BLAKE3 of the loaded sidecar (serialized as loaded). The sidecar records
//! the index's own BLAKE3 and the thresholds, so the checksum changes with either: a new
//! `patchcore calibrate` shows as a new checksum.

use std::path::Path;
use std::time::SystemTime;

use serde::Serialize;

use crate::features::images;
use crate::model::bank::{self, ModelInfo};
use crate::model::ensemble::EnsembleInfo;
use crate::model::Sidecar;
use crate::outputs::files::Thresholds;

/// A loaded model as the handlers see it.
pub(super) struct ModelView {
    /// BLAKE3 (hex) of the loaded sidecar.
    pub checksum: String,
    pub loaded_since: SystemTime,
    pub thresholds: Option<Thresholds>,
    pub preprocess: images::Preprocess,
    pub tile: Option<u32>,
    /// The body of `GET /model`.
    pub summary: String,
}

impl ModelView {
    /// The view of the model `sidecar` describes, loaded from `index` now.
    pub fn new(index: &Path, sidecar: &Sidecar, thresholds: Option<Thresholds>) -> ModelView {
        let loaded_since = SystemTime::now();
        let since = humantime::format_rfc3339_seconds(loaded_since).to_string();
        let (preprocess, tile) = sidecar.preprocess();
        let (checksum, summary) = match sidecar {
            Sidecar::Single(info) => {
                let checksum = checksum_of(info);
                let summary = describe(index, info, thresholds, (&checksum, &since));
                (checksum, summary)
            }
            Sidecar::Ensemble(e) => {
                let checksum = checksum_of(e);
                let summary = describe_ensemble(index, e, thresholds, (&checksum, &since));
                (checksum, summary)
            }
        };
        ModelView {
            checksum,
            loaded_since,
            thresholds,
            preprocess,
            tile,
            summary,
        }
    }

    /// When it was loaded, RFC 3339 in UTC.
    pub fn since(&self) -> String {
        humantime::format_rfc3339_seconds(self.loaded_since).to_string()
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
