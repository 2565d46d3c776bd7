//! Which model a request was scored with: what `GET /model` and `GET /health` say of it (its
//! checksum and since when it is loaded), and what the handlers need of it (preprocessing,
//! thresholds). One [`ModelView`] per load; a reload swaps it.
//!
//! The checksum is BLAKE3 of the loaded sidecar (serialized as loaded). The sidecar records
//! the index's own BLAKE3 and the thresholds, so the checksum changes with either: a new
//! `patchcore calibrate` shows as a new checksum.

use std::path::Path;
use std::time::SystemTime;

use crate::features::images;
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
        let checksum = sidecar.checksum();
        let summary = sidecar.describe(index, thresholds, (&checksum, &since));
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
