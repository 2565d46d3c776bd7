//! The command line below `main.rs`: per command, its options as clap declares them, their
//! conversion into the command's options struct, and the run of the command from them with
//! its end-of-run summary (as ripgrep keeps its flags apart from the work they drive).
//! `main.rs` declares the commands and dispatches to `cli::COMMAND::run`; no stage imports
//! this module.

pub mod calibrate;
pub mod export;
pub mod merge;
pub mod mvtec;
pub mod predict;
pub mod serve;
pub mod train;

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use tch::Device;

use crate::features::weights::WeightsSpec;

/// A model given on the command line (`--index`, `merge`'s parts and `--base`): the index
/// path, also when the sidecar `INDEX.json` is named instead (`--index m.faiss.json` means
/// `m.faiss`, not a model whose sidecar would be `m.faiss.json.json`). A path ending in
/// `.json` is kept as it is only when its own sidecar exists (an index named `X.json`).
pub fn model_path(arg: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(arg);
    match arg.strip_suffix(".json") {
        Some(index) if !index.is_empty() && !crate::model::bank::sidecar_path(&path).exists() => {
            Ok(PathBuf::from(index))
        }
        _ => Ok(path),
    }
}

/// How a command ended, for `main` to turn into an exit status.
pub enum Outcome {
    Done,
    /// `--fail-on-anomaly` and an image was anomalous.
    Anomalous,
    /// `predict --on-error skip` skipped an image it could not score.
    Skipped,
}

/// The trained model to score with and the thresholds in force: predict's and serve's.
#[derive(Args)]
pub struct ScoringArgs {
    /// Model index written by `patchcore train` (its sidecar INDEX.json must be beside it), or
    /// an ensemble's (`train --backbone A --backbone B`): each image is scored by every
    /// backbone, and the ensemble's score and heatmap are the mean over backbones of the score
    /// (heatmap) divided by that backbone's calibrated image (pixel) threshold, so its
    /// thresholds are 1.
    #[arg(long, default_value = "index.faiss", value_parser = model_path)]
    pub index: PathBuf,
    /// Where the backbone weights are, if not where the model recorded them (they must be
    /// the same weights: checked by checksum).
    #[arg(long)]
    pub weights: Option<String>,
    /// Image threshold on the raw score (an ensemble's: on its mean of score / threshold),
    /// instead of the model's calibrated one.
    #[arg(long)]
    pub threshold: Option<f32>,
    /// Pixel threshold of masks and regions [default: the model's, scaled like --threshold].
    #[arg(long)]
    pub pixel_threshold: Option<f32>,
    /// Draw the outlines of the defect regions on the overlay (predict's NAME.jpg, serve's
    /// ?overlay=jpg) instead of the heatmap.
    #[arg(long)]
    pub contour: bool,
    /// Lists an IVF model (`train --index ivf`) searches per query, instead of the nprobe it
    /// records; its nlist searches every list, as exactly as a flat index.
    #[arg(long)]
    pub nprobe: Option<u32>,
    /// Largest image, in pixels (width x height), read from its header before any pixel is
    /// decoded: a larger one is refused (serve: 413).
    #[arg(long, default_value_t = crate::features::images::DEFAULT_MAX_PIXELS)]
    pub max_pixels: u64,
}

impl ScoringArgs {
    /// `--weights`, parsed.
    pub fn weights_spec(&self) -> Result<Option<WeightsSpec>> {
        self.weights.as_deref().map(WeightsSpec::parse).transpose()
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
    Auto,
}

#[derive(Args)]
pub struct Runtime {
    /// Images per forward pass.
    #[arg(short, long, default_value_t = 8)]
    pub batch_size: usize,
    /// CPU threads (default: all available cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Where the backbone runs; kNN search always runs on the CPU.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// No progress bars or notes.
    #[arg(short, long)]
    pub quiet: bool,
}

impl Runtime {
    /// Applies thread and device settings; returns the device to run the backbone on.
    pub fn setup(&self) -> Result<Device> {
        let threads = self
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        if threads == 0 {
            bail!("--threads must be at least 1");
        }
        tch::set_num_threads(threads as i32);
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global();
        if self.batch_size == 0 {
            bail!("--batch-size must be at least 1");
        }
        match self.device {
            DeviceArg::Cpu => Ok(Device::Cpu),
            DeviceArg::Cuda => {
                if let Err(e) = crate::util::runtime::load_cuda() {
                    bail!(
                        "--device cuda: no CUDA device is available: {e:#} (use --device cpu or auto)"
                    );
                }
                if !tch::Cuda::is_available() {
                    bail!("--device cuda: no CUDA device is available (use --device cpu or auto)");
                }
                Ok(Device::Cuda(0))
            }
            DeviceArg::Auto if crate::util::runtime::cuda_is_available() => Ok(Device::Cuda(0)),
            DeviceArg::Auto => Ok(Device::Cpu),
        }
    }
}
