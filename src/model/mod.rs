//! A trained model and how it scores: `bank` (the FAISS index and its sidecar), `knn` (the
//! bank's exact search), `scoring` (patch scores, image score, heatmap), `single` (one
//! backbone's model loaded), `ensemble` (several backbones as one), `split` (a whole test
//! split scored, as an evaluation does) and `verdict` (what is said of one scored image).
//!
//! [`Model`] is the one type for both kinds: a model is one member (a single backbone) or
//! several (an ensemble, scored by the single-image rule of [`ensemble`]). Commands read its
//! [`Sidecar`] first (cheap checks before anything loads), load it, and call its methods; none
//! of them asks which kind it is.

pub mod bank;
mod describe;
pub mod ensemble;
pub mod knn;
pub mod scoring;
pub mod single;
pub mod split;
pub(crate) mod verdict;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Result};
use tch::Device;

use crate::features::extractor::Prepared;
use crate::features::images::{ImageFile, Preprocess};
use crate::features::weights::WeightsSpec;
use crate::util::records::Calibration;
use bank::ModelInfo;
use ensemble::{Ensemble, EnsembleInfo};
use scoring::{ImageScorer, ScoredImage};
use single::SingleModel;

/// The sidecar of a model, read before it loads: one backbone's or an ensemble's.
pub enum Sidecar {
    Single(Box<ModelInfo>),
    Ensemble(EnsembleInfo),
}

impl Sidecar {
    /// Reads the sidecar of `index`; `--weights` (`weights_given`) is refused for an
    /// ensemble, whose members record their own.
    pub fn read(index: &Path, weights_given: bool) -> Result<Sidecar> {
        if !ensemble::is_ensemble(index) {
            return Ok(Sidecar::Single(Box::new(bank::read_info(index)?)));
        }
        if weights_given {
            bail!(
                "--weights cannot be given for ensemble {}: each backbone's weights come from \
                 its own model",
                index.display()
            );
        }
        Ok(Sidecar::Ensemble(ensemble::read_info(index)?))
    }

    /// The calibrated `(image, pixel)` thresholds (an ensemble's: 1 and 1).
    pub fn stored_thresholds(&self) -> Option<(f32, f32)> {
        match self {
            Sidecar::Single(i) => i
                .calibration
                .as_ref()
                .map(|c| (c.image_threshold, c.pixel_threshold)),
            Sidecar::Ensemble(e) => e
                .calibration
                .map(|c| (c.image_threshold, c.pixel_threshold)),
        }
    }

    /// Refuses, before any work, an ensemble that cannot score single images: without
    /// every member's calibration its scores have no common scale (unless `--threshold` is
    /// given, on the scale of the mean of score / threshold, which still needs them).
    pub fn check_scorable(&self, index: &Path) -> Result<()> {
        match self {
            Sidecar::Ensemble(e) if e.calibration.is_none() => Err(ensemble::no_calibration(index)),
            _ => Ok(()),
        }
    }

    /// How images are prepared for the model: preprocessing and tiles.
    pub fn preprocess(&self) -> (Preprocess, Option<u32>) {
        match self {
            Sidecar::Single(i) => (i.preprocess, i.tile),
            Sidecar::Ensemble(e) => (e.preprocess, e.tile),
        }
    }

    /// The index file of every member of the model `index`: itself, or the ensemble's members.
    pub fn member_indices(&self, index: &Path) -> Vec<PathBuf> {
        match self {
            Sidecar::Single(_) => vec![index.to_path_buf()],
            Sidecar::Ensemble(e) => ensemble::member_paths(index, e),
        }
    }

    /// After every member of the model `index` was given new thresholds: an ensemble's
    /// sidecar is rewritten from its members' (its own thresholds stay 1 by its rule).
    pub fn recalibrated(&self, index: &Path) -> Result<()> {
        match self {
            Sidecar::Single(_) => Ok(()),
            Sidecar::Ensemble(e) => ensemble::refresh(index, e).map(|_| ()),
        }
    }

    /// Loads the model (`weights` overriding a single model's; `nprobe` for every bank).
    pub fn load(
        self,
        index: &Path,
        weights: Option<&WeightsSpec>,
        nprobe: Option<u32>,
        device: Device,
        quiet: bool,
    ) -> Result<Model> {
        Ok(match self {
            Sidecar::Single(info) => Model::Single(Box::new(
                SingleModel::load(index, *info, weights, device, quiet)?.with_nprobe(nprobe)?,
            )),
            Sidecar::Ensemble(e) => {
                let mut ens = Ensemble::load(index, e, device, quiet)?;
                for m in std::mem::take(&mut ens.members) {
                    ens.members.push(m.with_nprobe(nprobe)?);
                }
                Model::Ensemble(ens)
            }
        })
    }
}

/// A loaded model of either kind: what predict and serve score with. The variants are
/// public for reading; commands use the methods.
pub enum Model {
    Single(Box<SingleModel>),
    Ensemble(Ensemble),
}

/// Images that could not be read, with their reason (`--on-error skip`).
pub type Skipped = Vec<(ImageFile, anyhow::Error)>;

impl Model {
    /// Reads the sidecar of `index` and loads the model it describes, refusing an ensemble
    /// that cannot score single images ([`Sidecar::check_scorable`]).
    pub fn open(
        index: &Path,
        weights: Option<&WeightsSpec>,
        nprobe: Option<u32>,
        device: Device,
        quiet: bool,
    ) -> Result<Model> {
        let sidecar = Sidecar::read(index, weights.is_some())?;
        sidecar.check_scorable(index)?;
        sidecar.load(index, weights, nprobe, device, quiet)
    }

    /// The single model, or every member of the ensemble.
    pub fn members(&self) -> impl Iterator<Item = &SingleModel> {
        match self {
            Model::Single(m) => std::slice::from_ref(&**m).iter(),
            Model::Ensemble(e) => e.members.iter(),
        }
    }

    /// The sidecar as loaded (another run may have replaced a single model since it was
    /// first read).
    pub fn sidecar(&self) -> Sidecar {
        match self {
            Model::Single(m) => Sidecar::Single(Box::new(m.info.clone())),
            Model::Ensemble(e) => Sidecar::Ensemble(e.info.clone()),
        }
    }

    /// The calibrated `(image, pixel)` thresholds as loaded (an ensemble's: 1 and 1).
    pub fn stored_thresholds(&self) -> Option<(f32, f32)> {
        match self {
            Model::Single(m) => m
                .info
                .calibration
                .as_ref()
                .map(|c| (c.image_threshold, c.pixel_threshold)),
            Model::Ensemble(e) => e
                .info
                .calibration
                .map(|c| (c.image_threshold, c.pixel_threshold)),
        }
    }

    /// The backbones, for summaries: `wide_resnet50_2`, or `resnet18 + resnet50`.
    pub fn backbones(&self) -> String {
        self.members()
            .map(|m| m.info.backbone.as_str())
            .collect::<Vec<_>>()
            .join(" + ")
    }

    /// A single model's calibration record (its held-out scores, for the report); an
    /// ensemble's combined score has none.
    pub fn calibration(&self) -> Option<&Calibration> {
        match self {
            Model::Single(m) => m.info.calibration.as_ref(),
            Model::Ensemble(_) => None,
        }
    }

    /// Scores `files` (of the model `index`), `batch_size` images at a time, handing `sink`
    /// each batch's scored images in order with the seconds of kNN search and heatmaps spent
    /// on them; returns the seconds of feature extraction. With `skipped`, images that cannot
    /// be read are added to it with their reason instead of ending the run.
    pub fn score_files(
        &mut self,
        index: &Path,
        files: &[ImageFile],
        batch_size: usize,
        skipped: Option<&mut Skipped>,
        mut sink: impl FnMut(Vec<ScoredImage>, f64, f64) -> Result<()>,
    ) -> Result<f64> {
        match self {
            Model::Single(m) => {
                let SingleModel {
                    info,
                    knn,
                    extractor,
                    ..
                } = &mut **m;
                let mut scorer =
                    ImageScorer::new(knn, info.n_neighbors, info.score_reweighting, true);
                let (mut features_s, mut t_batch) = (0.0, Instant::now());
                extractor.extract_skipping(files, batch_size, skipped, |batch| {
                    crate::util::interrupt::check()?;
                    // Everything since the previous batch was handled is feature extraction.
                    features_s += t_batch.elapsed().as_secs_f64();
                    let scored = scorer.score(&batch)?;
                    sink(scored.images, scored.knn_s, scored.heatmaps_s)?;
                    t_batch = Instant::now();
                    Ok(())
                })?;
                Ok(features_s)
            }
            Model::Ensemble(e) => {
                let (mut other_s, t_all) = (0.0, Instant::now());
                e.score(
                    index,
                    files,
                    batch_size,
                    skipped,
                    |images, knn_s, heat_s| {
                        let t = Instant::now();
                        sink(images, knn_s, heat_s)?;
                        other_s += knn_s + heat_s + t.elapsed().as_secs_f64();
                        Ok(())
                    },
                )?;
                Ok(t_all.elapsed().as_secs_f64() - other_s)
            }
        }
    }

    /// Scores images already decoded and prepared (serve's requests) of the model `index`,
    /// handing each to `answer` in order as soon as it is scored.
    pub fn score_prepared(
        &mut self,
        index: &Path,
        inputs: Vec<Prepared>,
        batch_size: usize,
        mut answer: impl FnMut(ScoredImage),
    ) -> Result<()> {
        match self {
            Model::Single(model) => {
                let model = &mut **model;
                let mut scorer = ImageScorer::new(
                    &mut model.knn,
                    model.info.n_neighbors,
                    model.info.score_reweighting,
                    true,
                );
                model.extractor.run_prepared(inputs, batch_size, |batch| {
                    scorer
                        .score(&batch)?
                        .images
                        .into_iter()
                        .for_each(&mut answer);
                    Ok(())
                })
            }
            Model::Ensemble(e) => e
                .score_prepared(index, inputs, batch_size)
                .map(|images| images.into_iter().for_each(answer)),
        }
    }
}
