//! `patchcore predict`'s options, converted into [`PredictOptions`]; the run writes the
//! timings file (`--timings`) and the summary, and says whether the quality gate
//! (`--fail-on-anomaly`) failed.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, ValueEnum};
use tch::Device;

use super::{Outcome, Runtime, ScoringArgs};
use crate::outputs;
use crate::predict::{self, PredictOptions, ResultsFormat};

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
    /// its layout.
    #[arg(short, long)]
    pub output: PathBuf,
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
        })
    }
}

/// `patchcore predict`: scores the images, writes `--timings` if asked, says what it wrote
/// (unless `--quiet`); `Anomalous` when `--fail-on-anomaly` and an image is.
pub fn run(a: &PredictArgs) -> Result<Outcome> {
    let device = a.runtime.setup()?;
    let opts = a.options(device)?;
    let run = predict::run(&opts)?;
    if let Some(path) = &a.timings {
        outputs::write_json(path, &run.timings, true)?;
    }
    let anomalous = run.anomalous();
    if !a.runtime.quiet {
        predict::log_summary(&run, &opts, a.verbose || a.timings.is_some());
    }
    Ok(if a.fail_on_anomaly && anomalous > 0 {
        Outcome::Anomalous
    } else {
        Outcome::Done
    })
}
