//! Backbone ensembles (`train --backbone A --backbone B ...`): one model made of one complete
//! single-backbone model per backbone (each its own coreset, FAISS index and sidecar, trained
//! by `train::run` with the same images, seed and calibration split), and a manifest in the
//! ensemble's sidecar `INDEX.json` (format [`FORMAT`]) recording every member: backbone,
//! layers, weights, bank size, index checksum and thresholds. The members' files lie beside
//! it: `STEM.I-BACKBONE.faiss` (+ `.json`); `INDEX` itself is not written.
//!
//! Two ways to combine the members' scores:
//! - over a whole test set ([`combine_test_scores`], [`combine_test_maps`]; `mvtec runall`),
//!   as the official `bin/run_patchcore.py` (`run`, after every `PatchCore.predict`) does:
//!   per backbone, image scores min-max normalised over the whole test set, then the mean
//!   over backbones; segmentation maps likewise, with one minimum and one maximum per
//!   backbone over all of its test maps' pixels. (Where a backbone's values are all equal the
//!   official division gives NaN; here they become 0.)
//! - one image at a time, without a test set ([`combine_image`]; predict, calibrate): each
//!   backbone's image score divided by its calibrated image threshold, heatmaps by its pixel
//!   threshold, then the mean over backbones. The ensemble's own thresholds are therefore 1
//!   (verdict: anomalous when the combined score is above 1, exactly 1 being good, as a
//!   single model's score at exactly its threshold is), unless `--threshold` says otherwise.
//!
//! Not matched: the official code seeds its random generators once per category and trains
//! the backbones one after another, so the second backbone's coreset projection and starting
//! points come from where the first left the generators; here every backbone's coreset is
//! seeded with `--seed` as a single model's is (its member is the very model `train` would
//! give for that backbone alone).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use ndarray::Array2;
use serde::{Deserialize, Serialize};
use tch::Device;

use crate::commands::train::{self, TrainOptions};
use crate::features::extractor::{Extracted, Extractor, Prepared};
use crate::features::images::{ImageFile, Preprocess};
use crate::model::bank::{self, ModelInfo};
use crate::model::scoring::{ImageScorer, ScoredImage};
use crate::model::single::SingleModel;
use crate::util::records::WeightsInfo;

/// Identifies ensemble sidecars.
pub const FORMAT: &str = bank::ENSEMBLE_FORMAT;
/// Bumped whenever a change makes older ensembles unusable.
pub const FORMAT_VERSION: u32 = 1;
/// The single-image rule, in words (recorded in the sidecar).
pub const RULE: &str = "mean over backbones of score / the backbone's calibrated threshold \
                        (image and pixel alike); anomalous when above 1 (exactly 1 is good)";

/// The ensemble's sidecar: what is common to the members, and each member.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EnsembleInfo {
    pub format: String,
    pub format_version: u32,
    pub program_version: String,
    pub preprocess: Preprocess,
    /// Tiles of the members (`--tile`), the same for all.
    pub tile: Option<u32>,
    pub sampling_ratio: f64,
    pub seed: u64,
    pub n_neighbors: usize,
    pub pretrain_embed_dim: i64,
    pub feature_dim: i64,
    /// How single images' scores are combined ([`RULE`]).
    pub rule: String,
    /// The combined thresholds (1 and 1 by the rule) when every member is calibrated.
    pub calibration: Option<EnsembleThresholds>,
    pub members: Vec<Member>,
}

/// The thresholds on the combined score and heatmap.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct EnsembleThresholds {
    pub image_threshold: f32,
    pub pixel_threshold: f32,
}

/// One backbone of the ensemble: its model file (beside the ensemble's sidecar) and what
/// its sidecar says.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Member {
    /// The member's index file name, in the ensemble's folder.
    pub index: String,
    pub backbone: String,
    pub layers: Vec<String>,
    pub weights: WeightsInfo,
    pub bank_size: usize,
    /// BLAKE3 of the member's index as its sidecar records it: a member trained again
    /// alone is refused.
    pub index_blake3: Option<String>,
    pub image_threshold: Option<f32>,
    pub pixel_threshold: Option<f32>,
}

impl Member {
    fn of(index: &Path, info: &ModelInfo) -> Member {
        let c = info.calibration.as_ref();
        Member {
            index: index
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
            backbone: info.backbone.clone(),
            layers: info.layers.clone(),
            weights: info.weights.clone(),
            bank_size: info.bank_size,
            index_blake3: info.index_blake3.clone(),
            image_threshold: c.map(|c| c.image_threshold),
            pixel_threshold: c.map(|c| c.pixel_threshold),
        }
    }
}

/// The index file of member `i` (backbone `backbone`) of the ensemble `index`:
/// `STEM.I-BACKBONE.faiss` beside it.
pub fn member_path(index: &Path, i: usize, backbone: &str) -> PathBuf {
    let stem = index
        .file_stem()
        .map_or_else(|| "index".into(), |s| s.to_string_lossy().into_owned());
    index.with_file_name(format!("{stem}.{i}-{backbone}.faiss"))
}

/// Whether the sidecar of `index` is an ensemble's (false when it cannot be read: the
/// single-model path then says why).
pub fn is_ensemble(index: &Path) -> bool {
    std::fs::read_to_string(bank::sidecar_path(index))
        .is_ok_and(|text| bank::is_ensemble_sidecar(&text))
}

/// Reads and checks the ensemble sidecar of `index`.
pub fn read_info(index: &Path) -> Result<EnsembleInfo> {
    let side = bank::sidecar_path(index);
    let text = std::fs::read_to_string(&side)
        .map_err(|e| anyhow!("ensemble sidecar {} cannot be read: {e}", side.display()))?;
    let info: EnsembleInfo = serde_json::from_str(&text).map_err(|e| {
        anyhow!(
            "ensemble sidecar {} is incomplete or damaged: {e}",
            side.display()
        )
    })?;
    if info.format != FORMAT || info.format_version != FORMAT_VERSION {
        bail!(
            "ensemble sidecar {} is of format {} {}; this patchcore reads {FORMAT} {FORMAT_VERSION}",
            side.display(),
            info.format,
            info.format_version
        );
    }
    if info.members.is_empty() {
        bail!("ensemble sidecar {} lists no member", side.display());
    }
    Ok(info)
}

/// The member index paths of the ensemble `index`.
pub fn member_paths(index: &Path, info: &EnsembleInfo) -> Vec<PathBuf> {
    info.members
        .iter()
        .map(|m| index.with_file_name(&m.index))
        .collect()
}

/// Trains one member per options in `members` (each a complete single-backbone training,
/// written beside `output`), then the ensemble's sidecar `output.json`.
pub fn train(members: &[TrainOptions], output: &Path) -> Result<EnsembleInfo> {
    if members.len() < 2 {
        bail!("an ensemble needs at least two backbones");
    }
    if members.iter().any(|m| m.shard.is_some()) {
        bail!("--shard and --partial train one backbone: not with several --backbone");
    }
    // Every member's options are checked before any is trained.
    for m in members {
        train::check_options(m)?;
    }
    let mut infos = Vec::new();
    for (i, m) in members.iter().enumerate() {
        crate::util::interrupt::check()?;
        let path = member_path(output, i, m.arch.name());
        if !m.quiet {
            crate::util::log::info(&format!(
                "backbone {}/{}: {} into {}",
                i + 1,
                members.len(),
                m.arch.name(),
                path.display()
            ));
        }
        let opts = TrainOptions {
            output: path.clone(),
            ..m.clone()
        };
        let info = train::run(&opts)?;
        infos.push((path, info));
    }
    let info = manifest(&infos);
    write_info(output, &info)?;
    // A single model trained here before would be left beside a sidecar that is no longer
    // its own.
    if output.is_file() {
        std::fs::remove_file(output)
            .with_context(|| format!("cannot remove the old index {}", output.display()))?;
    }
    Ok(info)
}

/// The ensemble sidecar of the members `(index, sidecar)`.
fn manifest(members: &[(PathBuf, ModelInfo)]) -> EnsembleInfo {
    let first = &members[0].1;
    let calibrated = members.iter().all(|(_, i)| i.calibration.is_some());
    EnsembleInfo {
        format: FORMAT.to_string(),
        format_version: FORMAT_VERSION,
        program_version: env!("CARGO_PKG_VERSION").to_string(),
        preprocess: first.preprocess,
        tile: first.tile,
        sampling_ratio: first.sampling_ratio,
        seed: first.seed,
        n_neighbors: first.n_neighbors,
        pretrain_embed_dim: first.pretrain_embed_dim,
        feature_dim: first.feature_dim,
        rule: RULE.to_string(),
        calibration: calibrated.then_some(EnsembleThresholds {
            image_threshold: 1.0,
            pixel_threshold: 1.0,
        }),
        members: members.iter().map(|(p, i)| Member::of(p, i)).collect(),
    }
}

fn write_info(index: &Path, info: &EnsembleInfo) -> Result<()> {
    crate::outputs::files::write_json(&bank::sidecar_path(index), info, true)
}

/// Rewrites the ensemble sidecar of `index` from its members' sidecars as they are now
/// (after `calibrate` gave each new thresholds).
pub fn refresh(index: &Path, info: &EnsembleInfo) -> Result<EnsembleInfo> {
    let members = member_paths(index, info)
        .into_iter()
        .map(|p| Ok((p.clone(), bank::read_info(&p)?)))
        .collect::<Result<Vec<_>>>()?;
    let fresh = EnsembleInfo {
        program_version: info.program_version.clone(),
        ..manifest(&members)
    };
    write_info(index, &fresh)?;
    Ok(fresh)
}

/// The sidecar of the member `m` of the ensemble `index`, whose index is `path`, checked to be
/// the model the ensemble lists.
pub fn read_member(index: &Path, path: &Path, m: &Member) -> Result<ModelInfo> {
    let member = bank::read_info(path)
        .with_context(|| format!("member {} of ensemble {}", m.backbone, index.display()))?;
    if member.index_blake3 != m.index_blake3 || member.backbone != m.backbone {
        bail!(
            "member {} of ensemble {} is not the model the ensemble was trained with \
             (trained again alone?): train the ensemble again",
            path.display(),
            index.display()
        );
    }
    Ok(member)
}

/// A loaded ensemble: its sidecar and every member's model, checked to be the ones it lists.
pub struct Ensemble {
    pub info: EnsembleInfo,
    pub members: Vec<SingleModel>,
}

impl Ensemble {
    pub fn load(index: &Path, info: EnsembleInfo, device: Device, quiet: bool) -> Result<Ensemble> {
        let mut members = Vec::new();
        for (path, m) in member_paths(index, &info).iter().zip(&info.members) {
            let member = read_member(index, path, m)?;
            members.push(SingleModel::load(path, member, None, device, quiet)?);
        }
        Ok(Ensemble { info, members })
    }

    /// Each member's (image, pixel) threshold, refused when one is not calibrated.
    pub fn thresholds(&self, index: &Path) -> Result<Vec<(f32, f32)>> {
        self.members
            .iter()
            .map(|m| {
                m.info
                    .calibration
                    .as_ref()
                    .map(|c| (c.image_threshold, c.pixel_threshold))
                    .ok_or_else(|| no_calibration(index))
            })
            .collect()
    }

    /// Scores `files` with every member, `batch_size` images at a time, and hands `sink`
    /// the combined images ([`combine_image`]) in order, with the seconds of kNN search and
    /// heatmaps spent on them.
    /// With `skipped`, images that cannot be read are added to it with their reason
    /// instead of ending the run (as `Extractor::extract_skipping`; every member reads the
    /// same files, the first member's list is kept).
    pub fn score(
        &mut self,
        index: &Path,
        files: &[ImageFile],
        batch_size: usize,
        mut skipped: Option<&mut Vec<(ImageFile, anyhow::Error)>>,
        mut sink: impl FnMut(Vec<ScoredImage>, f64, f64) -> Result<()>,
    ) -> Result<()> {
        let thresholds = self.thresholds(index)?;
        let skip = skipped.is_some();
        for chunk in files.chunks(batch_size.max(1)) {
            crate::util::interrupt::check()?;
            let bad = std::cell::RefCell::new(None);
            let (images, knn_s, heat_s) = self.score_with(&thresholds, |extractor, each| {
                let mut mine = Vec::new();
                let done =
                    extractor.extract_skipping(chunk, batch_size, skip.then_some(&mut mine), each);
                bad.borrow_mut().get_or_insert(mine);
                done
            })?;
            if let (Some(list), Some(bad)) = (skipped.as_mut(), bad.into_inner()) {
                list.extend(bad);
            }
            sink(images, knn_s, heat_s)?;
        }
        Ok(())
    }

    /// Scores images already decoded and prepared (serve's requests) with every member;
    /// returns them combined ([`combine_image`]), in order.
    pub fn score_prepared(
        &mut self,
        index: &Path,
        inputs: Vec<Prepared>,
        batch_size: usize,
    ) -> Result<Vec<ScoredImage>> {
        let thresholds = self.thresholds(index)?;
        let (images, _, _) = self.score_with(&thresholds, |extractor, each| {
            extractor.run_prepared(inputs.clone(), batch_size, each)
        })?;
        Ok(images)
    }

    /// The images `run` extracts with each member (handing its batches to the sink it is
    /// given), scored by that member and combined; with the seconds of kNN search and
    /// heatmaps.
    fn score_with(
        &mut self,
        thresholds: &[(f32, f32)],
        run: impl Fn(&Extractor, &mut dyn FnMut(Vec<Extracted>) -> Result<()>) -> Result<()>,
    ) -> Result<(Vec<ScoredImage>, f64, f64)> {
        let (mut knn_s, mut heat_s) = (0.0, 0.0);
        let mut per_member: Vec<Vec<ScoredImage>> = Vec::new();
        for m in &mut self.members {
            let (k, reweighting) = (m.info.n_neighbors, m.info.score_reweighting);
            let mut scorer = ImageScorer::new(&mut m.knn, k, reweighting, true);
            let mut images = Vec::new();
            run(&m.extractor, &mut |batch| {
                let scored = scorer.score(&batch)?;
                knn_s += scored.knn_s;
                heat_s += scored.heatmaps_s;
                images.extend(scored.images);
                Ok(())
            })?;
            per_member.push(images);
        }
        let t = Instant::now();
        let combined = transpose(per_member)
            .into_iter()
            .map(|images| combine_image(images, thresholds))
            .collect::<Result<Vec<_>>>()?;
        heat_s += t.elapsed().as_secs_f64();
        Ok((combined, knn_s, heat_s))
    }
}

/// The error of scoring single images with an ensemble some member of which has no
/// calibrated thresholds.
pub(super) fn no_calibration(index: &Path) -> anyhow::Error {
    anyhow!(
        "ensemble {} has no calibrated thresholds for every backbone, which single images are \
         scored against: run `patchcore calibrate --index {} -i GOOD_IMAGES` first",
        index.display(),
        index.display()
    )
}

/// `[member][image]` into `[image][member]`.
fn transpose<T>(per_member: Vec<Vec<T>>) -> Vec<Vec<T>> {
    let n = per_member.first().map_or(0, Vec::len);
    let mut out: Vec<Vec<T>> = (0..n).map(|_| Vec::new()).collect();
    for images in per_member {
        for (i, image) in images.into_iter().enumerate() {
            out[i].push(image);
        }
    }
    out
}

/// One image scored by every member (same image, in member order) combined by the
/// single-image rule: score and heatmap divided by the member's thresholds `(image, pixel)`,
/// then averaged.
pub fn combine_image(images: Vec<ScoredImage>, thresholds: &[(f32, f32)]) -> Result<ScoredImage> {
    if images.len() != thresholds.len() {
        bail!("internal error: an image was not scored by every backbone of the ensemble");
    }
    let n = images.len() as f64;
    let score = images
        .iter()
        .zip(thresholds)
        .map(|(im, &(t, _))| ratio(im.score, t))
        .sum::<f64>()
        / n;
    let input_max = images
        .iter()
        .zip(thresholds)
        .map(|(im, &(_, p))| ratio(im.input_heatmap_max, p))
        .sum::<f64>()
        / n;
    let mut heatmap: Option<Array2<f64>> = None;
    for (im, &(_, p)) in images.iter().zip(thresholds) {
        if let Some(h) = &im.heatmap {
            let scaled = h.mapv(|v| ratio(v, p) / n);
            heatmap = Some(match heatmap {
                Some(acc) if acc.dim() == scaled.dim() => acc + scaled,
                Some(_) => bail!(
                    "internal error: the backbones' heatmaps of {} differ in size",
                    im.file.path.display()
                ),
                None => scaled,
            });
        }
    }
    let mut first = images.into_iter().next().expect("at least one member");
    first.score = score as f32;
    first.input_heatmap_max = input_max as f32;
    first.heatmap = heatmap.map(|h| h.mapv(|v| v as f32));
    Ok(first)
}

/// `v / t` (a zero threshold counts as the smallest positive float, so that any positive
/// score is above it).
fn ratio(v: f32, t: f32) -> f64 {
    v as f64 / (t as f64).max(f64::from(f32::MIN_POSITIVE))
}

/// Min-max normalisation of `values` in place over all of them; all equal -> all 0.
fn min_max(values: &mut [f64]) {
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let span = hi - lo;
    for v in values {
        *v = if span > 0.0 { (*v - lo) / span } else { 0.0 };
    }
}

/// The official ensemble's image scores of a test set: `scores[member][image]`, each member's
/// min-max normalised over the test set, then the mean over members.
pub fn combine_test_scores(scores: &[Vec<f32>]) -> Vec<f32> {
    let n = scores.first().map_or(0, Vec::len);
    let mut sum = vec![0.0f64; n];
    for member in scores {
        let mut v: Vec<f64> = member.iter().map(|&s| s as f64).collect();
        min_max(&mut v);
        for (s, x) in sum.iter_mut().zip(v) {
            *s += x;
        }
    }
    sum.iter()
        .map(|s| (s / scores.len() as f64) as f32)
        .collect()
}

/// The official ensemble's segmentation maps of a test set: `maps[member][image]`, each
/// member's maps min-max normalised by one minimum and one maximum over all of its maps'
/// pixels, then the mean over members, per image.
pub fn combine_test_maps(maps: &[Vec<Array2<f32>>]) -> Vec<Array2<f32>> {
    let n = maps.first().map_or(0, Vec::len);
    let mut out: Vec<Array2<f64>> = Vec::with_capacity(n);
    for member in maps {
        let all = member.iter().flat_map(|m| m.iter().copied());
        let (lo, hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v as f64), hi.max(v as f64))
        });
        let span = hi - lo;
        for (i, m) in member.iter().enumerate() {
            let norm = m.mapv(|v| {
                if span > 0.0 {
                    (v as f64 - lo) / span
                } else {
                    0.0
                }
            });
            match out.get_mut(i) {
                Some(acc) => *acc += &norm,
                None => out.push(norm),
            }
        }
    }
    out.into_iter()
        .map(|m| m.mapv(|v| (v / maps.len() as f64) as f32))
        .collect()
}

/// The end-of-run message of an ensemble's `train` (plain text, or a JSON line).
pub fn log_summary(info: &EnsembleInfo, output: &Path) {
    let members: Vec<String> = info
        .members
        .iter()
        .map(|m| {
            format!(
                "{} [{}] {} patches, threshold {}",
                m.backbone,
                m.layers.join(","),
                m.bank_size,
                m.image_threshold
                    .map_or("none".to_string(), |t| t.to_string())
            )
        })
        .collect();
    let calibrated = match info.calibration {
        Some(_) => "combined threshold 1 (mean of score / threshold)",
        None => "not calibrated: predict needs `patchcore calibrate` first",
    };
    crate::util::log::emit(
        crate::util::log::Level::Info,
        &format!(
            "trained an ensemble of {} backbones into {}: {}; {calibrated}",
            info.members.len(),
            output.display(),
            members.join("; ")
        ),
        serde_json::json!({
            "event": "trained",
            "model": output.display().to_string(),
            "ensemble": info,
        }),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn test_scores_are_min_max_normalised_per_backbone_then_averaged() {
        let scores = vec![vec![1.0f32, 3.0, 2.0], vec![10.0, 10.0, 30.0]];
        // Backbone 0: 0, 1, 0.5; backbone 1: 0, 0, 1.
        let got = combine_test_scores(&scores);
        let want = [0.0f32, 0.5, 0.75];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-7, "{got:?}");
        }
        // A constant backbone adds 0 (the official code would divide by zero).
        let got = combine_test_scores(&[vec![2.0, 4.0], vec![5.0, 5.0]]);
        assert_eq!(got, vec![0.0, 0.5]);
    }

    #[test]
    fn test_maps_use_one_min_and_max_per_backbone_over_all_maps() {
        let maps = vec![
            vec![array![[0.0f32, 2.0]], array![[4.0f32, 1.0]]],
            vec![array![[1.0f32, 1.0]], array![[1.0f32, 3.0]]],
        ];
        let got = combine_test_maps(&maps);
        // Backbone 0 over [0, 4]: [0, .5], [1, .25]; backbone 1 over [1, 3]: [0, 0], [0, 1].
        assert_eq!(got[0], array![[0.0f32, 0.25]]);
        assert_eq!(got[1], array![[0.5f32, 0.625]]);
    }

    #[test]
    fn member_files_sit_beside_the_ensemble() {
        assert_eq!(
            member_path(Path::new("out/model.faiss"), 1, "resnet18"),
            Path::new("out/model.1-resnet18.faiss")
        );
    }
}
