//! Scoring a whole test split, as an evaluation does (`patchcore mvtec`), whichever kind the
//! model is.
//!
//! One backbone scores each image as predict does, one at a time. An ensemble is evaluated as
//! the official `run_patchcore.py` evaluates one: every member scores the whole split, then
//! each member's image scores and heatmaps are min-max normalised over the split and averaged
//! (`ensemble::combine_test_scores`, `combine_test_maps`). That rule needs the whole split
//! first, so an ensemble's values depend on the split, unlike predict's single-image rule.

use std::time::Instant;

use anyhow::Result;
use ndarray::Array2;

use super::ensemble::{combine_test_maps, combine_test_scores};
use super::scoring;
use super::single::SingleModel;
use super::Model;
use crate::features::images::ImageFile;
use crate::util::progress;

/// Where the time of scoring a split went (summed over an ensemble's members).
#[derive(Debug, Default, Clone, Copy)]
pub struct SplitTimings {
    /// Decoding, backbone and patch features.
    pub features_s: f64,
    /// The bank's nearest-neighbour search.
    pub knn_s: f64,
    /// Heatmaps, with an ensemble's combination and the caller's handling of each image.
    pub heatmaps_s: f64,
    /// Wall time per image.
    pub per_image_s: f64,
}

impl Model {
    /// Scores the test split `files`, `batch_size` images at a time, and hands `each` every
    /// image's file, original size, heatmap (at the network input's pixels) and score, in
    /// order: a single model's as predict scores them, an ensemble's combined over the split
    /// (see the module doc). Adds the time of each part to `timings`.
    pub fn score_split(
        &mut self,
        files: &[ImageFile],
        batch_size: usize,
        quiet: bool,
        timings: &mut SplitTimings,
        mut each: impl FnMut(&ImageFile, (u32, u32), Array2<f32>, f32) -> Result<()>,
    ) -> Result<()> {
        let members = match self {
            Model::Single(m) => return score_member(m, files, batch_size, quiet, timings, each),
            Model::Ensemble(e) => &mut e.members,
        };
        let (mut scores, mut maps, mut sizes) = (Vec::new(), Vec::new(), Vec::new());
        for m in members.iter_mut() {
            let (mut s, mut h) = (Vec::new(), Vec::new());
            sizes.clear();
            score_member(
                m,
                files,
                batch_size,
                quiet,
                timings,
                |_, size, heat, score| {
                    sizes.push(size);
                    s.push(score);
                    h.push(heat);
                    Ok(())
                },
            )?;
            scores.push(s);
            maps.push(h);
        }
        let t = Instant::now();
        let combined_scores = combine_test_scores(&scores);
        let combined_maps = combine_test_maps(&maps);
        drop(maps);
        for (((file, &size), heat), score) in files
            .iter()
            .zip(&sizes)
            .zip(combined_maps)
            .zip(combined_scores)
        {
            each(file, size, heat, score)?;
        }
        timings.heatmaps_s += t.elapsed().as_secs_f64();
        Ok(())
    }
}

/// Scores `files` with one backbone's model as predict does, handing `each` every image in
/// order; adds the time of each part to `timings`.
fn score_member(
    model: &mut SingleModel,
    files: &[ImageFile],
    batch_size: usize,
    quiet: bool,
    timings: &mut SplitTimings,
    mut each: impl FnMut(&ImageFile, (u32, u32), Array2<f32>, f32) -> Result<()>,
) -> Result<()> {
    let n_neighbors = model.info.n_neighbors;
    let reweighting = model.info.score_reweighting;
    let bar = progress::items(files.len() as u64, "evaluating", quiet);
    let mut t_batch = Instant::now();
    let t_all = Instant::now();
    let knn = &mut model.knn;
    model.extractor.extract(files, batch_size, |batch| {
        crate::util::interrupt::check()?;
        timings.features_s += t_batch.elapsed().as_secs_f64();
        let scored = scoring::score_batch(knn, &batch, n_neighbors, reweighting)?;
        timings.knn_s += scored.knn_s;
        let t = Instant::now();
        for (e, input) in batch.iter().zip(scored.inputs) {
            each(
                &e.file,
                e.geometry.original,
                input.heatmap,
                input.image_score,
            )?;
            bar.inc(1);
        }
        timings.heatmaps_s += scored.heatmaps_s + t.elapsed().as_secs_f64();
        t_batch = Instant::now();
        Ok(())
    })?;
    bar.finish_and_clear();
    timings.per_image_s += t_all.elapsed().as_secs_f64() / files.len().max(1) as f64;
    Ok(())
}
