//! `patchcore export`'s options, converted into `ExportOptions`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::Outcome;
use crate::commands::export::{self, ExportOptions};
use crate::features::weights::WeightsSpec;

#[derive(Args)]
pub struct ExportArgs {
    /// Model index to export, as `patchcore train` wrote it (its sidecar INDEX.json beside
    /// it), or an ensemble's.
    #[arg(long, default_value = "index.faiss", value_parser = super::model_path)]
    pub index: PathBuf,
    /// Folder to write the self-contained model into: new, or empty.
    #[arg(short, long, value_name = "DIR")]
    pub output: PathBuf,
    /// Where the backbone weights are, if not where the model recorded them (they must be
    /// the same weights: checked by checksum).
    #[arg(long)]
    pub weights: Option<String>,
    /// No progress bars or notes.
    #[arg(short, long)]
    pub quiet: bool,
}

/// `patchcore export`: writes the folder, then says what it holds (unless `--quiet`).
pub fn run(a: &ExportArgs) -> Result<Outcome> {
    let opts = ExportOptions {
        index: a.index.clone(),
        output: a.output.clone(),
        weights: a.weights.as_deref().map(WeightsSpec::parse).transpose()?,
        quiet: a.quiet,
    };
    let exported = export::run(&opts)?;
    if !a.quiet {
        export::log_summary(&exported, &opts.index, &opts.output);
    }
    Ok(Outcome::Done)
}
