//! `patchcore predict`'s options, converted into `PredictOptions`; the run writes the
//! timings file (`--timings`) and the summary, and says whether the quality gate
//! (`--fail-on-anomaly`) failed.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, ValueEnum};
use tch::Device;

use super::{Outcome, Runtime, ScoringArgs};
use crate::commands::predict::{self, PredictOptions, ResultsFormat};
use crate::outputs::files;

/// What `predict` does with an image it cannot read or score.
#[derive(Clone, Copy, ValueEnum)]
pub enum OnErrorArg {
    /// Stop the run with the error, writing no results.
    Abort,
    /// Score the others; list it with its reason (verdict "error") in the results and the
    /// report, and exit with status 3.
    Skip,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum FormatArg {
    Csv,
    Json,
}

#[derive(Args)]
pub struct PredictArgs {
    /// Images to score: a folder (searched recursively) or an image file; repeat the option
    /// for several (-i a.png -i b.png -i dir). Inputs that would write the same output file
    /// (a.png and a.bmp in one folder, 000.png of two folders) are refused before any work.
    #[arg(short, long, required = true)]
    pub input: Vec<PathBuf>,
    /// Output folder: a file's outputs are named after it (NAME.npy, ...), a folder's mirror
    /// its layout. Checked before any work (a folder, writable, room for the heatmaps). A
    /// folder holding an earlier run's results.csv or results.json is refused, unless
    /// --overwrite.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Reuse an output folder that holds an earlier run's outputs: first remove that run's
    /// results files, its index.html and every per-image output (NAME.npy, .jpg, _mask.png,
    /// .json) of the images its results file lists, and nothing else (other files in the
    /// folder stay), so that no stale output stays beside the new ones. A run that stopped
    /// before writing its results file (an error, Ctrl-C) is not recognized: use a new folder.
    #[arg(long)]
    pub overwrite: bool,
    /// An image that cannot be read or scored (empty, damaged, too small): abort the run
    /// (the default), or skip it, list it with its one-line reason (verdict "error", no
    /// score) in the results file and the report, score the others and exit with status 3.
    #[arg(long, value_enum, default_value = "abort", value_name = "abort|skip")]
    pub on_error: OnErrorArg,
    #[command(flatten)]
    pub model: ScoringArgs,
    /// Results file of the run: results.csv or results.json.
    #[arg(long, value_enum, default_value = "csv")]
    pub format: FormatArg,
    /// Do not write the HTML report index.html.
    #[arg(long)]
    pub no_report: bool,
    /// Exit with status 2 when any image is anomalous (for scripted quality gates).
    #[arg(long)]
    pub fail_on_anomaly: bool,
    /// Also write the seconds spent per stage as JSON to this file (for benchmarks); the
    /// summary then also says them, as with -v.
    #[arg(long)]
    pub timings: Option<PathBuf>,
    /// Say the internals at the end: seconds per image by stage, the kNN method, loading.
    #[arg(short, long)]
    pub verbose: bool,
    #[command(flatten)]
    pub runtime: Runtime,
}

impl PredictArgs {
    /// The options of this prediction run on `device`.
    pub fn options(&self, device: Device) -> Result<PredictOptions> {
        Ok(PredictOptions {
            inputs: self.input.clone(),
            output: self.output.clone(),
            index: self.model.index.clone(),
            weights: self.model.weights_spec()?,
            threshold: self.model.threshold,
            pixel_threshold: self.model.pixel_threshold,
            contour: self.model.contour,
            nprobe: self.model.nprobe,
            max_pixels: self.model.max_pixels,
            format: match self.format {
                FormatArg::Csv => ResultsFormat::Csv,
                FormatArg::Json => ResultsFormat::Json,
            },
            report: !self.no_report,
            // A gate without a threshold would always pass.
            require_threshold: self.fail_on_anomaly.then_some("--fail-on-anomaly"),
            batch_size: self.runtime.batch_size,
            device,
            quiet: self.runtime.quiet,
            overwrite: self.overwrite,
            skip_errors: matches!(self.on_error, OnErrorArg::Skip),
        })
    }
}

/// `patchcore predict`: scores the images, writes `--timings` if asked, says what it wrote
/// (unless `--quiet`); `Skipped` when `--on-error skip` skipped an image, else `Anomalous`
/// when `--fail-on-anomaly` and an image is.
pub fn run(a: &PredictArgs) -> Result<Outcome> {
    let device = a.runtime.setup()?;
    let opts = a.options(device)?;
    let run = predict::run(&opts)?;
    if let Some(path) = &a.timings {
        files::write_json(path, &run.timings, true)?;
    }
    let anomalous = run.anomalous();
    if !a.runtime.quiet {
        predict::log_summary(&run, &opts, a.verbose || a.timings.is_some());
    }
    Ok(if run.errors() > 0 {
        Outcome::Skipped
    } else if a.fail_on_anomaly && anomalous > 0 {
        Outcome::Anomalous
    } else {
        Outcome::Done
    })
}
