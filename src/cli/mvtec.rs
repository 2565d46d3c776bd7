//! `patchcore mvtec`'s options: `runall` (the train options with the paper protocol's
//! defaults, converted into [`RunAllOptions`]) and `summarize`, each with its closing message.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::train::{ModelArgs, ModelDefaults};
use super::{Outcome, Runtime};
use crate::backbone::Arch;
use crate::log;
use crate::mvtec::{self, RunAllOptions};

/// The defaults of `mvtec runall`: the paper protocol, every training image in the bank.
const RUNALL_DEFAULTS: ModelDefaults = ModelDefaults {
    resize: 256,
    crop: Some(224),
    calibration_ratio: 0.0,
};

#[derive(Args)]
pub struct RunallArgs {
    /// The dataset: CATEGORY/train/good, CATEGORY/test/TYPE, CATEGORY/ground_truth/TYPE.
    #[arg(long)]
    pub data: PathBuf,
    /// Categories to run (repeat the option) [default: every one found].
    #[arg(long = "category")]
    pub categories: Vec<String>,
    /// Backbones to compare (repeat the option) [default: wide_resnet50_2].
    #[arg(long = "backbone")]
    pub backbones: Vec<String>,
    /// Output folder: OUT/BACKBONE/CATEGORY/{index.faiss, result.json}.
    #[arg(long, default_value = "mvtec-runs")]
    pub out: PathBuf,
    /// Recompute pairs that already have a result.
    #[arg(long)]
    pub force: bool,
    /// Evaluate this trained model (e.g. one `patchcore merge` wrote) on the test split of
    /// the one --category given, instead of training one; its options come from its sidecar.
    /// (Not `--index`: that is the kind of index runall trains, as in train.)
    #[arg(long, value_name = "INDEX", requires = "categories")]
    pub evaluate: Option<PathBuf>,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub runtime: Runtime,
}

#[derive(Args)]
pub struct SummarizeArgs {
    /// Folder runall wrote to.
    #[arg(long, default_value = "mvtec-runs")]
    pub runs: PathBuf,
    /// Where the tables, plots and a copy of the results go.
    #[arg(long, default_value = "experiments/mvtec")]
    pub out: PathBuf,
}

impl RunallArgs {
    /// The options of this evaluation: every `--backbone` (default WRN-50-2) with the train
    /// options on `device`.
    pub fn options(&self, device: tch::Device) -> Result<RunAllOptions> {
        let archs = if self.backbones.is_empty() {
            vec![Arch::WideResnet50_2]
        } else {
            self.backbones
                .iter()
                .map(|b| Arch::parse(b))
                .collect::<Result<Vec<_>>>()?
        };
        let backbones = archs
            .into_iter()
            .map(|arch| {
                let train =
                    self.model
                        .train_options(arch, RUNALL_DEFAULTS, &self.runtime, device)?;
                Ok((train, self.model.weights_arg(arch).to_string()))
            })
            .collect::<Result<_>>()?;
        Ok(RunAllOptions {
            data: self.data.clone(),
            categories: self.categories.clone(),
            backbones,
            out: self.out.clone(),
            force: self.force,
            index: self.evaluate.clone(),
        })
    }
}

/// `patchcore mvtec runall`: every category x backbone, then where the results are.
pub fn runall(a: &RunallArgs) -> Result<Outcome> {
    let device = a.runtime.setup()?;
    let results = mvtec::run_all(&a.options(device)?)?;
    log::info(&format!(
        "{} runs in {}; tables and plots: patchcore mvtec summarize --runs {}",
        results.len(),
        a.out.display(),
        a.out.display()
    ));
    Ok(Outcome::Done)
}

/// `patchcore mvtec summarize`: tables and plots from the results, then what it wrote.
pub fn summarize(a: &SummarizeArgs) -> Result<Outcome> {
    let written = mvtec::summary::summarize(&a.runs, &a.out)?;
    log::info(&format!(
        "wrote {} files into {} (summary.md, summary.csv, *.svg, curves/, results/)",
        written.len(),
        a.out.display()
    ));
    Ok(Outcome::Done)
}
