//! The command line below `main.rs`: per command, its options as clap declares them, their
//! conversion into the command's options struct, and the run of the command from them with
//! its end-of-run summary (as ripgrep keeps its flags apart from the work they drive).
//! `main.rs` declares the commands and dispatches to `cli::COMMAND::run`; no stage imports
//! this module.

pub mod calibrate;
pub mod mvtec;
pub mod predict;
pub mod serve;
pub mod train;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use tch::Device;

/// How a command ended, for `main` to turn into an exit status.
pub enum Outcome {
    Done,
    /// `--fail-on-anomaly` and an image was anomalous.
    Anomalous,
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
                if let Err(e) = crate::runtime::load_cuda() {
                    bail!(
                        "--device cuda: no CUDA device is available: {e:#} (use --device cpu or auto)"
                    );
                }
                if !tch::Cuda::is_available() {
                    bail!("--device cuda: no CUDA device is available (use --device cpu or auto)");
                }
                Ok(Device::Cuda(0))
            }
            DeviceArg::Auto if crate::runtime::cuda_is_available() => Ok(Device::Cuda(0)),
            DeviceArg::Auto => Ok(Device::Cpu),
        }
    }
}
