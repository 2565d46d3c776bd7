//! `patchcore predict`: a trained model and a folder of images in; per image an anomaly score,
//! a heatmap (`NAME.npy`, at the original resolution) and an overlay (`NAME.jpg`) out, plus
//! `scores.csv` for the whole run.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use ndarray::ArrayView2;
use tch::Device;

use crate::backbone::{parse_layer, Arch};
use crate::bank::{self, ModelInfo};
use crate::extractor::{Extracted, Extractor};
use crate::images;
use crate::outputs;
use crate::progress;
use crate::scoring;
use crate::weights::WeightsSpec;
use rayon::prelude::*;

pub struct PredictOptions {
    pub input: PathBuf,
    pub output: PathBuf,
    pub index: PathBuf,
    /// Where to find the backbone weights, if not where the model says; checked by checksum.
    pub weights: Option<WeightsSpec>,
    pub batch_size: usize,
    pub device: Device,
    pub quiet: bool,
}

/// One image's result.
#[derive(Debug, Clone)]
pub struct Prediction {
    pub relative: PathBuf,
    pub score: f32,
}

/// Seconds spent per stage over the whole run.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct PredictTimings {
    pub images: usize,
    pub features_s: f64,
    pub knn_s: f64,
    /// Heatmaps, overlays and writing them (done for several images at once).
    pub heatmap_and_write_s: f64,
    pub total_s: f64,
}

pub fn run(opts: &PredictOptions) -> Result<(Vec<Prediction>, PredictTimings)> {
    let t0 = Instant::now();
    let info = bank::read_info(&opts.index)?;
    let mut knn = bank::Knn::new(bank::read_index(&opts.index, &info)?, info.precision)?;
    let side = bank::sidecar_path(&opts.index);
    let arch =
        Arch::parse(&info.backbone).with_context(|| format!("model sidecar {}", side.display()))?;
    let layers = info
        .layers
        .iter()
        .map(|l| parse_layer(l))
        .collect::<Result<Vec<_>>>()
        .with_context(|| format!("model sidecar {}", side.display()))?;
    let channels: Vec<i64> = layers.iter().map(|&l| arch.channels(l)).collect();
    if channels != info.layer_channels {
        bail!(
            "model sidecar {} is inconsistent: {} {:?} has {channels:?} channels, the sidecar says {:?}",
            side.display(),
            info.backbone,
            info.layers,
            info.layer_channels
        );
    }
    let found = images::find_images(&opts.input)?;
    for s in found.skipped.iter().filter(|_| !opts.quiet) {
        crate::note(&format!("skipping {} (not an image file)", s.display()));
    }
    let files = found.images;
    guard_inputs(&files, &opts.output)?;
    std::fs::create_dir_all(&opts.output).map_err(|e| {
        anyhow::anyhow!("cannot create output folder {}: {e}", opts.output.display())
    })?;

    let spec = model_weights(&info, opts.weights.as_ref())?;
    let extractor = Extractor::new(
        arch,
        &layers,
        &spec,
        info.preprocess,
        info.precision,
        opts.device,
        opts.quiet,
    )?;
    if extractor.weights.sha256 != info.weights.sha256 {
        bail!(
            "backbone weights {} differ from the ones model {} was trained with (checksum {} \
             instead of {})",
            extractor.weights.source,
            opts.index.display(),
            extractor.weights.sha256,
            info.weights.sha256
        );
    }

    let mut timings = PredictTimings::default();
    let mut results = Vec::with_capacity(files.len());
    let bar = progress::items(files.len() as u64, "scoring images", opts.quiet);
    let mut t_batch = Instant::now();
    extractor.extract(&files, opts.batch_size, |batch| {
        crate::interrupt::check()?;
        // Everything since the previous batch was handled is feature extraction.
        timings.features_s += t_batch.elapsed().as_secs_f64();

        // One search for the whole batch: a bigger, more efficient distance GEMM.
        let t = Instant::now();
        let views: Vec<_> = batch.iter().map(|e| e.features.view()).collect();
        let queries = ndarray::concatenate(ndarray::Axis(0), &views)?;
        let patch = knn.patch_scores(queries.view(), info.n_neighbors)?;
        timings.knn_s += t.elapsed().as_secs_f64();

        // Heatmaps and files, one image per thread.
        let t = Instant::now();
        let per_image = patch.len() / batch.len();
        let scored: Vec<Prediction> = batch
            .par_iter()
            .zip(patch.par_chunks(per_image))
            .map(|(e, patch)| write_outputs(e, patch, &opts.output))
            .collect::<Result<_>>()?;
        timings.heatmap_and_write_s += t.elapsed().as_secs_f64();

        bar.inc(scored.len() as u64);
        results.extend(scored);
        t_batch = Instant::now();
        Ok(())
    })?;
    bar.finish_and_clear();
    let rows: Vec<(PathBuf, f32)> = results
        .iter()
        .map(|r| (r.relative.clone(), r.score))
        .collect();
    outputs::write_scores_csv(&opts.output.join("scores.csv"), &rows)?;
    timings.images = results.len();
    timings.total_s = t0.elapsed().as_secs_f64();
    Ok((results, timings))
}

/// Scores one image from its patch scores and writes its heatmap and overlay.
fn write_outputs(e: &Extracted, patch: &[f32], out_dir: &Path) -> Result<Prediction> {
    let score = scoring::image_score(patch);
    let map = ArrayView2::from_shape(e.grid, patch)?;
    let (_, _, w, h) = e.geometry.window;
    let heat = scoring::heatmap(map, h as usize, w as usize);
    let full = outputs::to_original(heat.view(), &e.geometry);
    outputs::write_npy(
        &outputs::output_path(out_dir, &e.file.relative, ".npy")?,
        &full,
    )?;
    let (lo, hi) = full
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    let overlay = outputs::overlay(&e.original, &full, lo, hi);
    outputs::write_jpeg(
        &outputs::output_path(out_dir, &e.file.relative, ".jpg")?,
        &overlay,
    )?;
    Ok(Prediction {
        relative: e.file.relative.clone(),
        score,
    })
}

/// The weights to load: the override if given, else what the model recorded.
fn model_weights(info: &ModelInfo, overridden: Option<&WeightsSpec>) -> Result<WeightsSpec> {
    if let Some(w) = overridden {
        return Ok(w.clone());
    }
    let spec = WeightsSpec::parse(&info.weights.spec)?;
    if let WeightsSpec::File(path) = &spec {
        if !path.exists() {
            bail!(
                "the model was trained with backbone weights {}, which no longer exist: pass \
                 their new location with --weights",
                path.display()
            );
        }
    }
    Ok(spec)
}

/// Refuses to run when an output file would replace an input image (e.g. `-o` equals `-i`
/// and an input is named NAME.jpg).
fn guard_inputs(files: &[images::ImageFile], out_dir: &Path) -> Result<()> {
    let canon = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    let inputs: HashSet<PathBuf> = files.iter().map(|f| canon(&f.path)).collect();
    let out_dir = canon(out_dir);
    for f in files {
        for suffix in [".jpg", ".npy"] {
            let mut name = f.relative.file_stem().unwrap_or_default().to_os_string();
            name.push(suffix);
            let out = out_dir.join(&f.relative).with_file_name(name);
            if inputs.contains(&out) {
                bail!(
                    "output {} would overwrite input image {}: choose another output folder",
                    out.display(),
                    f.path.display()
                );
            }
        }
    }
    let csv = out_dir.join("scores.csv");
    if inputs.contains(&csv) {
        bail!("output {} would overwrite an input file", csv.display());
    }
    Ok(())
}
