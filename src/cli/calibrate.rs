//! `patchcore calibrate`'s options, converted into `CalibrateOptions`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use tch::Device;

use super::{Outcome, Runtime};
use crate::commands::calibrate::{self, CalibrateOptions};
use crate::features::weights::WeightsSpec;
use crate::util::records::Rule;

#[derive(Args)]
pub struct CalibrateArgs {
    /// Folder of good images (at least 5; searched recursively), like the ones predict will
    /// see: the thresholds are derived from their scores.
    #[arg(short, long)]
    pub input: PathBuf,
    /// Model index written by `patchcore train`; its sidecar INDEX.json gets the new thresholds.
    /// For an ensemble, every backbone is calibrated on the images and the ensemble's sidecar
    /// records their thresholds (its own stay 1).
    #[arg(long, default_value = "index.faiss", value_parser = super::model_path)]
    pub index: PathBuf,
    /// How the images' scores become the image and pixel thresholds: quantile (q99 + 0.1 *
    /// (q99 - median), as train) or sigma (mean + K population standard deviations, ddof=0).
    #[arg(long, default_value = "quantile", value_parser = ["quantile", "sigma"])]
    pub rule: String,
    /// K of --rule sigma [default: 5].
    #[arg(long)]
    pub coef: Option<f64>,
    /// Print the old and new thresholds without writing them (printed even with --quiet).
    #[arg(long)]
    pub dry_run: bool,
    /// Where the backbone weights are, if not where the model recorded them (they must be
    /// the same weights: checked by checksum).
    #[arg(long)]
    pub weights: Option<String>,
    /// Memory budget (e.g. 2G), a hard limit: refused before scoring when the backbone, a
    /// batch and the bank's search cannot fit [default: 80% of available memory].
    #[arg(long)]
    pub max_memory: Option<String>,
    #[command(flatten)]
    pub runtime: Runtime,
}

impl CalibrateArgs {
    /// The options of this calibration on `device`.
    pub fn options(&self, device: Device) -> Result<CalibrateOptions> {
        Ok(CalibrateOptions {
            input: self.input.clone(),
            index: self.index.clone(),
            weights: self
                .weights
                .as_deref()
                .map(WeightsSpec::parse)
                .transpose()?,
            rule: Rule::parse(&self.rule, self.coef, "--coef")?,
            dry_run: self.dry_run,
            batch_size: self.runtime.batch_size,
            max_memory: match &self.max_memory {
                Some(s) => crate::training::feature_store::parse_size(s)?,
                None => crate::training::feature_store::default_budget(),
            },
            device,
            quiet: self.runtime.quiet,
        })
    }
}

/// `patchcore calibrate`: new thresholds, then the old and the new (always with `--dry-run`).
pub fn run(a: &CalibrateArgs) -> Result<Outcome> {
    let device = a.runtime.setup()?;
    let opts = a.options(device)?;
    // One summary per backbone of an ensemble; its own thresholds stay 1 by its rule.
    for (index, run) in calibrate::run(&opts)? {
        if !a.runtime.quiet || opts.dry_run {
            calibrate::log_summary(&index, &opts.input, &run);
        }
    }
    Ok(Outcome::Done)
}
