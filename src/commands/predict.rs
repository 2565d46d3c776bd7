//! `patchcore predict`: a trained model and a folder of images in; per image an anomaly score,
//! a heatmap (`NAME.npy`, at the original resolution) and an overlay (`NAME.jpg`) out, and,
//! with a threshold (calibrated at train time or given), a verdict, a mask (`NAME_mask.png`)
//! and the defect regions (`NAME.json`); for the run, `results.csv` or `results.json` and the
//! report `index.html`.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Result};
use rayon::prelude::*;
use tch::Device;

use crate::features::images;
use crate::features::images::ImageFile;
use crate::features::weights::WeightsSpec;
use crate::model::scoring::ScoredImage;
use crate::model::verdict;
use crate::model::{Model, Sidecar, Skipped};
use crate::outputs::files::{self, ImageResult, RunResults, Thresholds};
use crate::outputs::report::{Report, ReportEntry, ReportMeta};
use crate::util::fsutil;
use crate::util::log::{self, Level};
use crate::util::progress;

pub struct PredictOptions {
    /// Folders (searched recursively) and image files, in the order given.
    pub inputs: Vec<PathBuf>,
    pub output: PathBuf,
    pub index: PathBuf,
    /// Where to find the backbone weights, if not where the model says; checked by checksum.
    pub weights: Option<WeightsSpec>,
    /// Image threshold overriding the model's calibrated one.
    pub threshold: Option<f32>,
    /// Pixel threshold overriding the model's (default: scaled with `threshold`).
    pub pixel_threshold: Option<f32>,
    /// Draw region outlines on the overlay instead of blending the heatmap.
    pub contour: bool,
    /// IVF lists searched per query instead of the model's (`--nprobe`).
    pub nprobe: Option<u32>,
    /// Largest image in pixels (`--max-pixels`), checked from each file's header first.
    pub max_pixels: u64,
    pub format: ResultsFormat,
    /// Write `index.html`.
    pub report: bool,
    /// The option that needs verdicts (e.g. "--fail-on-anomaly"): without a threshold the
    /// run is refused before any work, naming it.
    pub require_threshold: Option<&'static str>,
    pub batch_size: usize,
    pub device: Device,
    pub quiet: bool,
    /// An output folder holding an earlier run's results: remove that run's outputs (as its
    /// results file lists them) instead of refusing (`--overwrite`).
    pub overwrite: bool,
    /// An image that cannot be read or scored is listed with its reason (verdict "error")
    /// instead of ending the run (`--on-error skip`).
    pub skip_errors: bool,
}

/// The run's results file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResultsFormat {
    /// `results.csv`
    Csv,
    /// `results.json`
    Json,
}

impl ResultsFormat {
    pub fn file_name(self) -> &'static str {
        match self {
            ResultsFormat::Csv => "results.csv",
            ResultsFormat::Json => "results.json",
        }
    }
}

/// What a run produced.
pub struct PredictRun {
    pub results: Vec<ImageResult>,
    pub thresholds: Option<Thresholds>,
    pub timings: PredictTimings,
}

impl PredictRun {
    pub fn anomalous(&self) -> usize {
        self.results
            .iter()
            .filter(|r| r.verdict == Some(verdict::ANOMALOUS))
            .count()
    }

    /// Images that could not be scored (`--on-error skip`).
    pub fn errors(&self) -> usize {
        self.results.iter().filter(|r| r.error.is_some()).count()
    }
}

/// Seconds spent per stage over the whole run.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct PredictTimings {
    pub images: usize,
    /// libtorch's intra-op threads during the run (`--threads`), read back from libtorch.
    pub threads: usize,
    /// Process creation to `main` (the dynamic loader, libtorch's initializers); null when
    /// not run from the command line.
    pub start_up_s: Option<f64>,
    /// Reading and checking the index (part of `total_s`, as are the next two).
    pub index_s: f64,
    /// Building the backbone and loading its weights.
    pub weights_s: f64,
    /// The BatchNorm probe, or reading its outcome from the cache.
    pub probe_s: f64,
    /// Whether the probe's outcome came from the cache.
    pub probe_cached: bool,
    pub features_s: f64,
    pub knn_s: f64,
    /// The nearest-neighbour search that ran and what chose it (`knn::Knn::describe`), and
    /// how many of its queries the shortlist or the pruned search handed to FAISS.
    pub knn_method: String,
    pub knn_fallbacks: usize,
    /// Mean exact distances per query of the pruned search (absent when it answered none).
    pub knn_exact_per_query: Option<f64>,
    /// Heatmaps, overlays, masks and writing them (done for several images at once).
    pub heatmap_and_write_s: f64,
    /// From the start of the command (after start-up) to its end.
    pub total_s: f64,
}

/// Scores the images of `opts.inputs` with the model `opts.index` and writes every output.
pub fn run(opts: &PredictOptions) -> Result<PredictRun> {
    let t0 = Instant::now();
    let sidecar = Sidecar::read(&opts.index, opts.weights.is_some())?;
    let inputs = read_inputs(opts, &sidecar)?;
    let files = inputs.to_score();
    let folder = prepare_output(opts, &sidecar, &files)?;
    let mut model = load_model(opts, sidecar, &files, folder)?;
    // The sidecar loaded (another run may have replaced the model since it was first read).
    let thresholds = verdict::thresholds_from(
        model.stored_thresholds(),
        opts.threshold,
        opts.pixel_threshold,
    )?;
    let report = opts.report.then(|| Report::new(&opts.output)).transpose()?;
    let ctx = ImageContext {
        out_dir: &opts.output,
        thresholds,
        contour: opts.contour,
        report: report.as_ref(),
    };
    let mut timings = loading_timings(&model);
    let (results, mut skipped) = score_images(opts, &mut model, &files, &ctx, &mut timings)?;
    skipped.extend(inputs.too_large);
    let results = with_skipped(opts, &inputs.all, results, skipped, report.as_ref())?;
    write_results(opts, &results, thresholds)?;
    if let Some(report) = report {
        finish_report(opts, &model, thresholds, report)?;
    }
    timings.images = results.len();
    knn_timings(&model, &mut timings);
    timings.threads = tch::get_num_threads().max(0) as usize;
    timings.total_s = t0.elapsed().as_secs_f64();
    Ok(PredictRun {
        results,
        thresholds,
        timings,
    })
}

/// The images found, in input order (a non-image file given or found is noted and
/// skipped), and those of them over `--max-pixels` (read from their headers) that
/// `--on-error skip` lists as errors instead of refusing the run.
struct Inputs {
    all: Vec<ImageFile>,
    too_large: Skipped,
}

impl Inputs {
    /// The images to score: all but the ones too large.
    fn to_score(&self) -> Vec<ImageFile> {
        self.all
            .iter()
            .filter(|f| !self.too_large.iter().any(|(t, _)| t.path == f.path))
            .cloned()
            .collect()
    }
}

/// The images to score; refused when the `--threshold` options are invalid, their outputs
/// would collide, or (without `--on-error skip`) one is over `--max-pixels`.
fn read_inputs(opts: &PredictOptions, sidecar: &Sidecar) -> Result<Inputs> {
    verdict::thresholds_from(
        sidecar.stored_thresholds(),
        opts.threshold,
        opts.pixel_threshold,
    )?;
    let found = images::find_inputs(&opts.inputs)?;
    for s in found.skipped.iter().filter(|_| !opts.quiet) {
        log::info(&format!("skipping {} (not an image file)", s.display()));
    }
    let files = found.images;
    let mut too_large = Vec::new();
    for f in &files {
        match images::check_file_pixels(&f.path, opts.max_pixels) {
            Ok(()) => {}
            Err(e) if opts.skip_errors => too_large.push((f.clone(), e.into())),
            Err(e) => return Err(e.into()),
        }
    }
    let run_files = run_files(opts);
    check_collisions(&files, &run_files, &opts.output)?;
    guard_inputs(&files, &run_files, &opts.output)?;
    Ok(Inputs {
        all: files,
        too_large,
    })
}

/// The run's own files in the output folder: the results file, and the report.
fn run_files(opts: &PredictOptions) -> Vec<&'static str> {
    let mut run_files = vec![opts.format.file_name()];
    if opts.report {
        run_files.push("index.html");
    }
    run_files
}

/// Before the model loads: the model can score single images, the folder takes files and
/// has room for the heatmaps, an earlier run's outputs there are refused (or with
/// `--overwrite` found, to be removed once the model loaded), and an option that needs a
/// threshold has one.
fn prepare_output(
    opts: &PredictOptions,
    sidecar: &Sidecar,
    files: &[ImageFile],
) -> Result<(fsutil::OutputFolder, Option<EarlierRun>)> {
    sidecar.check_scorable(&opts.index)?;
    let folder = fsutil::OutputFolder::prepare(&opts.output, Some(&heatmaps_space(files)))?;
    let earlier = EarlierRun::find(&opts.output)?;
    if let (Some(e), false) = (&earlier, opts.overwrite) {
        bail!(
            "output folder {} holds an earlier run's outputs ({}): pass --overwrite to replace \
             them (only the files its results list are removed), or choose another folder",
            opts.output.display(),
            e.results_name()
        );
    }
    let thresholds = verdict::thresholds_from(
        sidecar.stored_thresholds(),
        opts.threshold,
        opts.pixel_threshold,
    )?;
    let needs = opts
        .require_threshold
        .or(opts.contour.then_some("--contour"));
    if let (None, Some(option)) = (thresholds, needs) {
        bail!(
            "{option} needs a threshold: model {} has no calibration, pass --threshold",
            opts.index.display()
        );
    }
    if thresholds.is_none() && !opts.quiet {
        log::info(&format!(
            "model {} has no calibrated threshold (trained on too few images or with \
             --calibration-ratio 0): scores only, no verdicts or masks; pass --threshold to get them",
            opts.index.display()
        ));
    }
    Ok((folder, earlier))
}

/// Loads the model, then clears an earlier run's outputs (`--overwrite`) and keeps the folder.
fn load_model(
    opts: &PredictOptions,
    sidecar: Sidecar,
    files: &[ImageFile],
    (folder, earlier): (fsutil::OutputFolder, Option<EarlierRun>),
) -> Result<Model> {
    let model = sidecar.load(
        &opts.index,
        opts.weights.as_ref(),
        opts.nprobe,
        opts.device,
        opts.quiet,
    )?;
    if let Some(e) = earlier {
        e.remove(&opts.output, files)?;
    }
    folder.keep();
    Ok(model)
}

/// The seconds spent loading every member: index, weights, BatchNorm probe.
fn loading_timings(model: &Model) -> PredictTimings {
    let mut timings = PredictTimings {
        start_up_s: crate::util::runtime::start_up_s(),
        ..Default::default()
    };
    for m in model.members() {
        let load = &m.extractor.load_timings;
        timings.index_s += m.index_s;
        timings.weights_s += load.weights_s;
        timings.probe_s += load.probe_s;
        timings.probe_cached = load.probe_cached;
    }
    timings
}

/// Scores every image and writes its files (one image per thread); returns their results and
/// the images that could not be read (`--on-error skip`).
fn score_images(
    opts: &PredictOptions,
    model: &mut Model,
    files: &[ImageFile],
    ctx: &ImageContext,
    timings: &mut PredictTimings,
) -> Result<(Vec<ImageResult>, Skipped)> {
    let mut results = Vec::with_capacity(files.len());
    let mut skipped = Vec::new();
    let bar = progress::items(files.len() as u64, "scoring images", opts.quiet);
    let (mut knn_total, mut write_total) = (0.0, 0.0);
    let features_s = model.score_files(
        &opts.index,
        files,
        opts.batch_size,
        opts.skip_errors.then_some(&mut skipped),
        |images, knn_s, heatmaps_s| {
            knn_total += knn_s;
            let t = Instant::now();
            let written: Vec<ImageResult> = images
                .par_iter()
                .map(|image| ctx.finish_image(image))
                .collect::<Result<_>>()?;
            write_total += heatmaps_s + t.elapsed().as_secs_f64();
            bar.inc(written.len() as u64);
            results.extend(written);
            Ok(())
        },
    )?;
    bar.finish_and_clear();
    timings.features_s = features_s;
    timings.knn_s += knn_total;
    timings.heatmap_and_write_s += write_total;
    Ok((results, skipped))
}

/// The results with the skipped images (verdict "error", noted in the report) among them, in
/// input order.
fn with_skipped(
    opts: &PredictOptions,
    files: &[ImageFile],
    mut results: Vec<ImageResult>,
    skipped: Skipped,
    report: Option<&Report>,
) -> Result<Vec<ImageResult>> {
    for (file, e) in skipped {
        let reason = format!("{e:#}");
        let reason = reason.lines().next().unwrap_or_default().to_string();
        if !opts.quiet {
            log::warn(&format!("skipped {}: {reason}", file.path.display()));
        }
        if let Some(report) = report {
            report.add_error(file.relative.to_string_lossy().into_owned(), reason.clone())?;
        }
        results.push(ImageResult::error(&file, reason));
    }
    let order: std::collections::HashMap<&str, usize> = files
        .iter()
        .enumerate()
        .map(|(i, f)| (f.path.to_str().unwrap_or_default(), i))
        .collect();
    results.sort_by_key(|r| order.get(r.source.as_str()).copied().unwrap_or(usize::MAX));
    Ok(results)
}

/// Writes `results.csv` or `results.json`.
fn write_results(
    opts: &PredictOptions,
    results: &[ImageResult],
    thresholds: Option<Thresholds>,
) -> Result<()> {
    let errors = results.iter().filter(|r| r.error.is_some()).count();
    let results_path = opts.output.join(opts.format.file_name());
    match opts.format {
        ResultsFormat::Csv => files::write_results_csv(&results_path, results),
        ResultsFormat::Json => files::write_json(
            &results_path,
            &RunResults {
                model: opts.index.display().to_string(),
                thresholds,
                images: results.len(),
                anomalous: thresholds.map(|_| {
                    results
                        .iter()
                        .filter(|r| r.verdict == Some(verdict::ANOMALOUS))
                        .count()
                }),
                errors,
                results,
            },
            true,
        ),
    }
}

/// Writes `index.html`: the run's images with the model's calibration.
fn finish_report(
    opts: &PredictOptions,
    model: &Model,
    thresholds: Option<Thresholds>,
    report: Report,
) -> Result<()> {
    let calibration = model.calibration();
    let input = opts
        .inputs
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let meta = ReportMeta {
        title: format!("patchcore: {input}"),
        model: opts.index.display().to_string(),
        input,
        threshold: thresholds.map(|t| t.image),
        calibration_scores: calibration.map_or_else(Vec::new, |c| c.image_scores.clone()),
        calibration_images: calibration.map_or_else(Vec::new, |c| {
            c.scored_images
                .iter()
                .map(|s| (s.file.clone(), s.score))
                .collect()
        }),
        calibration_folder: calibration.and_then(|c| c.folder.clone()),
        extra: vec![
            ("backbone".to_string(), model.backbones()),
            (
                "threshold from".to_string(),
                thresholds.map_or("none".to_string(), |t| t.source.to_string()),
            ),
        ],
    };
    report.finish(&meta, &opts.output.join("index.html"))
}

/// The nearest-neighbour search that ran and how often it fell back, over every member.
fn knn_timings(model: &Model, timings: &mut PredictTimings) {
    // An ensemble's backbones usually share one method: say it once.
    let mut methods: Vec<String> = model.members().map(|m| m.knn.describe()).collect();
    methods.dedup();
    timings.knn_method = methods.join("; ");
    timings.knn_fallbacks = model.members().map(|m| m.knn.fallbacks).sum();
    let (queries, exact) = model.members().fold((0, 0), |(q, e), m| {
        (q + m.knn.pruned_queries, e + m.knn.exact_distances)
    });
    timings.knn_exact_per_query = (queries > 0).then(|| exact as f64 / queries as f64);
}

/// What every image's outputs depend on.
struct ImageContext<'a> {
    out_dir: &'a Path,
    thresholds: Option<Thresholds>,
    contour: bool,
    report: Option<&'a Report>,
}

impl ImageContext<'_> {
    /// Writes a scored image's heatmap, overlay, mask and `NAME.json`; returns its results.
    fn finish_image(&self, image: &ScoredImage) -> Result<ImageResult> {
        let Some(heat) = &image.heatmap else {
            bail!(
                "internal error: {} was scored without its heatmap",
                image.file.path.display()
            );
        };
        let rel = &image.file.relative;
        let out = |suffix: &str| files::output_path(self.out_dir, rel, suffix);
        let name_of = |p: &Path| {
            p.strip_prefix(self.out_dir)
                .unwrap_or(p)
                .to_string_lossy()
                .into_owned()
        };
        let npy = out(".npy")?;
        files::write_npy(&npy, heat)?;
        let assessment = verdict::assess(image.score, heat, self.thresholds);
        let mask = match &assessment.mask {
            Some(mask) => {
                let path = out("_mask.png")?;
                files::write_mask_png(&path, mask.view())?;
                Some(name_of(&path))
            }
            None => None,
        };
        let overlay = verdict::overlay(
            &image.original,
            heat,
            &assessment,
            self.thresholds,
            self.contour,
        );
        let jpg = out(".jpg")?;
        files::write_jpeg(&jpg, &overlay)?;
        let result = ImageResult {
            path: rel.to_string_lossy().into_owned(),
            source: image.file.path.to_string_lossy().into_owned(),
            width: image.original.width(),
            height: image.original.height(),
            score: assessment.score,
            normalized_score: assessment.normalized_score,
            verdict: assessment.verdict,
            regions: assessment.regions,
            heatmap: name_of(&npy),
            overlay: name_of(&jpg),
            mask,
            error: None,
        };
        files::write_json(&out(".json")?, &result, false)?;
        if let Some(report) = self.report {
            report.add(
                ReportEntry {
                    name: result.path.clone(),
                    score: result.score,
                    normalized: result.normalized_score,
                    anomalous: result.verdict.map(|v| v == verdict::ANOMALOUS),
                    regions: result.regions.len(),
                    overlay_file: jpg
                        .strip_prefix(self.out_dir)
                        .ok()
                        .map(|p| p.to_string_lossy().into_owned()),
                },
                &image.original,
                &overlay,
            )?;
        }
        Ok(result)
    }
}

/// The space the heatmaps (`NAME.npy`, 4 bytes per original pixel) will take, from the
/// image headers; unreadable ones count nothing, overlays and masks are left out: a low
/// estimate.
fn heatmaps_space(files: &[ImageFile]) -> fsutil::SpaceNeed {
    let (mut pixels, mut known) = (0u64, 0usize);
    for f in files {
        if let Ok((w, h)) = image::image_dimensions(&f.path) {
            pixels += u64::from(w) * u64::from(h);
            known += 1;
        }
    }
    fsutil::SpaceNeed {
        bytes: pixels * 4,
        what: format!("the heatmaps of {known} images (their pixels x 4 bytes, at least)"),
    }
}

/// An earlier run's outputs in the output folder, found by its results file(s): the
/// per-image outputs of every image they list (`REL` with each of
/// [`files::IMAGE_OUTPUT_SUFFIXES`]), the results files and our `index.html`.
struct EarlierRun {
    /// Run files found: results.csv, results.json.
    results: Vec<&'static str>,
    /// Images listed, relative to the output folder as their `path`.
    images: Vec<PathBuf>,
}

impl EarlierRun {
    fn find(out_dir: &Path) -> Result<Option<EarlierRun>> {
        let mut run = EarlierRun {
            results: Vec::new(),
            images: Vec::new(),
        };
        for format in [ResultsFormat::Csv, ResultsFormat::Json] {
            let path = out_dir.join(format.file_name());
            if !path.is_file() {
                continue;
            }
            run.results.push(format.file_name());
            let unreadable = |e: String| {
                anyhow::anyhow!(
                    "output folder {} holds an earlier run's {}, which cannot be read ({e}): \
                     remove the earlier outputs yourself, or choose another folder",
                    out_dir.display(),
                    format.file_name()
                )
            };
            match format {
                ResultsFormat::Csv => {
                    let mut r =
                        csv::Reader::from_path(&path).map_err(|e| unreadable(e.to_string()))?;
                    let column = r
                        .headers()
                        .map_err(|e| unreadable(e.to_string()))?
                        .iter()
                        .position(|h| h == "path")
                        .ok_or_else(|| unreadable("no path column".into()))?;
                    for rec in r.records() {
                        let rec = rec.map_err(|e| unreadable(e.to_string()))?;
                        run.images.extend(rec.get(column).map(PathBuf::from));
                    }
                }
                ResultsFormat::Json => {
                    let text =
                        std::fs::read_to_string(&path).map_err(|e| unreadable(e.to_string()))?;
                    let v: serde_json::Value =
                        serde_json::from_str(&text).map_err(|e| unreadable(e.to_string()))?;
                    let rows = v["results"]
                        .as_array()
                        .ok_or_else(|| unreadable("no results list".into()))?;
                    run.images.extend(
                        rows.iter()
                            .filter_map(|r| r["path"].as_str())
                            .map(PathBuf::from),
                    );
                }
            }
        }
        // Only paths inside the folder: a damaged list must not reach elsewhere.
        run.images.retain(|p| {
            p.components()
                .all(|c| matches!(c, std::path::Component::Normal(_)))
        });
        Ok((!run.results.is_empty()).then_some(run))
    }

    fn results_name(&self) -> String {
        self.results.join(", ")
    }

    /// Removes the earlier run's files (never one of this run's inputs), and the folders
    /// that held them once empty.
    fn remove(self, out_dir: &Path, inputs: &[ImageFile]) -> Result<()> {
        let canon = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
        let inputs: HashSet<PathBuf> = inputs.iter().map(|f| canon(&f.path)).collect();
        let mut files: Vec<PathBuf> = Vec::new();
        for rel in &self.images {
            for suffix in files::IMAGE_OUTPUT_SUFFIXES {
                files.push(files::output_relative(rel, suffix)?);
            }
        }
        let html = out_dir.join("index.html");
        let ours = std::fs::read(&html).is_ok_and(|b| {
            let head = &b[..b.len().min(4096)];
            String::from_utf8_lossy(head).contains("<meta name=\"generator\" content=\"patchcore")
        });
        files.extend(self.results.iter().map(PathBuf::from));
        if ours {
            files.push("index.html".into());
        }
        let mut folders = std::collections::BTreeSet::new();
        for rel in files {
            let path = out_dir.join(&rel);
            if inputs.contains(&canon(&path)) {
                continue;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => bail!("cannot remove earlier output {}: {e}", path.display()),
            }
            folders.extend(
                rel.ancestors()
                    .skip(1)
                    .filter(|a| !a.as_os_str().is_empty())
                    .map(Path::to_path_buf),
            );
        }
        // Deepest first; a folder holding anything else stays.
        for dir in folders.iter().rev() {
            let _ = std::fs::remove_dir(out_dir.join(dir));
        }
        Ok(())
    }
}

/// Refuses, before anything is written, inputs whose outputs would land on the same file:
/// `a.png` and `a.bmp` in one folder, `000.png` of two folders given with `-i`, the same file
/// given twice, an image `results.png` beside `--format json`'s `results.json`, or an output
/// file where another image's outputs need a folder (`x.png` writes `x.jpg`, `x.jpg/0.png`
/// needs a folder `x.jpg`). Written in parallel, they would overwrite each other or fail
/// halfway.
fn check_collisions(files: &[ImageFile], run_files: &[&str], out_dir: &Path) -> Result<()> {
    let mut owners: BTreeMap<PathBuf, &ImageFile> = BTreeMap::new();
    for f in files {
        for suffix in files::IMAGE_OUTPUT_SUFFIXES {
            let rel = files::output_relative(&f.relative, suffix)?;
            if let Some(other) = owners.insert(rel.clone(), f) {
                bail!(
                    "inputs {} and {} would both write {}: rename one, or score them in \
                     separate runs",
                    other.path.display(),
                    f.path.display(),
                    out_dir.join(rel).display()
                );
            }
        }
    }
    for name in run_files {
        if let Some(f) = owners.get(Path::new(name)) {
            bail!(
                "input {} would write {}, the run's own {name}: rename it, or score it in \
                 another run",
                f.path.display(),
                out_dir.join(name).display()
            );
        }
    }
    for (rel, f) in &owners {
        for folder in rel.ancestors().skip(1) {
            if let Some(other) = owners.get(folder) {
                bail!(
                    "input {} would write the file {}, where input {} needs a folder: rename \
                     one, or score them in separate runs",
                    other.path.display(),
                    out_dir.join(folder).display(),
                    f.path.display()
                );
            }
        }
    }
    Ok(())
}

/// Refuses to run when an output file would replace an input image (e.g. `-o` equals `-i`
/// and an input is named NAME.jpg).
fn guard_inputs(files: &[ImageFile], run_files: &[&str], out_dir: &Path) -> Result<()> {
    let canon = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    let inputs: HashSet<PathBuf> = files.iter().map(|f| canon(&f.path)).collect();
    let out_dir = canon(out_dir);
    for f in files {
        for suffix in files::IMAGE_OUTPUT_SUFFIXES {
            let out = out_dir.join(files::output_relative(&f.relative, suffix)?);
            if inputs.contains(&out) {
                bail!(
                    "output {} would overwrite input image {}: choose another output folder",
                    out.display(),
                    f.path.display()
                );
            }
        }
    }
    for name in run_files {
        let p = out_dir.join(name);
        if inputs.contains(&p) {
            bail!("output {} would overwrite an input file", p.display());
        }
    }
    Ok(())
}

/// The end-of-run message of `predict` (plain text, or a JSON line with every figure).
pub fn log_summary(run: &PredictRun, opts: &PredictOptions, details: bool) {
    let output = &opts.output;
    let t = &run.timings;
    let anomalous = run.anomalous();
    let n = run.results.len().max(1) as f64;
    let verdicts = match run.thresholds {
        Some(th) => format!(": {anomalous} anomalous (threshold {})", th.image),
        None => String::new(),
    };
    let errors = run.errors();
    if errors > 0 {
        log::warn(&format!(
            "{errors} of {} images could not be scored (verdict error in {}): see the reasons above",
            run.results.len(),
            output.display()
        ));
    }
    let files = match opts.report {
        true => format!(
            "{} and {}",
            output.join(opts.format.file_name()).display(),
            output.join("index.html").display()
        ),
        false => output.join(opts.format.file_name()).display().to_string(),
    };
    // The internals (per-stage times, kNN method, loading) only when asked (-v, --timings).
    if details {
        log::info(&format!(
            "{:.3} s per image (features {:.3}, kNN {:.3}, heatmaps and files {:.3}); kNN {}; \
             loading: start-up {}, index {:.3} s, weights {:.3} s, BatchNorm probe {:.3} s{}",
            t.total_s / n,
            t.features_s / n,
            t.knn_s / n,
            t.heatmap_and_write_s / n,
            t.knn_method,
            t.start_up_s
                .map_or("unknown".to_string(), |s| format!("{s:.2} s")),
            t.index_s,
            t.weights_s,
            t.probe_s,
            if t.probe_cached { " (cached)" } else { "" }
        ));
    }
    log::emit(
        Level::Info,
        &format!(
            "scored {} image{}{verdicts}{}; see {files}",
            run.results.len() - errors,
            if run.results.len() - errors == 1 {
                ""
            } else {
                "s"
            },
            match errors {
                0 => String::new(),
                e => format!(", {e} skipped (verdict error)"),
            },
        ),
        serde_json::json!({
            "event": "predicted",
            "output": output.display().to_string(),
            "images": run.results.len(),
            "anomalous": run.thresholds.map(|_| anomalous),
            "thresholds": run.thresholds,
            "timings": t,
        }),
    );
}
