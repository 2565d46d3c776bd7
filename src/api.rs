//! The library's front door: PatchCore in a Rust program (a line controller, a service)
//! without the command line.
//!
//! - [`Detector`] loads a trained model (one backbone's or an ensemble's) and scores
//!   [`image::DynamicImage`]s, one or a batch: each gets the score, the verdict and the
//!   heatmap `patchcore predict` writes for the same image (`results.csv`'s score, `NAME.npy`).
//! - [`train`] trains a model from a list of image files with [`TrainSettings`], as
//!   `patchcore train` does from a folder.
//!
//! ```no_run
//! use patchcore::api::{train, Detector, TrainSettings};
//!
//! # fn main() -> anyhow::Result<()> {
//! let good = vec!["good/000.png".into(), "good/001.png".into() /* ... */];
//! train(&good, "model/index.faiss".as_ref(), &TrainSettings::default())?;
//!
//! let mut detector = Detector::load("model/index.faiss")?;
//! let scored = detector.score(&image::open("part.png")?)?;
//! println!("score {} anomalous {:?}", scored.score, scored.anomalous);
//! # Ok(())
//! # }
//! ```
//!
//! Everything else in the crate serves the `patchcore` binary, its tests and its examples.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Result};
use clap::Parser;
use image::DynamicImage;
use ndarray::Array2;
use tch::Device;

use crate::cli::train::TrainArgs;
use crate::features::extractor;
use crate::features::images::{ImageFile, Preprocess};
use crate::model::{verdict, Model, Sidecar};
use crate::outputs::files::Thresholds;

/// A trained model loaded for scoring images in memory.
pub struct Detector {
    index: PathBuf,
    model: Model,
    preprocess: Preprocess,
    tile: Option<u32>,
    thresholds: Option<Thresholds>,
    batch_size: usize,
}

/// How [`Detector::load_with`] loads and scores.
#[derive(Debug, Clone)]
pub struct DetectorOptions {
    /// An image threshold instead of the model's calibrated one (`predict --threshold`).
    pub threshold: Option<f32>,
    /// Images per forward pass in [`Detector::score_batch`] (`predict --batch-size`).
    pub batch_size: usize,
    /// No progress notes on stderr while loading.
    pub quiet: bool,
}

impl Default for DetectorOptions {
    /// The model's own threshold, batches of 8, quiet.
    fn default() -> Self {
        DetectorOptions {
            threshold: None,
            batch_size: 8,
            quiet: true,
        }
    }
}

/// One image scored: the numbers `patchcore predict` writes for it.
#[derive(Debug, Clone)]
pub struct Scored {
    /// The image score (`results.csv`'s `score`).
    pub score: f32,
    /// `score / threshold`: above 1 is anomalous; none without a threshold.
    pub normalized_score: Option<f32>,
    /// The verdict; none without a threshold.
    pub anomalous: Option<bool>,
    /// The heatmap at the image's pixels, `(height, width)` (`NAME.npy`).
    pub heatmap: Array2<f32>,
}

impl Detector {
    /// Loads the model whose index is `index` (its sidecar `INDEX.json` beside it; an
    /// ensemble's sidecar loads every member), on the CPU, with [`DetectorOptions::default`].
    ///
    /// ```no_run
    /// let detector = patchcore::api::Detector::load("model/index.faiss")?;
    /// println!("threshold {:?}", detector.threshold());
    /// # Ok::<(), anyhow::Error>(())
    /// ```
    pub fn load(index: impl AsRef<Path>) -> Result<Detector> {
        Detector::load_with(index, &DetectorOptions::default())
    }

    /// [`Detector::load`] with other options.
    ///
    /// ```no_run
    /// use patchcore::api::{Detector, DetectorOptions};
    ///
    /// let options = DetectorOptions { threshold: Some(2.5), ..Default::default() };
    /// let detector = Detector::load_with("model/index.faiss", &options)?;
    /// # Ok::<(), anyhow::Error>(())
    /// ```
    pub fn load_with(index: impl AsRef<Path>, options: &DetectorOptions) -> Result<Detector> {
        let index = index.as_ref().to_path_buf();
        if options.batch_size == 0 {
            bail!("the batch size must be at least 1");
        }
        let sidecar = Sidecar::read(&index, false)?;
        sidecar.check_scorable(&index)?;
        let model = sidecar.load(&index, None, None, Device::Cpu, options.quiet)?;
        let thresholds =
            verdict::thresholds_from(model.stored_thresholds(), options.threshold, None)?;
        let (preprocess, tile) = model.sidecar().preprocess();
        Ok(Detector {
            index,
            model,
            preprocess,
            tile,
            thresholds,
            batch_size: options.batch_size,
        })
    }

    /// The image threshold in force: the model's calibrated one or the one given; none for
    /// a model trained without calibration.
    pub fn threshold(&self) -> Option<f32> {
        self.thresholds.map(|t| t.image)
    }

    /// Scores one image.
    ///
    /// ```no_run
    /// let mut detector = patchcore::api::Detector::load("model/index.faiss")?;
    /// let scored = detector.score(&image::open("part.png")?)?;
    /// if scored.anomalous == Some(true) {
    ///     println!("reject: score {}", scored.score);
    /// }
    /// # Ok::<(), anyhow::Error>(())
    /// ```
    pub fn score(&mut self, image: &DynamicImage) -> Result<Scored> {
        let mut scored = self.score_batch(std::slice::from_ref(image))?;
        Ok(scored.pop().expect("one image scored"))
    }

    /// Scores several images together (batched through the backbone); returns them in order.
    ///
    /// ```no_run
    /// let mut detector = patchcore::api::Detector::load("model/index.faiss")?;
    /// let images = vec![image::open("a.png")?, image::open("b.png")?];
    /// for scored in detector.score_batch(&images)? {
    ///     println!("{}", scored.score);
    /// }
    /// # Ok::<(), anyhow::Error>(())
    /// ```
    pub fn score_batch(&mut self, images: &[DynamicImage]) -> Result<Vec<Scored>> {
        let mut inputs = Vec::new();
        for (i, image) in images.iter().enumerate() {
            let name = PathBuf::from(format!("image {i}"));
            let file = ImageFile {
                path: name.clone(),
                relative: name,
            };
            let rgb = Arc::new(image.to_rgb8());
            inputs.extend(extractor::prepare_decoded(
                &file,
                rgb,
                self.preprocess,
                self.tile,
            )?);
        }
        let mut scored = Vec::with_capacity(images.len());
        self.model
            .score_prepared(&self.index, inputs, self.batch_size, |s| scored.push(s))?;
        let thresholds = self.thresholds;
        scored
            .into_iter()
            .map(|s| {
                let Some(heatmap) = s.heatmap else {
                    bail!("internal error: an image was scored without its heatmap");
                };
                let a = verdict::assess(s.score, &heatmap, thresholds);
                Ok(Scored {
                    score: a.score,
                    normalized_score: a.normalized_score,
                    anomalous: a.verdict.map(|v| v == verdict::ANOMALOUS),
                    heatmap,
                })
            })
            .collect()
    }
}

/// How [`train`] trains: the options of `patchcore train` that matter most, with its
/// defaults.
#[derive(Debug, Clone)]
pub struct TrainSettings {
    /// Backbones (`--backbone`, torchvision's names, optionally `NAME:LAYER,LAYER`); several
    /// train an ensemble.
    pub backbones: Vec<String>,
    /// Backbone weights (`--weights`: `imagenet`, a file, a URL, `random:SEED`); none: the
    /// backbone's default pretrained weights.
    pub weights: Option<String>,
    /// Share of the patches kept in the memory bank (`--sampling-ratio`).
    pub sampling_ratio: f64,
    /// Resize the shorter image side to this many pixels (`--resize`); none: the default
    /// (224).
    pub resize: Option<u32>,
    /// Seed of the coreset and of the held-out split (`--seed`).
    pub seed: u64,
    /// Images per forward pass (`--batch-size`).
    pub batch_size: usize,
    /// No progress bars or notes.
    pub quiet: bool,
}

impl Default for TrainSettings {
    /// `patchcore train`'s defaults: wide_resnet50_2 with ImageNet weights, 10% of the
    /// patches, seed 0, batches of 8; quiet.
    fn default() -> Self {
        TrainSettings {
            backbones: vec!["wide_resnet50_2".to_string()],
            weights: None,
            sampling_ratio: 0.1,
            resize: None,
            seed: 0,
            batch_size: 8,
            quiet: true,
        }
    }
}

/// The command line `patchcore train` would be given for `settings`.
#[derive(Parser)]
struct TrainLine {
    #[command(flatten)]
    args: TrainArgs,
}

/// Trains a model on the good images `images` (files) into `output` (the index; its
/// sidecar `OUTPUT.json` beside it), as `patchcore train -o OUTPUT` does from a folder: the
/// held-out images for the calibration are drawn from `images` in the order given.
///
/// ```no_run
/// use patchcore::api::{train, TrainSettings};
///
/// let images: Vec<std::path::PathBuf> = (0..20).map(|i| format!("good/{i:03}.png").into()).collect();
/// let settings = TrainSettings { backbones: vec!["resnet18".into()], ..Default::default() };
/// train(&images, "model/index.faiss".as_ref(), &settings)?;
/// # Ok::<(), anyhow::Error>(())
/// ```
pub fn train(images: &[PathBuf], output: &Path, settings: &TrainSettings) -> Result<()> {
    let Some(first) = images.first() else {
        bail!("no training image given");
    };
    let folder = first.parent().unwrap_or(Path::new("."));
    let mut line: Vec<String> = ["train", "-i"].map(String::from).to_vec();
    line.push(folder.display().to_string());
    line.push("-o".into());
    line.push(output.display().to_string());
    for b in &settings.backbones {
        line.extend(["--backbone".to_string(), b.clone()]);
    }
    if let Some(w) = &settings.weights {
        line.extend(["--weights".to_string(), w.clone()]);
    }
    if let Some(r) = settings.resize {
        line.extend(["--resize".to_string(), r.to_string()]);
    }
    line.extend([
        "--sampling-ratio".to_string(),
        settings.sampling_ratio.to_string(),
        "--seed".to_string(),
        settings.seed.to_string(),
        "--batch-size".to_string(),
        settings.batch_size.to_string(),
    ]);
    if settings.quiet {
        line.push("--quiet".into());
    }
    let args = TrainLine::try_parse_from(&line)?.args;
    let mut options = args.options(Device::Cpu)?;
    for o in &mut options {
        o.images = images.to_vec();
    }
    match options.len() {
        1 => crate::commands::train::run(&options[0]).map(|_| ()),
        _ => crate::model::ensemble::train(&options, output).map(|_| ()),
    }
}
