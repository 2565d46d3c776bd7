//! The `patchcore` command line: parses arguments and hands them to the library's commands.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tch::Device;

use patchcore::backbone::{parse_layer, Arch};
use patchcore::extractor::Precision;
use patchcore::images::Preprocess;
use patchcore::weights::WeightsSpec;
use patchcore::{feature_store, predict, synthetic, train};

#[derive(Parser)]
#[command(
    name = "patchcore",
    version,
    long_version = patchcore::version::long_version(),
    about = "PatchCore anomaly detection: train on good images, score new ones",
    long_about = "PatchCore anomaly detection (Roth et al., CVPR 2022), faithful to the official \
                  implementation.\n\n  patchcore train   -i data_train -o index.faiss\n  \
                  patchcore predict -i data_test  -o output_test"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build a memory bank from a folder of good images.
    Train(TrainArgs),
    /// Score images: writes NAME.npy heatmaps, NAME.jpg overlays and scores.csv.
    Predict(PredictArgs),
    /// Write the synthetic sample dataset (as bundled in data/sample).
    #[command(hide = true)]
    MakeSample {
        #[arg(short, long)]
        output: PathBuf,
        #[arg(long, default_value_t = 256)]
        size: u32,
        #[arg(long, default_value_t = 12)]
        train: usize,
        #[arg(long, default_value_t = 3)]
        test: usize,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum PrecisionArg {
    Fp32,
    Bf16,
}

#[derive(Clone, Copy, ValueEnum)]
enum DeviceArg {
    Cpu,
    Cuda,
    Auto,
}

#[derive(Args)]
struct Runtime {
    /// Images per forward pass.
    #[arg(short, long, default_value_t = 8)]
    batch_size: usize,
    /// CPU threads (default: all available cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Where the backbone runs; kNN search always runs on the CPU.
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// No progress bars or notes.
    #[arg(short, long)]
    quiet: bool,
}

#[derive(Args)]
struct TrainArgs {
    /// Folder of good images (searched recursively; png, jpg, bmp, tiff).
    #[arg(short, long)]
    input: PathBuf,
    /// Index file to write (FAISS); the sidecar INDEX.json is written beside it.
    #[arg(short, long, default_value = "index.faiss")]
    output: PathBuf,
    /// Backbone weights: "imagenet" (torchvision's, downloaded once into the cache), a
    /// safetensors or PyTorch state-dict file, an http(s) URL[#sha256=HEX], or random:SEED.
    #[arg(long, default_value = "imagenet")]
    weights: String,
    /// Backbone architecture (torchvision name).
    #[arg(long, default_value = "wide_resnet50_2")]
    backbone: String,
    /// Layers whose features are used, comma-separated.
    #[arg(long, default_value = "layer2,layer3")]
    layers: String,
    /// Fraction of patches kept in the memory bank (greedy coreset); 1.0 keeps all.
    #[arg(short, long, default_value_t = 0.1)]
    sampling_ratio: f64,
    /// Nearest neighbours averaged into a patch score.
    #[arg(short = 'k', long, default_value_t = 1)]
    n_neighbors: usize,
    /// Seed of the coreset's projection and starting points.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Resize the shorter image side to this many pixels (aspect ratio kept).
    #[arg(long, default_value_t = 224)]
    resize: u32,
    /// Center-crop a square of this side after resizing (default: no crop, whole image).
    /// The paper protocol is --resize 256 --crop 224.
    #[arg(long)]
    crop: Option<u32>,
    /// Arithmetic of the backbone and of predict's nearest-neighbour search: fp32 (official)
    /// or bf16 (faster on CPUs with AMX; stored in the model).
    #[arg(long, value_enum, default_value = "fp32")]
    precision: PrecisionArg,
    /// Memory budget (e.g. 4G): the training features that do not fit go to a temporary file
    /// beside the model [default: 80% of available memory].
    #[arg(long)]
    max_memory: Option<String>,
    #[command(flatten)]
    runtime: Runtime,
}

#[derive(Args)]
struct PredictArgs {
    /// Folder of images to score (searched recursively).
    #[arg(short, long)]
    input: PathBuf,
    /// Output folder; mirrors the input folder's layout.
    #[arg(short, long)]
    output: PathBuf,
    /// Model index written by `patchcore train` (its sidecar INDEX.json must be beside it).
    #[arg(long, default_value = "index.faiss")]
    index: PathBuf,
    /// Where the backbone weights are, if not where the model recorded them (they must be
    /// the same weights: checked by checksum).
    #[arg(long)]
    weights: Option<String>,
    /// Also write the seconds spent per stage as JSON to this file (for benchmarks).
    #[arg(long)]
    timings: Option<PathBuf>,
    #[command(flatten)]
    runtime: Runtime,
}

fn main() -> ExitCode {
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("unknown");
        let first = msg.lines().next().unwrap_or(msg);
        eprintln!("error: internal error: {first}");
    }));
    let cli = Cli::parse();
    patchcore::interrupt::install();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}");
            eprintln!("error: {}", msg.lines().next().unwrap_or(&msg));
            if patchcore::interrupt::requested() {
                ExitCode::from(130)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(a) => {
            let device = setup(&a.runtime)?;
            let layers = a
                .layers
                .split(',')
                .map(|l| parse_layer(l.trim()))
                .collect::<Result<Vec<_>>>()?;
            let opts = train::TrainOptions {
                input: a.input,
                output: a.output,
                arch: Arch::parse(&a.backbone)?,
                layers,
                weights: WeightsSpec::parse(&a.weights)?,
                preprocess: Preprocess {
                    resize: a.resize,
                    crop: a.crop,
                },
                sampling_ratio: a.sampling_ratio,
                n_neighbors: a.n_neighbors,
                seed: a.seed,
                batch_size: a.runtime.batch_size,
                precision: match a.precision {
                    PrecisionArg::Fp32 => Precision::Fp32,
                    PrecisionArg::Bf16 => Precision::Bf16,
                },
                max_memory: match &a.max_memory {
                    Some(s) => feature_store::parse_size(s)?,
                    None => feature_store::default_budget(),
                },
                device,
                quiet: a.runtime.quiet,
            };
            let info = train::run(&opts)?;
            if !a.runtime.quiet {
                let t = &info.timings;
                eprintln!(
                    "trained on {} images: {} of {} patches kept in {} \
                     (features {:.1} s, coreset {:.1} s, index {:.1} s, total {:.1} s)",
                    info.training.images,
                    info.bank_size,
                    info.training.patches,
                    opts.output.display(),
                    t.feature_extraction_s,
                    t.coreset_s,
                    t.index_write_s,
                    t.total_s
                );
            }
            Ok(())
        }
        Command::Predict(a) => {
            let device = setup(&a.runtime)?;
            let opts = predict::PredictOptions {
                input: a.input,
                output: a.output,
                index: a.index,
                weights: a.weights.as_deref().map(WeightsSpec::parse).transpose()?,
                batch_size: a.runtime.batch_size,
                device,
                quiet: a.runtime.quiet,
            };
            let (results, t) = predict::run(&opts)?;
            if let Some(path) = &a.timings {
                let mut f = patchcore::outputs::AtomicFile::create(path)?;
                serde_json::to_writer_pretty(&mut f, &t)?;
                f.commit()?;
            }
            if !a.runtime.quiet {
                let n = results.len().max(1) as f64;
                eprintln!(
                    "scored {} images into {} ({:.3} s per image: features {:.3}, kNN {:.3}, \
                     heatmaps and files {:.3})",
                    results.len(),
                    opts.output.display(),
                    t.total_s / n,
                    t.features_s / n,
                    t.knn_s / n,
                    t.heatmap_and_write_s / n
                );
            }
            Ok(())
        }
        Command::MakeSample {
            output,
            size,
            train,
            test,
        } => synthetic::write_sample(&output, size, train, test),
    }
}

/// Applies thread and device settings; returns the device to run the backbone on.
fn setup(rt: &Runtime) -> Result<Device> {
    let threads = rt
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if threads == 0 {
        bail!("--threads must be at least 1");
    }
    tch::set_num_threads(threads as i32);
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global();
    if rt.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    match rt.device {
        DeviceArg::Cpu => Ok(Device::Cpu),
        DeviceArg::Cuda => {
            if !tch::Cuda::is_available() {
                bail!("--device cuda: no CUDA device is available (use --device cpu or auto)");
            }
            Ok(Device::Cuda(0))
        }
        DeviceArg::Auto => Ok(Device::cuda_if_available()),
    }
}
