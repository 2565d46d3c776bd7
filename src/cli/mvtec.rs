//! `patchcore mvtec`'s options: `runall` (the train options with the paper protocol's
//! defaults, converted into [`RunAllOptions`]) and `summarize`, each with its closing message.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::train::{parse_backbones, ModelArgs, ModelDefaults};
use super::{Outcome, Runtime};
use crate::commands::mvtec::{self, RunAllOptions};
use crate::features::backbone::Arch;
use crate::util::log;

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
    /// Backbones to compare (repeat the option), each NAME or NAME:LAYER,LAYER as in train
    /// [default: wide_resnet50_2].
    #[arg(long = "backbone", value_name = "NAME[:LAYERS]")]
    pub backbones: Vec<String>,
    /// Train and evaluate one ensemble of all the --backbone per category instead of one run
    /// each: image scores and segmentation maps min-max normalised per backbone over the
    /// whole test set, then averaged, as the official run_patchcore.py does.
    #[arg(long)]
    pub ensemble: bool,
    /// A published configuration: official-ensemble is the official IM320 ensemble
    /// (sample_training.sh): wide_resnet101_2 layer2+layer3, resnext101_32x8d
    /// layer2+layer3, densenet201 features.denseblock2+3, --resize 366 --crop 320,
    /// --sampling-ratio 0.01, --embed-dim 1024 --target-dim 384, -k 1, --seed 40, as
    /// --ensemble. Not combinable with the options it sets.
    #[arg(long, value_parser = ["official-ensemble"], conflicts_with_all = [
        "backbones", "ensemble", "layers", "resize", "crop", "sampling_ratio", "embed_dim",
        "target_dim", "n_neighbors", "seed", "evaluate",
    ])]
    pub preset: Option<String>,
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

/// `--preset official-ensemble`: the backbones of the official ensemble (its
/// `-b wideresnet101 -b resnext101 -b densenet201 -le 0.layer2 ...`).
pub const OFFICIAL_ENSEMBLE: [&str; 3] = [
    "wide_resnet101_2:layer2,layer3",
    "resnext101_32x8d:layer2,layer3",
    "densenet201:features.denseblock2,features.denseblock3",
];

impl RunallArgs {
    /// The options of this evaluation: every `--backbone` (default WRN-50-2) with the train
    /// options on `device`, or the preset's.
    pub fn options(&self, device: tch::Device) -> Result<RunAllOptions> {
        let mut model = self.model.clone();
        let (list, ensemble) = match self.preset.as_deref() {
            Some(_) => {
                // sample_training.sh, IM320 ensemble: --seed 40 ... --pretrain_embed_dimension
                // 1024 --target_embed_dimension 384 --anomaly_scorer_num_nn 1 --patchsize 3
                // sampler -p 0.01 approx_greedy_coreset dataset --resize 366 --imagesize 320.
                model.resize = Some(366);
                model.crop = Some(320);
                model.sampling_ratio = 0.01;
                model.embed_dim = 1024;
                model.target_dim = 384;
                model.n_neighbors = 1;
                model.seed = 40;
                (OFFICIAL_ENSEMBLE.map(String::from).to_vec(), true)
            }
            None if self.backbones.is_empty() => {
                (vec![Arch::WideResnet50_2.name().to_string()], self.ensemble)
            }
            None => (self.backbones.clone(), self.ensemble),
        };
        if ensemble && list.len() < 2 {
            anyhow::bail!("--ensemble needs at least two --backbone");
        }
        let parsed = parse_backbones(&list, model.layers.as_deref())?;
        let n = parsed.len();
        let backbones = parsed
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let train =
                    model.train_options((i, n, b), RUNALL_DEFAULTS, &self.runtime, device)?;
                Ok((train, model.weights_arg(i, n, b.arch)?.to_string()))
            })
            .collect::<Result<_>>()?;
        Ok(RunAllOptions {
            data: self.data.clone(),
            categories: self.categories.clone(),
            backbones,
            out: self.out.clone(),
            force: self.force,
            index: self.evaluate.clone(),
            ensemble,
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
