//! The memory bank on disk: a FAISS `IndexFlatL2` (a plain FAISS file, readable by Python's
//! `faiss.read_index`) and a JSON sidecar beside it (`index.faiss.json`) with everything
//! predict needs to reproduce the features the bank was built from.
//!
//! The sidecar records the index file's checksums (BLAKE3, and SHA-256 for older versions);
//! we check one before FAISS ever reads the file, so a truncated, replaced or mismatched index
//! is refused with a clear message.

use std::ffi::{c_int, c_void};
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use faiss::index::IndexImpl;
use faiss::index::UpcastIndex;
use faiss::{FlatIndex, Index, MetricType};
use ndarray::ArrayView2;
use serde::{Deserialize, Serialize};

use crate::features::images::Preprocess;
use crate::util::fsutil::{self, blake3_file, sha256_file, AtomicFile};
use crate::util::records::{
    Calibration, Precision, Rule, StoredProjection, WeightsInfo, EMBED_DIM, PATCH_SIZE,
};

/// Identifies our sidecar files.
pub const FORMAT: &str = "patchcore-model";
/// Bumped whenever a change makes older models unusable.
pub const FORMAT_VERSION: u32 = 1;
/// Identifies the sidecars of backbone ensembles (`ensemble`): not a model of one bank, but a
/// list of them.
pub const ENSEMBLE_FORMAT: &str = "patchcore-ensemble";
/// Identifies the sidecars of partial models (`train --shard`, `train --partial`): banks that
/// only `patchcore merge` reads, never predict.
pub const PARTIAL_FORMAT: &str = "patchcore-partial-model";

/// Everything about a trained model except the bank itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelInfo {
    pub format: String,
    pub format_version: u32,
    pub program_version: String,
    pub backbone: String,
    pub layers: Vec<String>,
    /// Output channels of each extracted layer, as seen at train time.
    pub layer_channels: Vec<i64>,
    pub weights: WeightsInfo,
    /// The backbone weights file of a self-contained model (`patchcore export`,
    /// `train --self-contained`): a file name in the sidecar's own folder, e.g.
    /// `resnet18-694f673d.safetensors`. When set (and no `--weights` is given), loading reads
    /// exactly that file, checked against `weights.sha256`, and never the spec, the network or
    /// the cache (`weights.spec` stays as the record of where the weights came from); absent
    /// in other models, which load their weights by `weights.spec`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights_file: Option<String>,
    pub preprocess: Preprocess,
    /// Side of the square tiles images are cut into before preprocessing (`--tile`), in
    /// original pixels; absent = whole images.
    #[serde(default)]
    pub tile: Option<u32>,
    pub normalize_mean: [f32; 3],
    pub normalize_std: [f32; 3],
    pub patch_size: i64,
    /// Per-layer pooled dimension and final feature dimension (the official 1024 / 1024 by
    /// default; `--embed-dim`, `--target-dim`).
    pub pretrain_embed_dim: i64,
    pub feature_dim: i64,
    pub n_neighbors: usize,
    /// Arithmetic of the backbone (the nearest-neighbour search is float32 whatever it is).
    #[serde(default)]
    pub precision: Precision,
    /// The kind of FAISS index holding the bank (`--index`), with its search parameters.
    #[serde(default)]
    pub index: IndexKind,
    /// The official code's BatchNorm probe (`backbone::ResNet::batchnorm_probe`): the side of
    /// its all-ones input, applied to the weights before any feature is extracted; null = the
    /// weights' own statistics (also what models from before this field mean).
    #[serde(default)]
    pub batchnorm_probe: Option<u32>,
    /// The paper's Eq. 7 re-weighting of the image score over this many bank neighbours of the
    /// nearest bank patch ([`crate::model::scoring::reweighting_factor`]); null = off, the official code's plain
    /// maximum.
    #[serde(default)]
    pub score_reweighting: Option<usize>,
    pub sampling_ratio: f64,
    pub seed: u64,
    pub bank_size: usize,
    pub index_sha256: String,
    /// BLAKE3 of the index file, the checksum checked at every load (several times faster on
    /// a large bank than SHA-256, which is still written for older versions of patchcore);
    /// absent in models from before it, whose SHA-256 is checked instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_blake3: Option<String>,
    pub training: TrainingSummary,
    /// Held-out good images and the thresholds derived from them; absent when training had
    /// too few images or `--calibration-ratio 0`.
    #[serde(default)]
    pub calibration: Option<Calibration>,
    pub timings: TrainTimings,
    /// What `patchcore merge` needs of a partial model (format [`PARTIAL_FORMAT`]); absent
    /// in complete models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial: Option<Partial>,
    /// The pruned kNN search's projection (`knn::pruned`) of a flat bank, written last
    /// (it is long); absent in older models and IVF ones: the search fits one at load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub knn_projection: Option<StoredProjection>,
}

/// A partial model's part in a sharded training: which shard of how many, and the held-out
/// calibration images, chosen from the whole input (so the same in every shard) and scored
/// by `merge` against the merged bank.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Partial {
    pub shard: usize,
    pub shards: usize,
    /// Images of the whole input (every shard's and the held-out ones).
    pub input_images: usize,
    /// Share of the shard's patches it keeps (the training ratio times the over-sampling,
    /// at most 1); the merged bank keeps `sampling_ratio` of all patches.
    pub kept_ratio: f64,
    pub calibration_ratio: f64,
    pub calibration_rule: Rule,
    /// The held-out images' absolute paths, in folder order.
    pub held_out: Vec<PathBuf>,
    /// BLAKE3 of `NAME.patches.npz` (`shard::ShardPatches`); absent in partial models of
    /// versions that did not write it, which merge refuses.
    #[serde(default)]
    pub patches_blake3: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainingSummary {
    pub folder: String,
    pub images: usize,
    pub patches: usize,
    /// Distinct original image sizes `(width, height, count)`.
    pub image_sizes: Vec<(u32, u32, usize)>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TrainTimings {
    pub feature_extraction_s: f64,
    pub coreset_s: f64,
    #[serde(default)]
    pub calibration_s: f64,
    pub index_write_s: f64,
    pub total_s: f64,
}

/// The sidecar that belongs to an index path.
pub fn sidecar_path(index: &Path) -> PathBuf {
    let mut s = index.as_os_str().to_owned();
    s.push(".json");
    PathBuf::from(s)
}

/// The L2 FAISS index of kind `kind` over `bank` (`[M, D]`): exact flat, or IVF trained
/// (FAISS's k-means, seeded) on the bank itself.
pub fn build(bank: ArrayView2<f32>, kind: IndexKind) -> Result<IndexImpl> {
    let bank = bank.as_standard_layout();
    let rows = bank.as_slice().expect("standard layout");
    let d = bank.ncols() as u32;
    match kind {
        IndexKind::Flat => {
            let mut index = FlatIndex::new_l2(d)?;
            index.add(rows)?;
            Ok(index.upcast())
        }
        IndexKind::Ivf { nlist, nprobe } => {
            if nlist == 0 || nlist as usize > bank.nrows() {
                bail!(
                    "--nlist {nlist} does not fit a bank of {} patches (1 to the bank size)",
                    bank.nrows()
                );
            }
            let mut index = faiss::index_factory(d, format!("IVF{nlist},Flat"), MetricType::L2)?;
            index.train(rows)?;
            index.add(rows)?;
            prepare_ivf(&mut index, nprobe)?;
            Ok(index)
        }
    }
}

/// Set to 1 in tests only: `write` kills its own process (SIGKILL) between renaming the index
/// and the sidecar into place, the one moment a kill leaves the two apart.
pub const KILL_BETWEEN_RENAMES: &str = "PATCHCORE_TEST_KILL_BETWEEN_RENAMES";

/// Writes index and sidecar so that a kill at any moment leaves a usable model, the old pair
/// or the new one. Fills in `info.index_sha256`, `info.index_blake3` and `info.bank_size`.
///
/// Both files are written and synced to disk under temporary names, then the index is renamed
/// into place, then the sidecar. A kill between the two renames leaves the new index beside
/// the old sidecar, and the new sidecar, complete, under its temporary name: readers find it
/// there by the index checksum it records ([`read_info`]), and the next write of this model
/// renames it into place first ([`finish_interrupted`]).
pub fn write(index_path: &Path, index: &IndexImpl, info: &mut ModelInfo) -> Result<()> {
    finish_interrupted(index_path)?;
    let mut tmp = AtomicFile::create(index_path)?;
    let tmp_path = tmp.temp_path().to_path_buf();
    faiss::write_index(index, tmp_path.to_string_lossy().as_ref())
        .map_err(|e| anyhow!("cannot write index {}: {e}", index_path.display()))?;
    info.index_sha256 = sha256_file(&tmp_path)?;
    info.index_blake3 = Some(blake3_file(&tmp_path)?);
    info.bank_size = index.ntotal() as usize;

    let mut side = sidecar_file(index_path, info)?;
    side.sync()?;
    tmp.sync()?;
    // The new sidecar's temporary name must be on disk before the index is replaced.
    let dir = fsutil::folder(index_path);
    fsutil::sync_folder(dir)?;
    tmp.commit()?;
    if std::env::var_os(KILL_BETWEEN_RENAMES).is_some_and(|v| v == "1") {
        // SAFETY: ends this process, as `kill -9` would; nothing runs after it.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
    side.commit()?;
    fsutil::sync_folder(dir)
}

/// Writes the sidecar of `index_path` atomically.
pub fn write_info(index_path: &Path, info: &ModelInfo) -> Result<()> {
    finish_interrupted(index_path)?;
    sidecar_file(index_path, info)?.commit()
}

/// The sidecar of `index_path` written to its temporary file, ready to be committed.
fn sidecar_file(index_path: &Path, info: &ModelInfo) -> Result<AtomicFile> {
    let mut side = AtomicFile::create(&sidecar_path(index_path))?;
    serde_json::to_writer_pretty(&mut side, info)?;
    std::io::Write::write_all(&mut side, b"\n")?;
    Ok(side)
}

/// Finishes the write of a run killed between its two renames (see [`write()`]): when the
/// sidecar does not belong to the index and the temporary sidecar of a process that is gone
/// does, that one is renamed into place. Run before any write of the model, since writing
/// removes such temporary files.
pub fn finish_interrupted(index_path: &Path) -> Result<()> {
    let side = sidecar_path(index_path);
    let dead: Vec<PathBuf> = fsutil::temp_files(&side)
        .into_iter()
        .filter(|(_, pid)| *pid != std::process::id() && !fsutil::process_exists(*pid))
        .map(|(path, _)| path)
        .collect();
    if dead.is_empty() || !index_path.is_file() {
        return Ok(());
    }
    let actual = sha256_file(index_path)?;
    if read_text(&side).is_ok_and(|t| recorded_sha256(&t).as_deref() == Some(&actual)) {
        return Ok(());
    }
    if let Some(found) = dead.iter().find(|p| belongs_to(p, &actual)) {
        std::fs::rename(found, &side)
            .with_context(|| format!("cannot write model sidecar {}", side.display()))?;
        fsutil::sync_folder(fsutil::folder(&side))?;
    }
    Ok(())
}

/// Whether the sidecar file at `path` is complete and describes the index of checksum `sha`.
fn belongs_to(path: &Path, sha: &str) -> bool {
    read_text(path).is_ok_and(|t| {
        recorded_sha256(&t).as_deref() == Some(sha)
            && (parse_info(&t).is_ok() || parse_info_as(&t, PARTIAL_FORMAT).is_ok())
    })
}

/// The index checksum sidecar text records, if it is JSON that records one.
fn recorded_sha256(text: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(text).ok()?;
    Some(value.get("index_sha256")?.as_str()?.to_string())
}

/// Largest sidecar we read (they are a few KiB).
const MAX_SIDECAR_BYTES: u64 = 1 << 20;

/// Reads and checks the sidecar of `index_path`.
pub fn read_info(index_path: &Path) -> Result<ModelInfo> {
    read_info_as(index_path, FORMAT)
}

/// Reads and checks the sidecar of `index_path`, a model of `format`.
pub fn read_info_as(index_path: &Path, format: &str) -> Result<ModelInfo> {
    let text = read_sidecar(index_path)?;
    parse_info_as(&text, format)
        .map_err(|e| anyhow!("model sidecar {}{e}", sidecar_path(index_path).display()))
}

/// The sidecar text of `index_path`, unchecked: the sidecar file's, or, where a write was
/// killed between its two renames (or is between them now), the complete temporary sidecar
/// that records the index's checksum (see [`write`]). Only when temporary sidecars exist is
/// the index read to tell; a pair that still does not match is left for `read_index` to
/// refuse.
fn read_sidecar(index_path: &Path) -> Result<String> {
    let side = sidecar_path(index_path);
    if !index_path.exists() {
        // An ensemble has no index of its own, only the sidecar: read on, to be refused by
        // its format with the reason.
        let ensemble = read_text(&side).ok().filter(|t| is_ensemble_sidecar(t));
        if let Some(text) = ensemble {
            return Ok(text);
        }
        bail!(
            "model index {} does not exist (train one with `patchcore train`)",
            index_path.display()
        );
    }
    let cannot = |e: &dyn std::fmt::Display| {
        anyhow!(
            "model sidecar {} cannot be read ({e}); it is written by `patchcore train` beside the index",
            side.display()
        )
    };
    let mut text = Err(cannot(&"not read"));
    // A few looks, in case a writer moves on while we read.
    for _ in 0..3 {
        let pending_before = fsutil::temp_files(&side);
        text = read_text(&side).map_err(|e| cannot(&e));
        let pending = fsutil::temp_files(&side);
        if pending_before.is_empty() && pending.is_empty() {
            break;
        }
        let actual = sha256_file(index_path)?;
        if text
            .as_ref()
            .is_ok_and(|t| recorded_sha256(t).as_deref() == Some(&actual))
        {
            break;
        }
        if let Some((found, _)) = pending.iter().find(|(p, _)| belongs_to(p, &actual)) {
            if let Ok(t) = read_text(found) {
                return Ok(t);
            }
        }
    }
    text
}

/// Whether sidecar text is an ensemble's ([`ENSEMBLE_FORMAT`]).
pub fn is_ensemble_sidecar(text: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(text)
        .is_ok_and(|v| v.get("format").and_then(|f| f.as_str()) == Some(ENSEMBLE_FORMAT))
}

/// The text of a sidecar file, refused past `MAX_SIDECAR_BYTES`.
fn read_text(path: &Path) -> std::io::Result<String> {
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_SIDECAR_BYTES + 1).read_to_string(&mut text))?;
    if text.len() as u64 > MAX_SIDECAR_BYTES {
        return Err(std::io::Error::other(
            "larger than any sidecar patchcore writes",
        ));
    }
    Ok(text)
}

/// Replaces the calibration in the sidecar of `index_path` (atomically; the index is not
/// touched), every other field left exactly as it was. `loaded` is the sidecar as read before
/// the calibration images were scored: if the model changed since (trained again), nothing is
/// written.
pub fn write_calibration(
    index_path: &Path,
    loaded: &ModelInfo,
    calibration: Calibration,
) -> Result<ModelInfo> {
    let info = recalibrated(index_path, Some(calibration.clone()))?;
    let unchanged = ModelInfo {
        calibration: loaded.calibration.clone(),
        ..info.clone()
    };
    if unchanged != *loaded {
        bail!(
            "model sidecar {} changed while the images were scored (trained again?): \
             nothing written, run calibrate again",
            sidecar_path(index_path).display()
        );
    }
    write_info(index_path, &info)?;
    Ok(info)
}

/// Checks that the sidecar of `index_path` can take a new calibration with every other field
/// left as it is (see [`write_calibration`]), before any work is done.
pub fn check_recalibratable(index_path: &Path) -> Result<()> {
    let info = read_info(index_path)?;
    recalibrated(index_path, info.calibration).map(|_| ())
}

/// The sidecar of `index_path` with `calibration` in place of its own (see [`rewritten`]).
fn recalibrated(index_path: &Path, calibration: Option<Calibration>) -> Result<ModelInfo> {
    rewritten(index_path, "calibration", |info| {
        info.calibration = calibration
    })
}

/// The sidecar of `index_path` with its field `key` changed by `change`; refused when writing
/// it would change any other field (a sidecar with fields this version of patchcore does not
/// know would lose them). Fields this version adds with their defaults may appear.
pub fn rewritten(
    index_path: &Path,
    key: &str,
    change: impl FnOnce(&mut ModelInfo),
) -> Result<ModelInfo> {
    let side = sidecar_path(index_path);
    let text = read_sidecar(index_path)?;
    let mut info = parse_info(&text).map_err(|e| anyhow!("model sidecar {}{e}", side.display()))?;
    change(&mut info);
    let object = |text: &str| -> Result<serde_json::Map<String, serde_json::Value>> {
        match serde_json::from_str(text)? {
            serde_json::Value::Object(m) => Ok(m),
            _ => bail!("model sidecar {} is not a JSON object", side.display()),
        }
    };
    let (before, after) = (object(&text)?, object(&serde_json::to_string(&info)?)?);
    for (field, value) in before.iter().filter(|(k, _)| *k != key) {
        if after.get(field) != Some(value) {
            bail!(
                "model sidecar {} holds field '{field}' that this patchcore {} would not write \
                 back as it is (written by patchcore {}): nothing written",
                side.display(),
                env!("CARGO_PKG_VERSION"),
                info.program_version
            );
        }
    }
    Ok(info)
}

/// Parses and checks sidecar text. Errors start with ": " or " " to follow the file's name.
pub fn parse_info(text: &str) -> Result<ModelInfo> {
    parse_info_as(text, FORMAT)
}

/// Parses and checks sidecar text of a model of `format` ([`FORMAT`] or [`PARTIAL_FORMAT`]).
pub fn parse_info_as(text: &str, format: &str) -> Result<ModelInfo> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| anyhow!(" is not valid JSON: {e}"))?;
    match value.get("format").and_then(|f| f.as_str()) {
        Some(f) if f == format => {}
        Some(PARTIAL_FORMAT) => bail!(
            " is a partial model (one part of a sharded training): combine the parts with \
             `patchcore merge` first"
        ),
        Some(FORMAT) => bail!(
            " is a complete model, not a partial one (a model to grow is given to merge with --base)"
        ),
        Some(ENSEMBLE_FORMAT) => bail!(
            " is an ensemble of several backbones, which this command does not take: give one \
             of its members (STEM.I-BACKBONE.faiss beside it)"
        ),
        _ => bail!(" is not a patchcore model sidecar"),
    }
    let version = value.get("format_version").and_then(|v| v.as_u64());
    if version != Some(FORMAT_VERSION as u64) {
        let by = value
            .get("program_version")
            .and_then(|v| v.as_str())
            .unwrap_or("an unknown version");
        bail!(
            " was written by patchcore {by} in model format {}; this patchcore {} reads \
             format {FORMAT_VERSION}: train the model again",
            version.map_or("?".to_string(), |v| v.to_string()),
            env!("CARGO_PKG_VERSION")
        );
    }
    let info: ModelInfo =
        serde_json::from_value(value).map_err(|e| anyhow!(" is incomplete or damaged: {e}"))?;
    if info.partial.is_some() != (format == PARTIAL_FORMAT) {
        bail!(" is incomplete or damaged: its partial-model record does not fit its format");
    }
    info.validate()
        .map_err(|e| anyhow!(" is inconsistent: {e}"))?;
    Ok(info)
}

impl ModelInfo {
    /// The feature dimensions the model's bank was built with.
    pub fn dims(&self) -> crate::util::records::EmbedDims {
        crate::util::records::EmbedDims {
            pretrain: self.pretrain_embed_dim,
            target: self.feature_dim,
        }
    }

    /// The backbone weights file of a self-contained model (`weights_file`), in the folder
    /// of the model `index`'s sidecar.
    pub fn weights_path(&self, index: &Path) -> Option<PathBuf> {
        let side = sidecar_path(index);
        let name = self.weights_file.as_ref()?;
        Some(fsutil::folder(&side).join(name))
    }

    /// Ranges every field must be in for predict to work with it.
    fn validate(&self) -> Result<()> {
        if let Some(name) = &self.weights_file {
            let plain = matches!(
                Path::new(name).components().collect::<Vec<_>>()[..],
                [std::path::Component::Normal(n)] if n == name.as_str()
            );
            if !plain {
                bail!(
                    "weights_file '{name}' is not a file name (it names a file beside the sidecar)"
                );
            }
        }
        let p = &self.preprocess;
        if !(1..=crate::features::images::MAX_INPUT_SIDE).contains(&p.resize) {
            bail!("resize {} is out of range", p.resize);
        }
        if p.crop.is_some_and(|c| c == 0 || c > p.resize) {
            bail!("crop {:?} does not fit resize {}", p.crop, p.resize);
        }
        if let Some(t) = self.tile {
            if t < 32 || p.crop.is_some() {
                bail!("tile {t} is invalid (at least 32, and no crop)");
            }
        }
        if self.layers.is_empty() || self.layers.len() != self.layer_channels.len() {
            bail!(
                "layers {:?} and channels {:?} disagree",
                self.layers,
                self.layer_channels
            );
        }
        if self.pretrain_embed_dim < 1
            || !(1..=self.pretrain_embed_dim * self.layers.len() as i64).contains(&self.feature_dim)
            || self.patch_size != PATCH_SIZE
        {
            bail!(
                "feature dimensions {} -> {} / patch size {} are not ones this patchcore computes \
                 (1 to {} layers x the first, e.g. {EMBED_DIM} -> {EMBED_DIM} / {PATCH_SIZE})",
                self.pretrain_embed_dim,
                self.feature_dim,
                self.patch_size,
                self.layers.len()
            );
        }
        if self.score_reweighting == Some(0) || self.batchnorm_probe == Some(0) {
            bail!("score_reweighting and batchnorm_probe must be at least 1 when given");
        }
        if self.n_neighbors == 0 || self.n_neighbors > self.bank_size {
            bail!("k = {} for a bank of {}", self.n_neighbors, self.bank_size);
        }
        if !self.normalize_std.iter().all(|s| s.is_finite() && *s > 0.0) {
            bail!("normalization std {:?} is invalid", self.normalize_std);
        }
        if let Some(c) = &self.calibration {
            if !(c.image_threshold.is_finite() && c.pixel_threshold.is_finite()) {
                bail!("calibration thresholds are not finite numbers");
            }
        }
        Ok(())
    }
}

/// FAISS's `IO_FLAG_MMAP_IFC`: a flat index's vectors are mapped from the file instead of
/// read into memory (searched in place, from the page cache).
const FAISS_IO_FLAG_MMAP_IFC: i32 = 1 << 9;

/// Loads the index after checking that it is the file the sidecar describes: its BLAKE3 (or
/// for models from before that field, its SHA-256) is checked before FAISS reads anything.
/// The vectors are then mapped, not copied: `train` replaces an index by renaming a new
/// file over it, which leaves the mapped one intact.
pub fn read_index(index_path: &Path, info: &ModelInfo) -> Result<IndexImpl> {
    // One open file for the check and for FAISS (through /proc/self/fd), so a model
    // replaced by a rename between the two cannot slip in unchecked.
    let cannot =
        |e: std::io::Error| anyhow!("cannot read model index {}: {e}", index_path.display());
    let file = std::fs::File::open(index_path).map_err(cannot)?;
    // SAFETY: read-only mapping; a model is replaced by renaming, never rewritten in place,
    // so the mapped file does not change under us.
    let empty = file.metadata().map_err(cannot)?.len() == 0;
    let matches = !empty && {
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(cannot)?;
        match &info.index_blake3 {
            Some(expected) => fsutil::blake3_bytes(&map) == *expected,
            None => fsutil::sha256_bytes(&map) == info.index_sha256,
        }
    };
    if !matches {
        bail!(
            "model index {} does not match its sidecar {} (checksum differs: the index is \
             damaged or from another training)",
            index_path.display(),
            sidecar_path(index_path).display()
        );
    }
    use std::os::fd::AsRawFd;
    let index = faiss::index::io::read_index_with_flags(
        format!("/proc/self/fd/{}", file.as_raw_fd()),
        FAISS_IO_FLAG_MMAP_IFC.into(),
    )
    .with_context(|| format!("FAISS cannot read index {}", index_path.display()))?;
    drop(file);
    if index.d() as i64 != info.feature_dim || index.ntotal() as usize != info.bank_size {
        bail!(
            "model index {} holds {} vectors of feature dimension {}, its sidecar {} says {} of {}",
            index_path.display(),
            index.ntotal(),
            index.d(),
            sidecar_path(index_path).display(),
            info.bank_size,
            info.feature_dim
        );
    }
    Ok(index)
}

/// What kind of FAISS index holds the bank, recorded in the sidecar (absent in older models:
/// flat).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum IndexKind {
    /// `IndexFlatL2`: exact search, the official scorer.
    #[default]
    Flat,
    /// `IndexIVFFlat` (`train --bank-index ivf`), for banks of millions of patches: the bank split into
    /// `nlist` k-means cells, `nprobe` of them searched per query (approximate; exact when
    /// `nprobe = nlist`).
    Ivf { nlist: u32, nprobe: u32 },
}

/// What `train --index` asks for, resolved against the bank's size ([`IndexRequest::resolve`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum IndexRequest {
    #[default]
    Flat,
    Ivf {
        nlist: Option<u32>,
        nprobe: Option<u32>,
    },
}

impl IndexRequest {
    /// The index for a bank of `m` vectors. IVF defaults follow FAISS's rule of thumb,
    /// `4 sqrt(m)` lists (at most `m / 39`, the fewest training points per list FAISS
    /// accepts without warning), and `nlist / 16` of them probed (at least 1).
    pub fn resolve(self, m: usize) -> IndexKind {
        match self {
            IndexRequest::Flat => IndexKind::Flat,
            IndexRequest::Ivf { nlist, nprobe } => {
                let nlist = nlist.unwrap_or_else(|| {
                    ((4.0 * (m as f64).sqrt()).round() as u32).min((m / 39).max(1) as u32)
                });
                let nprobe = nprobe.unwrap_or((nlist / 16).max(1)).min(nlist.max(1));
                IndexKind::Ivf { nlist, nprobe }
            }
        }
    }
}

extern "C" {
    // FAISS's C API, for what the faiss crate does not wrap: the IVF view of an index and
    // its direct map (label -> list position, needed to reconstruct a vector by label).
    // (`FaissIndex*` and `FaissIndexIVF*` are opaque pointers.)
    fn faiss_IndexIVF_cast(index: *mut c_void) -> *mut c_void;
    fn faiss_IndexIVF_make_direct_map(index: *mut c_void, maintain: c_int) -> c_int;
    fn faiss_IndexIVF_set_nprobe(index: *mut c_void, nprobe: usize);
}

/// Sets an IVF index's `nprobe` and gives it a direct map (for `Knn::vector`).
pub fn prepare_ivf(index: &mut IndexImpl, nprobe: u32) -> Result<()> {
    // SAFETY: `inner_ptr` is the live index; the cast returns null for a non-IVF index.
    let ivf = unsafe { faiss_IndexIVF_cast(index.inner_ptr().cast()) };
    if ivf.is_null() {
        bail!("the model says IVF, but its FAISS index is not an IVF index");
    }
    if nprobe == 0 {
        bail!("nprobe must be at least 1");
    }
    // SAFETY: `ivf` points into `index`, alive and exclusively borrowed here.
    let rc = unsafe {
        faiss_IndexIVF_set_nprobe(ivf, nprobe as usize);
        faiss_IndexIVF_make_direct_map(ivf, 1)
    };
    if rc != 0 {
        bail!("FAISS cannot build the IVF index's direct map");
    }
    Ok(())
}
