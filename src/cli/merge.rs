//! `patchcore merge`'s options, converted into `MergeOptions`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::{Outcome, Runtime};
use crate::commands::merge::{self, MergeOptions};
use crate::features::weights::WeightsSpec;

#[derive(Args)]
pub struct MergeArgs {
    /// Partial models (index files) written by `patchcore train --shard I/N` (every shard of
    /// one run, in any order) or by `patchcore train --partial`.
    #[arg(required = true, value_name = "PART", value_parser = super::model_path)]
    pub parts: Vec<PathBuf>,
    /// Index file of the merged model to write (with its sidecar INDEX.json, as train writes).
    #[arg(short, long, default_value = "index.faiss")]
    pub output: PathBuf,
    /// An existing complete model to grow: its bank joins the parts' as one more part (its
    /// training patch count from its sidecar), so its images are not read again.
    #[arg(long, value_name = "INDEX", value_parser = super::model_path)]
    pub base: Option<PathBuf>,
    /// Where the backbone weights are, if not where the parts recorded them (checked by
    /// checksum); needed to score the held-out images.
    #[arg(long)]
    pub weights: Option<String>,
    /// Memory budget (e.g. 4G), a hard limit: a merge whose projections, bank or calibration
    /// cannot fit is refused before it reads them [default: 80% of available memory].
    #[arg(long)]
    pub max_memory: Option<String>,
    #[command(flatten)]
    pub runtime: Runtime,
}

/// `patchcore merge`: merges and calibrates, then says what it wrote (unless `--quiet`).
pub fn run(a: &MergeArgs) -> Result<Outcome> {
    let device = a.runtime.setup()?;
    let opts = MergeOptions {
        parts: a.parts.clone(),
        base: a.base.clone(),
        output: a.output.clone(),
        weights: a.weights.as_deref().map(WeightsSpec::parse).transpose()?,
        batch_size: a.runtime.batch_size,
        max_memory: match &a.max_memory {
            Some(s) => crate::training::feature_store::parse_size(s)?,
            None => crate::training::feature_store::default_budget(),
        },
        device,
        quiet: a.runtime.quiet,
    };
    let merged = merge::run(&opts)?;
    if !a.runtime.quiet {
        merge::log_summary(&merged, &opts.output, &opts.parts, opts.base.is_some());
    }
    Ok(Outcome::Done)
}
