//! `patchcore calibrate`: new thresholds for a trained model from a folder of good images,
//! for when lighting or material drift and the thresholds calibrated at training time no
//! longer fit. The images are scored exactly as predict scores them; the new calibration
//! replaces the old one in the sidecar (atomically), the index is not touched.

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::{bail, Result};
use tch::Device;

use crate::features::images;
use crate::features::weights::WeightsSpec;
use crate::model::single::SingleModel;
use crate::model::{bank, Sidecar};
use crate::training::calibration;
use crate::util::log::{self, Level};
use crate::util::records::{Calibration, Rule};

pub struct CalibrateOptions {
    /// Folder of good images (searched recursively).
    pub input: PathBuf,
    pub index: PathBuf,
    /// Where to find the backbone weights, if not where the model says; checked by checksum.
    pub weights: Option<WeightsSpec>,
    pub rule: Rule,
    /// Compute and report only; the sidecar is not written.
    pub dry_run: bool,
    pub batch_size: usize,
    /// Memory budget in bytes, a hard limit (refused before scoring when it cannot fit).
    pub max_memory: u64,
    pub device: Device,
    pub quiet: bool,
}

/// What a run found.
pub struct Recalibration {
    /// The model's calibration before (none for a model trained without one).
    pub previous: Option<Calibration>,
    pub calibration: Calibration,
    /// Whether the sidecar was written (not with `--dry-run`).
    pub written: bool,
}

/// Calibrates every member of the model `opts.index` (itself, or each backbone of an
/// ensemble) on the images, all scored before any sidecar is written, then (not with
/// `--dry-run`) brings an ensemble's own sidecar up to date. Returns each member's index and
/// recalibration.
pub fn run(opts: &CalibrateOptions) -> Result<Vec<(PathBuf, Recalibration)>> {
    let sidecar = Sidecar::read(&opts.index, opts.weights.is_some())?;
    let mut computed = Vec::new();
    for path in sidecar.member_indices(&opts.index) {
        let member = CalibrateOptions {
            index: path,
            input: opts.input.clone(),
            weights: opts.weights.clone(),
            rule: opts.rule,
            dry_run: opts.dry_run,
            batch_size: opts.batch_size,
            max_memory: opts.max_memory,
            device: opts.device,
            quiet: opts.quiet,
        };
        let found = compute(&member)?;
        computed.push((member, found));
    }
    let mut done = Vec::new();
    for (member, (loaded, calibration)) in computed {
        let run = write(&member, &loaded, calibration)?;
        done.push((member.index, run));
    }
    if !opts.dry_run {
        sidecar.recalibrated(&opts.index)?;
    }
    Ok(done)
}

/// The model's sidecar as loaded and its new calibration from the images, nothing written.
fn compute(opts: &CalibrateOptions) -> Result<(bank::ModelInfo, Calibration)> {
    // Cheap checks first: the sidecar, the images, then the index's checksum (in
    // `SingleModel::load`), all before any image is scored.
    let info = bank::read_info(&opts.index)?;
    if !opts.dry_run {
        bank::check_recalibratable(&opts.index)?;
        // The sidecar is rewritten in the model's folder: writable, checked before scoring.
        crate::util::fsutil::OutputFolder::prepare(crate::util::fsutil::folder(&opts.index), None)?;
    }
    let found = images::find_images(&opts.input)?;
    for s in found.skipped.iter().filter(|_| !opts.quiet) {
        log::info(&format!("skipping {} (not an image file)", s.display()));
    }
    let files = found.images;
    if files.len() < calibration::MIN_IMAGES {
        bail!(
            "input folder {} holds {} image{}: calibrating needs at least {} good images",
            opts.input.display(),
            files.len(),
            if files.len() == 1 { "" } else { "s" },
            calibration::MIN_IMAGES
        );
    }
    let SingleModel {
        info,
        mut knn,
        extractor,
        ..
    } = SingleModel::load(
        &opts.index,
        info,
        opts.weights.as_ref(),
        opts.device,
        opts.quiet,
    )?;
    check_memory(opts, &info, &extractor, &mut knn)?;
    let scores = calibration::score_images(
        &extractor,
        &mut knn,
        &files,
        info.n_neighbors,
        info.score_reweighting,
        opts.batch_size,
        opts.quiet,
    )?;
    if !opts.quiet {
        note_other_sizes(&info, &scores.sizes);
    }
    let mut calibration = Calibration::from_scores(scores, opts.rule);
    calibration.folder = Some(opts.input.display().to_string());
    Ok((info, calibration))
}

/// Checks `--max-memory` before any image is scored: the runtime and backbone with a batch's
/// activations (measured), the bank (mapped from the index file, resident as it is searched)
/// and the kNN search's structures; without the bf16 shortlist when only that does not fit.
fn check_memory(
    opts: &CalibrateOptions,
    info: &bank::ModelInfo,
    extractor: &crate::features::extractor::Extractor,
    knn: &mut crate::model::knn::Knn,
) -> Result<()> {
    let side = info.preprocess.crop.unwrap_or(info.preprocess.resize);
    let footprint = crate::training::memory::probe(extractor, (side, side))?;
    let batch = footprint.per_image * opts.batch_size.max(1) as u64;
    let (m, d) = (info.bank_size as u64, info.feature_dim.max(1) as u64);
    let stages = |shortlist: bool| {
        let (kept, fitting) = crate::commands::train::plan::knn_search_bytes(m, d, shortlist);
        // A stored projection is not fitted again.
        let fitting = if info.knn_projection.is_some() {
            0
        } else {
            fitting
        };
        vec![crate::training::memory::Stage {
            name: "scoring",
            items: vec![
                (
                    format!(
                        "the bank of {} patches",
                        crate::training::memory::count(info.bank_size)
                    ),
                    m * d * 4,
                ),
                ("the kNN search's structures".into(), kept),
                (
                    format!("a batch's activations ({} images)", opts.batch_size.max(1)),
                    batch.max(fitting),
                ),
                (
                    "a batch's features, their queries and search".into(),
                    crate::commands::train::plan::scoring_bytes(footprint, opts.batch_size, d),
                ),
            ],
        }]
    };
    let fits = |s: bool| {
        crate::training::memory::check(opts.max_memory, footprint.runtime, &stages(s), "").is_ok()
    };
    if !fits(true) && fits(false) {
        knn.without_shortlist();
        return Ok(());
    }
    crate::training::memory::check(
        opts.max_memory,
        footprint.runtime,
        &stages(true),
        &format!(", or a smaller --batch-size than {}", opts.batch_size),
    )
}

/// Writes `calibration` into the sidecar of `opts.index` as `info` was loaded (not with
/// `--dry-run`), with its figure.
fn write(
    opts: &CalibrateOptions,
    info: &bank::ModelInfo,
    calibration: Calibration,
) -> Result<Recalibration> {
    let previous = info.calibration.clone();
    if !opts.dry_run {
        bank::write_calibration(&opts.index, info, calibration.clone())?;
        // The figure beside the model shows the thresholds in force.
        crate::outputs::plots::write_calibration_svg(&opts.index, Some(&calibration))?;
    }
    Ok(Recalibration {
        previous,
        calibration,
        written: !opts.dry_run,
    })
}

/// Says when images differ in size from the training images: they are scored like predict
/// scores them (aspect kept, short side resized; with tiles, cut into the model's tiles), but
/// their scores may not be comparable with the training images'.
fn note_other_sizes(info: &bank::ModelInfo, sizes: &[(u32, u32)]) {
    let trained: BTreeSet<(u32, u32)> = info
        .training
        .image_sizes
        .iter()
        .map(|&(w, h, _)| (w, h))
        .collect();
    let other: Vec<&(u32, u32)> = sizes.iter().filter(|s| !trained.contains(s)).collect();
    let Some(&&(w, h)) = other.first() else {
        return;
    };
    let how = match info.tile {
        Some(t) => format!("cut into tiles of {t} pixels"),
        None => format!("short side resized to {}", info.preprocess.resize),
    };
    let training: Vec<String> = trained.iter().map(|(w, h)| format!("{w}x{h}")).collect();
    log::info(&format!(
        "{} of {} images differ in size from the training images (e.g. {w}x{h}, training: {}): \
         scored like predict scores them ({how})",
        other.len(),
        sizes.len(),
        training.join(", ")
    ));
}

/// The summary of `calibrate`: old and new thresholds and false-alarm bounds.
pub fn log_summary(index: &std::path::Path, input: &std::path::Path, run: &Recalibration) {
    let new = &run.calibration;
    let old = run.previous.as_ref();
    let was = |f: &dyn Fn(&crate::util::records::Calibration) -> String| {
        old.map_or("none".to_string(), f)
    };
    let msg = format!(
        "{} {} from {} good images in {}{} by the {} rule: image threshold {} -> {}, pixel \
         threshold {} -> {}; good images like them exceed it at most {:.1}% of the time (was {}){}",
        if run.written {
            "calibrated"
        } else {
            "would calibrate"
        },
        index.display(),
        new.images,
        input.display(),
        new.highest()
            .map_or(String::new(), |h| format!(" (the highest {h})")),
        new.method.short(),
        was(&|c| c.image_threshold.to_string()),
        new.image_threshold,
        was(&|c| c.pixel_threshold.to_string()),
        new.pixel_threshold,
        100.0 * new.false_alarm_bound,
        was(&|c| format!(
            "{:.1}% from {} images, {} rule",
            100.0 * c.false_alarm_bound,
            c.images,
            c.method.short()
        )),
        if run.written {
            ""
        } else {
            " (dry run: nothing written)"
        }
    );
    if let Some(w) = new.loose_warning() {
        log::warn(&w);
    }
    log::emit(
        Level::Info,
        &msg,
        serde_json::json!({
            "event": "calibrated",
            "model": index.display().to_string(),
            "folder": input.display().to_string(),
            "dry_run": !run.written,
            "previous": as_written(&old),
            "calibration": as_written(new),
        }),
    );
}

/// `value` as JSON with its numbers as the sidecar writes them (an f32 as its shortest
/// decimal, not widened to f64 as `serde_json::json!` does).
fn as_written<T: serde::Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_string(value)
        .and_then(|text| serde_json::from_str(&text))
        .unwrap_or(serde_json::Value::Null)
}
