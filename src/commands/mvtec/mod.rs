//! Evaluation on MVTec AD-style datasets: `patchcore mvtec runall` trains and evaluates every
//! category with every backbone asked for, one JSON result per pair; `summarize` turns the
//! results into tables and plots (`summary`).
//!
//! Layout read: `<data>/<category>/train/good/*`, `<data>/<category>/test/<type>/*`,
//! `<data>/<category>/ground_truth/<type>/<stem>_mask.png` for every type but `good`.
//!
//! Protocol, as the official implementation evaluates: the images and the masks go through
//! the same resize and center crop (masks resized bilinearly like the images, as Pillow does),
//! and scores are compared with the masks at the crop's resolution. A mask pixel is a defect
//! pixel when it is 255 after resizing, as the official `mask.astype(int)` of the `[0, 1]`
//! tensor counts only exact ones. Image AUROC on image scores, pixel AUROC and AUPRO (FPR up to
//! 0.3) over every test pixel, and the best image-level F1 with its threshold.
//!
//! Beside each `result.json`, `curves.json` ([`RunCurves`]) holds the image ROC, pixel ROC and
//! PRO curves the area metrics were computed from (thinned for drawing), and `image_roc.svg`,
//! `pixel_roc.svg`, `pro.svg` draw them; `summarize` overlays the backbones per category.

pub mod evaluate;
pub mod metrics;
pub mod summary;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use ndarray::Array2;
use serde::{Deserialize, Serialize};

use self::evaluate::evaluate;
use self::metrics::{BestF1, Curve, PixelMetrics};
use crate::commands::train::{self, TrainOptions};
use crate::features::backbone::Arch;
use crate::features::images::{self, ImageFile, Preprocess};
use crate::model::bank::{self, TrainTimings};
use crate::model::split::SplitTimings;
use crate::model::{Model, Sidecar};
use crate::outputs::files;
use crate::outputs::plots::{self, CurveKind, CurveSeries};
use crate::util::fsutil::AtomicFile;
use crate::util::log;

/// Identifies result files.
pub const RESULT_FORMAT: &str = "patchcore-mvtec-result";
/// Identifies curve files.
pub const CURVES_FORMAT: &str = "patchcore-mvtec-curves";
/// FPR limit of AUPRO, as in the MVTec AD evaluation.
pub const AUPRO_MAX_FPR: f64 = 0.3;
/// The curves of a run, in the order drawn.
pub const CURVE_KINDS: [CurveKind; 3] = [
    CurveKind::ImageRoc,
    CurveKind::PixelRoc,
    CurveKind::Pro {
        max_fpr: AUPRO_MAX_FPR,
    },
];

pub struct RunAllOptions {
    pub data: PathBuf,
    /// Categories to run; empty = every category found.
    pub categories: Vec<String>,
    /// One entry per backbone: its train options (input and output are set per run) and
    /// `--weights` as given or defaulted for it (recorded in the results).
    pub backbones: Vec<(TrainOptions, String)>,
    /// Where runs go: `<out>/<label>/<category>/{index.faiss, result.json}`, the label being
    /// the backbone, with `@weights` unless they are the ImageNet ones.
    pub out: PathBuf,
    /// Recompute pairs that already have a result with the same configuration.
    pub force: bool,
    /// Evaluate this trained model (of one category) instead of training one: a merged or
    /// updated model, say. Always evaluated again.
    pub index: Option<PathBuf>,
    /// Train and evaluate one ensemble of all `backbones` per category (scores combined as
    /// the official code combines them, `ensemble::combine_test_scores`), instead of one run
    /// per backbone.
    pub ensemble: bool,
}

/// The configuration that makes two runs the same run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunConfig {
    pub category: String,
    pub backbone: String,
    pub layers: Vec<String>,
    pub weights: String,
    pub preprocess: Preprocess,
    pub sampling_ratio: f64,
    pub calibration_ratio: f64,
    /// Absent in results from before the choice: the quantile rule.
    #[serde(default)]
    pub calibration_rule: crate::util::records::Rule,
    pub n_neighbors: usize,
    pub seed: u64,
    pub precision: crate::util::records::Precision,
    /// The official code's BatchNorm probe (results from before it existed ran without).
    #[serde(default)]
    pub batchnorm_probe: bool,
    /// Eq. 7 re-weighting of the image score over this many bank neighbours.
    #[serde(default)]
    pub score_reweighting: Option<usize>,
    /// Feature dimensions (results from before the options: the official 1024 / 1024).
    #[serde(default = "default_dim")]
    pub embed_dim: i64,
    #[serde(default = "default_dim")]
    pub target_dim: i64,
}

fn default_dim() -> i64 {
    crate::util::records::EMBED_DIM
}

/// The run configuration's joined names of an ensemble's members: `a+b+c`.
const ENSEMBLE_JOIN: &str = "+";

impl RunConfig {
    /// The configuration of a run that trains with `t`, named by the caller (a backbone or
    /// an ensemble's members).
    fn trained(
        category: &str,
        backbone: String,
        layers: Vec<String>,
        weights: String,
        t: &TrainOptions,
    ) -> Self {
        RunConfig {
            category: category.to_string(),
            backbone,
            layers,
            weights,
            preprocess: t.preprocess,
            sampling_ratio: t.sampling_ratio,
            calibration_ratio: t.calibration_ratio,
            calibration_rule: t.calibration_rule,
            n_neighbors: t.n_neighbors,
            seed: t.seed,
            precision: t.precision,
            batchnorm_probe: t.batchnorm_probe,
            score_reweighting: t.score_reweighting,
            embed_dim: t.dims.pretrain,
            target_dim: t.dims.target,
        }
    }

    /// The configuration of a run that evaluates a saved model (`info`: its own, or an
    /// ensemble's first member's), named by the caller; calibration as `t` asks.
    fn saved(
        category: &str,
        backbone: String,
        layers: Vec<String>,
        weights: String,
        info: &bank::ModelInfo,
        t: &TrainOptions,
    ) -> Self {
        RunConfig {
            category: category.to_string(),
            backbone,
            layers,
            weights,
            preprocess: info.preprocess,
            sampling_ratio: info.sampling_ratio,
            calibration_ratio: t.calibration_ratio,
            calibration_rule: t.calibration_rule,
            n_neighbors: info.n_neighbors,
            seed: info.seed,
            precision: info.precision,
            batchnorm_probe: info.batchnorm_probe.is_some(),
            score_reweighting: info.score_reweighting,
            embed_dim: info.pretrain_embed_dim,
            target_dim: info.feature_dim,
        }
    }

    /// Names the run's backbone and pretraining: the backbone alone for its default weights
    /// (ImageNet; COCO for DeepLabV3), else `backbone@weights` (e.g. `resnet50@ssl`, `resnet18@random-0`). Used as
    /// the run's folder and as its column in the summary.
    pub fn label(&self) -> String {
        let default = Arch::parse(&self.backbone).map(|a| a.default_weights());
        if self.weights == default.unwrap_or("imagenet") {
            return self.backbone.clone();
        }
        let w: String = self
            .weights
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || c == '.' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        format!("{}@{w}", self.backbone)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Metrics {
    pub image_auroc: Option<f64>,
    pub pixel_auroc: Option<f64>,
    /// Normalized area under the PRO curve up to FPR 0.3.
    pub aupro: Option<f64>,
    /// Best image-level F1 over thresholds, with its threshold, precision and recall.
    pub best_f1: Option<BestF1>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct EvalTimings {
    pub train: TrainTimings,
    /// Test images: decoding + backbone + patch features.
    pub predict_features_s: f64,
    pub predict_knn_s: f64,
    pub predict_heatmaps_s: f64,
    pub predict_per_image_s: f64,
    pub metrics_s: f64,
    pub total_s: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Counts {
    pub train_images: usize,
    pub calibration_images: usize,
    pub bank_size: usize,
    pub test_images: usize,
    pub anomalous_images: usize,
    pub pixels: usize,
    pub defect_regions: usize,
}

/// One category x backbone run, as written to `result.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunResult {
    pub format: String,
    pub program_version: String,
    pub config: RunConfig,
    pub metrics: Metrics,
    pub counts: Counts,
    pub timings: EvalTimings,
    /// Bytes the pixel metrics held (score + region id per test pixel).
    pub pixel_metrics_bytes: usize,
    /// Peak resident memory of the process so far (Linux VmHWM), in bytes.
    pub peak_rss_bytes: Option<u64>,
    /// The image score threshold calibrated at train time, if any, and the share of
    /// test/good images above it.
    pub calibrated_threshold: Option<f32>,
    pub good_above_threshold: Option<f64>,
}

/// The curves behind a run's area metrics, as written to `curves.json` beside its
/// `result.json` (kept apart so that result.json stays small and unchanged): each curve's
/// `area` is the metric in result.json (AUPRO = area / `aupro_max_fpr`), computed from every
/// point; `points` are the drawn ones (`metrics::CurveBuilder`). `None` where the metric is.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunCurves {
    pub format: String,
    /// The run's configuration, as in result.json: curves of another run are not used.
    pub config: RunConfig,
    pub aupro_max_fpr: f64,
    pub image_roc: Option<Curve>,
    pub pixel_roc: Option<Curve>,
    pub pro: Option<Curve>,
}

impl RunCurves {
    pub fn get(&self, kind: CurveKind) -> Option<&Curve> {
        match kind {
            CurveKind::ImageRoc => self.image_roc.as_ref(),
            CurveKind::PixelRoc => self.pixel_roc.as_ref(),
            CurveKind::Pro { .. } => self.pro.as_ref(),
        }
    }

    /// Reads `curves.json` in a run folder; `None` when absent, damaged or of another format.
    pub fn read(run_dir: &Path) -> Option<RunCurves> {
        let text = std::fs::read_to_string(run_dir.join("curves.json")).ok()?;
        let c: RunCurves = serde_json::from_str(&text).ok()?;
        (c.format == CURVES_FORMAT).then_some(c)
    }

    /// Writes `curves.json` (compact: thousands of points) and one SVG per curve into
    /// `run_dir`, removing the SVG of a curve this run does not have.
    fn write(&self, run_dir: &Path) -> Result<()> {
        let path = run_dir.join("curves.json");
        let mut f = AtomicFile::create(&path)?;
        serde_json::to_writer(&mut f, self)
            .with_context(|| format!("cannot write {}", path.display()))?;
        f.commit()?;
        let label = self.config.label();
        for kind in CURVE_KINDS {
            let svg = run_dir.join(format!("{}.svg", kind.stem()));
            match self.get(kind) {
                Some(curve) => {
                    let title = format!("{}, {label}: {}", self.config.category, kind.title());
                    let series = [CurveSeries {
                        label: label.clone(),
                        color: 0,
                        curve,
                    }];
                    plots::write_svg(&svg, &plots::curves_svg(&title, kind, &series)?)?;
                }
                None => {
                    let _ = std::fs::remove_file(&svg);
                }
            }
        }
        Ok(())
    }
}

/// Categories under `data`: folders with `train/good` and `test`, sorted.
pub fn find_categories(data: &Path) -> Result<Vec<String>> {
    let entries = std::fs::read_dir(data)
        .map_err(|e| anyhow!("cannot read dataset folder {}: {e}", data.display()))?;
    let mut cats: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("train/good").is_dir() && e.path().join("test").is_dir())
        .filter_map(|e| e.file_name().to_str().map(String::from))
        .collect();
    cats.sort();
    if cats.is_empty() {
        bail!(
            "no MVTec AD category in {} (expected CATEGORY/train/good and CATEGORY/test)",
            data.display()
        );
    }
    Ok(cats)
}

/// Runs every requested category x backbone pair; returns the results (computed or reused).
pub fn run_all(opts: &RunAllOptions) -> Result<Vec<RunResult>> {
    if opts.backbones.iter().any(|(t, _)| t.tile.is_some()) {
        bail!(
            "--tile is not for mvtec runall: the evaluation protocol scores whole (cropped) images"
        );
    }
    let found = find_categories(&opts.data)?;
    let categories = if opts.categories.is_empty() {
        found
    } else {
        for c in &opts.categories {
            if !found.contains(c) {
                bail!(
                    "category {c} not found in {} (found: {})",
                    opts.data.display(),
                    found.join(", ")
                );
            }
        }
        opts.categories.clone()
    };
    // Before any backbone loads; the runs create their folders in it.
    let _out = crate::util::fsutil::OutputFolder::prepare(&opts.out, None)?;
    if opts.index.is_some() {
        if categories.len() != 1 {
            bail!("--index evaluates one model: give exactly one --category");
        }
        return Ok(vec![run_one(
            opts,
            &categories[0],
            &opts.backbones[0].0,
            &opts.backbones[0].1,
        )?]);
    }
    let mut results = Vec::new();
    if opts.ensemble {
        for category in &categories {
            crate::util::interrupt::check()?;
            results.push(run_ensemble(opts, category)?);
        }
        return Ok(results);
    }
    for (train, weights_arg) in &opts.backbones {
        for category in &categories {
            crate::util::interrupt::check()?;
            results.push(run_one(opts, category, train, weights_arg)?);
        }
    }
    Ok(results)
}

fn run_one(
    opts: &RunAllOptions,
    category: &str,
    t: &TrainOptions,
    weights_arg: &str,
) -> Result<RunResult> {
    let arch = t.arch;
    if let Some(index) = &opts.index {
        return evaluate_saved(opts, category, t, index);
    }
    let config = RunConfig::trained(
        category,
        arch.name().to_string(),
        t.layers.iter().map(|&l| arch.layer_name(l)).collect(),
        weights_arg.to_string(),
        t,
    );
    let dir = opts.out.join(config.label()).join(category);
    let result_path = dir.join("result.json");
    if !opts.force {
        if let Some(previous) = read_result(&result_path) {
            if previous.config == config {
                let curves = if RunCurves::read(&dir).is_some_and(|c| c.config == config) {
                    ""
                } else {
                    ", without curves.json: made by an older version"
                };
                log::info(&format!(
                    "{category} / {}: done already ({}{curves}); --force recomputes it",
                    config.label(),
                    result_path.display()
                ));
                return Ok(previous);
            }
            log::info(&format!(
                "{category} / {}: the configuration changed since {}; running again",
                config.label(),
                result_path.display()
            ));
        }
    }
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create output folder {}", dir.display()))?;
    let t0 = Instant::now();
    let label = config.label();
    log::info(&format!("{category} / {label}: training"));
    let index = dir.join("index.faiss");
    let category_dir = opts.data.join(category);
    let train_opts = TrainOptions {
        input: category_dir.join("train/good"),
        output: index.clone(),
        arch,
        ..t.clone()
    };
    let info = train::run(&train_opts)?;
    log::info(&format!("{category} / {label}: evaluating"));
    let mut model = Sidecar::Single(Box::new(info)).load(&index, None, None, t.device, t.quiet)?;
    let evaluated = evaluate(&category_dir, &mut model, t, config)?;
    write_run(&dir, evaluated, t0)
}

/// The configuration of an ensemble run: the first member's options, with every member's
/// backbone, layers (`I.LAYER`, as the official `-le`) and weights joined.
fn ensemble_config(category: &str, members: &[(TrainOptions, String)]) -> RunConfig {
    let t = &members[0].0;
    let join = |f: &dyn Fn(&(TrainOptions, String)) -> String| {
        members
            .iter()
            .map(f)
            .collect::<Vec<_>>()
            .join(ENSEMBLE_JOIN)
    };
    RunConfig::trained(
        category,
        join(&|(m, _)| m.arch.name().to_string()),
        members
            .iter()
            .enumerate()
            .flat_map(|(i, (m, _))| {
                m.layers
                    .iter()
                    .map(move |&l| format!("{i}.{}", m.arch.layer_name(l)))
            })
            .collect(),
        ensemble_weights(
            members
                .iter()
                .map(|(m, w)| (w.as_str(), m.arch.default_weights())),
        ),
        t,
    )
}

/// The weights of an ensemble's run configuration from each member's `(weights, default
/// weights)`: "imagenet" when every member has its default, the weights when all have the
/// same, else all of them joined.
fn ensemble_weights<'a>(members: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    let members: Vec<(&str, &str)> = members.collect();
    if members.iter().all(|(w, d)| w == d) {
        "imagenet".to_string()
    } else if members.iter().all(|(w, _)| *w == members[0].0) {
        members[0].0.to_string()
    } else {
        members
            .iter()
            .map(|(w, _)| *w)
            .collect::<Vec<_>>()
            .join(ENSEMBLE_JOIN)
    }
}

/// One category with the ensemble of every backbone of `opts`: trained (unless its result
/// is there already), then evaluated as the official ensemble is.
fn run_ensemble(opts: &RunAllOptions, category: &str) -> Result<RunResult> {
    let config = ensemble_config(category, &opts.backbones);
    let label = config.label();
    let dir = opts.out.join(&label).join(category);
    let result_path = dir.join("result.json");
    if !opts.force {
        if let Some(previous) = read_result(&result_path).filter(|r| r.config == config) {
            log::info(&format!(
                "{category} / {label}: done already ({}); --force recomputes it",
                result_path.display()
            ));
            return Ok(previous);
        }
    }
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create output folder {}", dir.display()))?;
    let t0 = Instant::now();
    log::info(&format!("{category} / {label}: training"));
    let index = dir.join("index.faiss");
    let category_dir = opts.data.join(category);
    let members: Vec<TrainOptions> = opts
        .backbones
        .iter()
        .map(|(t, _)| TrainOptions {
            input: category_dir.join("train/good"),
            ..t.clone()
        })
        .collect();
    let info = crate::model::ensemble::train(&members, &index)?;
    log::info(&format!("{category} / {label}: evaluating"));
    let t = &opts.backbones[0].0;
    let mut model = Sidecar::Ensemble(info).load(&index, None, None, t.device, t.quiet)?;
    let evaluated = evaluate(&category_dir, &mut model, t, config)?;
    write_run(&dir, evaluated, t0)
}

/// `--evaluate MODEL`: a saved model (one backbone's or an ensemble) on the test split of
/// `category`.
fn evaluate_saved(
    opts: &RunAllOptions,
    category: &str,
    t: &TrainOptions,
    index: &Path,
) -> Result<RunResult> {
    let mut model = Sidecar::read(index, false)?.load(index, None, None, t.device, t.quiet)?;
    let members: Vec<&bank::ModelInfo> = model.members().map(|m| &m.info).collect();
    let config = saved_config(category, &members, t);
    let dir = opts.out.join(config.label()).join(category);
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create output folder {}", dir.display()))?;
    log::info(&format!("{category}: evaluating {}", index.display()));
    let t0 = Instant::now();
    let evaluated = evaluate(&opts.data.join(category), &mut model, t, config)?;
    write_run(&dir, evaluated, t0)
}

/// The configuration of a run that evaluates a saved model with these `members` (settings
/// from the first). Named as a trained run is: one member by its own backbone, layers and
/// weights; several by theirs joined, as `ensemble_config` names a trained ensemble.
fn saved_config(category: &str, members: &[&bank::ModelInfo], t: &TrainOptions) -> RunConfig {
    let (backbone, layers, weights) = match members {
        [only] => (
            only.backbone.clone(),
            only.layers.clone(),
            only.weights.spec.clone(),
        ),
        _ => (
            members
                .iter()
                .map(|m| m.backbone.as_str())
                .collect::<Vec<_>>()
                .join(ENSEMBLE_JOIN),
            members
                .iter()
                .enumerate()
                .flat_map(|(i, m)| m.layers.iter().map(move |l| format!("{i}.{l}")))
                .collect(),
            ensemble_weights(members.iter().map(|m| {
                let default = Arch::parse(&m.backbone).map_or("imagenet", |a| a.default_weights());
                (m.weights.spec.as_str(), default)
            })),
        ),
    };
    RunConfig::saved(category, backbone, layers, weights, members[0], t)
}

/// Writes a run's curves and result into `dir` (started at `t0`) and says its metrics.
fn write_run(
    dir: &Path,
    (mut result, curves): (RunResult, RunCurves),
    t0: Instant,
) -> Result<RunResult> {
    let result_path = dir.join("result.json");
    let (category, label) = (result.config.category.clone(), result.config.label());
    result.timings.total_s = t0.elapsed().as_secs_f64();
    result.peak_rss_bytes = peak_rss_bytes();
    // result.json last: it marks the run as done.
    curves.write(dir)?;
    files::write_json(&result_path, &result, true)?;
    let m = &result.metrics;
    let pct = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{:.1}%", 100.0 * v));
    log::info(&format!(
        "{category} / {label}: image AUROC {}, pixel AUROC {}, AUPRO {} ({:.0} s)",
        pct(m.image_auroc),
        pct(m.pixel_auroc),
        pct(m.aupro),
        result.timings.total_s
    ));
    Ok(result)
}

fn read_result(path: &Path) -> Option<RunResult> {
    let text = std::fs::read_to_string(path).ok()?;
    let r: RunResult = serde_json::from_str(&text).ok()?;
    (r.format == RESULT_FORMAT).then_some(r)
}

/// The process's peak resident memory (Linux `VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
