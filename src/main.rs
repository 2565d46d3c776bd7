//! The `patchcore` command line: parses arguments and hands them to the library's commands.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tch::Device;

use patchcore::backbone::{parse_layer, Arch};
use patchcore::calibration::Rule;
use patchcore::extractor::Precision;
use patchcore::images::Preprocess;
use patchcore::log;
use patchcore::weights::WeightsSpec;
use patchcore::{calibrate, feature_store, mvtec, predict, synthetic, train};

#[derive(Parser)]
#[command(
    name = "patchcore",
    version,
    long_version = patchcore::version::long_version(),
    args_override_self = true,
    about = "PatchCore anomaly detection: train on good images, score new ones",
    long_about = "PatchCore anomaly detection (Roth et al., CVPR 2022), faithful to the official \
                  implementation.\n\n  patchcore train   -i data_train -o index.faiss\n  \
                  patchcore predict -i data_test  -o output_test"
)]
struct Cli {
    /// Messages on stderr as JSON lines (time, level, message, fields) for batch jobs.
    #[arg(long, global = true)]
    json_logs: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build a memory bank from a folder of good images: INDEX, its sidecar INDEX.json and,
    /// when it calibrates a threshold, INDEX.calibration.svg (held-out scores, threshold).
    Train(TrainArgs),
    /// Score images: per image NAME.npy heatmap, NAME.jpg overlay, NAME_mask.png and NAME.json
    /// (verdict, regions); for the run results.csv (or .json) and the report index.html
    /// (opening with a histogram of the scores against the threshold).
    ///
    /// Exit status: 0 done (and, with --fail-on-anomaly, every image good); 1 error;
    /// 2 at least one image anomalous (only with --fail-on-anomaly); 130 interrupted.
    Predict(PredictArgs),
    /// New thresholds for a trained model from a folder of good images (after lighting or
    /// material drift): scored exactly as predict scores them, stored in the model's sidecar;
    /// the index is not touched.
    Calibrate(CalibrateArgs),
    /// Serve a model over HTTP: POST /predict with an image as the body answers NAME.json's
    /// fields as JSON (?heatmap=png|npy, ?overlay=jpg add them base64-encoded); GET /health,
    /// GET /model. Concurrent requests are scored in one forward pass; SIGTERM or Ctrl-C
    /// answers the requests in flight and exits 0.
    Serve {
        #[command(flatten)]
        serve: patchcore::serve::ServeArgs,
        #[command(flatten)]
        runtime: Runtime,
    },
    /// Evaluate on MVTec AD-style datasets (runall, summarize).
    Mvtec {
        #[command(subcommand)]
        command: MvtecCommand,
    },
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
enum FormatArg {
    Csv,
    Json,
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
    /// Backbone architecture (torchvision name).
    #[arg(long, default_value = "wide_resnet50_2")]
    backbone: String,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    runtime: Runtime,
}

/// How a model is built; shared by `train` and `mvtec runall` (whose defaults follow the
/// paper protocol where noted).
#[derive(Args)]
struct ModelArgs {
    /// Backbone weights: "imagenet" (torchvision's ImageNet weights for the backbone,
    /// downloaded once into the cache and checked by checksum), "ssl" or "swsl" (resnet50
    /// only: Facebook's semi-supervised / semi-weakly supervised ImageNet models, licence
    /// CC-BY-NC), each also as NAME:pth for the original PyTorch file instead of the Hugging
    /// Face safetensors; a safetensors or PyTorch state-dict file; an http(s)
    /// URL[#sha256=HEX]; or random:SEED.
    #[arg(long, default_value = "imagenet")]
    weights: String,
    /// Layers whose features are used, comma-separated.
    #[arg(long, default_value = "layer2,layer3")]
    layers: String,
    /// Fraction of patches kept in the memory bank (greedy coreset); 1.0 keeps all.
    #[arg(short, long, default_value_t = 0.1)]
    sampling_ratio: f64,
    /// Share of the good images held out of the memory bank to calibrate the thresholds
    /// predict uses for verdicts and masks (at least 5 images, at most 1000; 0 = none)
    /// [default: 0.1; mvtec runall: 0, every image in the bank as in the paper].
    #[arg(long)]
    calibration_ratio: Option<f64>,
    /// How the held-out images' scores become the thresholds: quantile (q99 + 0.1 * (q99 -
    /// median)) or sigma (mean + K population standard deviations, K = --calibration-coef).
    #[arg(long, default_value = "quantile", value_parser = ["quantile", "sigma"])]
    calibration_rule: String,
    /// K of --calibration-rule sigma [default: 5].
    #[arg(long)]
    calibration_coef: Option<f64>,
    /// Nearest neighbours averaged into a patch score.
    #[arg(short = 'k', long, default_value_t = 1)]
    n_neighbors: usize,
    /// Seed of the coreset's projection and starting points.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Resize the shorter image side to this many pixels (aspect ratio kept)
    /// [default: 224; mvtec runall: 256].
    #[arg(long)]
    resize: Option<u32>,
    /// Center-crop a square of this side after resizing; 0 = no crop, the whole image
    /// [default: none; mvtec runall: 224]. The paper protocol is --resize 256 --crop 224.
    #[arg(long)]
    crop: Option<u32>,
    /// Cut each image into square tiles of this many original pixels (overlapping by at
    /// least 1/8) and score every tile at --resize, so small defects on large images keep
    /// their detail; heatmaps are put back together at full resolution. Not with --crop.
    #[arg(long)]
    tile: Option<u32>,
    /// Arithmetic of the backbone and of predict's nearest-neighbour search: fp32 (official)
    /// or bf16 (faster on CPUs with AMX; stored in the model).
    #[arg(long, value_enum, default_value = "fp32")]
    precision: PrecisionArg,
    /// Skip the official code's BatchNorm probe. By default, as the official implementation
    /// does when it loads a backbone (and so in all its published results), one all-ones
    /// image of the network input size (1x3xSxS, S = --crop, else --resize) is sent through
    /// the backbone in training mode before anything else, which moves every BatchNorm's
    /// running statistics up to the deepest extracted layer once (momentum 0.1). With this
    /// flag the weights' own statistics are used as they are. Recorded in the model.
    #[arg(long)]
    no_batchnorm_probe: bool,
    /// Weight the image score as in the paper's Eq. 7 over B bank neighbours of the nearest
    /// bank patch (anomalib uses 9): a defect whose nearest normal patch is itself rare scores
    /// higher. Off by default, as in the official implementation. Recorded in the model.
    #[arg(long, value_name = "B")]
    score_reweighting: Option<usize>,
    /// Memory budget (e.g. 4G): the training features that do not fit go to a temporary file
    /// beside the model [default: 80% of available memory].
    #[arg(long)]
    max_memory: Option<String>,
}

/// Defaults that differ between `train` and `mvtec runall`.
struct ModelDefaults {
    resize: u32,
    crop: Option<u32>,
    calibration_ratio: f64,
}

impl ModelArgs {
    /// Train options for `arch`, with the input and output left to the caller.
    fn train_options(
        &self,
        arch: Arch,
        defaults: ModelDefaults,
        runtime: &Runtime,
        device: Device,
    ) -> Result<train::TrainOptions> {
        let layers = self
            .layers
            .split(',')
            .map(|l| parse_layer(l.trim()))
            .collect::<Result<Vec<_>>>()?;
        Ok(train::TrainOptions {
            input: PathBuf::new(),
            output: PathBuf::new(),
            arch,
            layers,
            weights: WeightsSpec::parse(&self.weights)?,
            preprocess: Preprocess {
                resize: self.resize.unwrap_or(defaults.resize),
                crop: match self.crop {
                    Some(0) => None,
                    Some(c) => Some(c),
                    None => defaults.crop,
                },
            },
            tile: self.tile,
            sampling_ratio: self.sampling_ratio,
            calibration_ratio: self.calibration_ratio.unwrap_or(defaults.calibration_ratio),
            calibration_rule: Rule::parse(
                &self.calibration_rule,
                self.calibration_coef,
                "--calibration-coef",
            )?,
            n_neighbors: self.n_neighbors,
            seed: self.seed,
            batch_size: runtime.batch_size,
            precision: match self.precision {
                PrecisionArg::Fp32 => Precision::Fp32,
                PrecisionArg::Bf16 => Precision::Bf16,
            },
            batchnorm_probe: !self.no_batchnorm_probe,
            score_reweighting: self.score_reweighting,
            max_memory: match &self.max_memory {
                Some(s) => feature_store::parse_size(s)?,
                None => feature_store::default_budget(),
            },
            device,
            quiet: runtime.quiet,
        })
    }
}

#[derive(Subcommand)]
enum MvtecCommand {
    /// Train and evaluate every category x backbone of an MVTec AD-style dataset: image
    /// AUROC, pixel AUROC, AUPRO, best F1, timings; one result.json per pair, with its curves
    /// (curves.json; image_roc.svg, pixel_roc.svg, pro.svg). Resumable: a
    /// pair with a result of the same configuration is not recomputed (unless --force).
    Runall(Box<RunallArgs>),
    /// Tables (Markdown, CSV) per category and mean, SVG bar charts, and per category the ROC
    /// and PRO curves of every backbone overlaid (curves/CATEGORY/*.svg), from the results.
    Summarize {
        /// Folder runall wrote to.
        #[arg(long, default_value = "mvtec-runs")]
        runs: PathBuf,
        /// Where the tables, plots and a copy of the results go.
        #[arg(long, default_value = "experiments/mvtec")]
        out: PathBuf,
    },
}

#[derive(Args)]
struct RunallArgs {
    /// The dataset: CATEGORY/train/good, CATEGORY/test/TYPE, CATEGORY/ground_truth/TYPE.
    #[arg(long)]
    data: PathBuf,
    /// Categories to run (repeat the option) [default: every one found].
    #[arg(long = "category")]
    categories: Vec<String>,
    /// Backbones to compare (repeat the option) [default: wide_resnet50_2].
    #[arg(long = "backbone")]
    backbones: Vec<String>,
    /// Output folder: OUT/BACKBONE/CATEGORY/{index.faiss, result.json}.
    #[arg(long, default_value = "mvtec-runs")]
    out: PathBuf,
    /// Recompute pairs that already have a result.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    runtime: Runtime,
}

#[derive(Args)]
struct PredictArgs {
    /// Images to score: a folder (searched recursively) or an image file; repeat the option
    /// for several (-i a.png -i b.png -i dir). Inputs that would write the same output file
    /// (a.png and a.bmp in one folder, 000.png of two folders) are refused before any work.
    #[arg(short, long, required = true)]
    input: Vec<PathBuf>,
    /// Output folder: a file's outputs are named after it (NAME.npy, ...), a folder's mirror
    /// its layout.
    #[arg(short, long)]
    output: PathBuf,
    /// Model index written by `patchcore train` (its sidecar INDEX.json must be beside it).
    #[arg(long, default_value = "index.faiss")]
    index: PathBuf,
    /// Where the backbone weights are, if not where the model recorded them (they must be
    /// the same weights: checked by checksum).
    #[arg(long)]
    weights: Option<String>,
    /// Image threshold on the raw score, instead of the model's calibrated one.
    #[arg(long)]
    threshold: Option<f32>,
    /// Pixel threshold of masks and regions [default: the model's, scaled like --threshold].
    #[arg(long)]
    pixel_threshold: Option<f32>,
    /// Draw the outlines of the defect regions on the overlay instead of the heatmap.
    #[arg(long)]
    contour: bool,
    /// Results file of the run: results.csv or results.json.
    #[arg(long, value_enum, default_value = "csv")]
    format: FormatArg,
    /// Do not write the HTML report index.html.
    #[arg(long)]
    no_report: bool,
    /// Exit with status 2 when any image is anomalous (for scripted quality gates).
    #[arg(long)]
    fail_on_anomaly: bool,
    /// Also write the seconds spent per stage as JSON to this file (for benchmarks).
    #[arg(long)]
    timings: Option<PathBuf>,
    #[command(flatten)]
    runtime: Runtime,
}

#[derive(Args)]
struct CalibrateArgs {
    /// Folder of good images (at least 5; searched recursively), like the ones predict will
    /// see: the thresholds are derived from their scores.
    #[arg(short, long)]
    input: PathBuf,
    /// Model index written by `patchcore train`; its sidecar INDEX.json gets the new thresholds.
    #[arg(long, default_value = "index.faiss")]
    index: PathBuf,
    /// How the images' scores become the image and pixel thresholds: quantile (q99 + 0.1 *
    /// (q99 - median), as train) or sigma (mean + K population standard deviations, ddof=0).
    #[arg(long, default_value = "quantile", value_parser = ["quantile", "sigma"])]
    rule: String,
    /// K of --rule sigma [default: 5].
    #[arg(long)]
    coef: Option<f64>,
    /// Print the old and new thresholds without writing them (printed even with --quiet).
    #[arg(long)]
    dry_run: bool,
    /// Where the backbone weights are, if not where the model recorded them (they must be
    /// the same weights: checked by checksum).
    #[arg(long)]
    weights: Option<String>,
    #[command(flatten)]
    runtime: Runtime,
}

/// Exit status when `--fail-on-anomaly` finds an anomalous image.
const EXIT_ANOMALY: u8 = 2;
/// Exit status after Ctrl-C.
const EXIT_INTERRUPTED: u8 = 130;

fn main() -> ExitCode {
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("unknown");
        let first = msg.lines().next().unwrap_or(msg);
        log::error(&format!("internal error: {first}"));
    }));
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Usage errors are errors like any other (status 1); help and version are not.
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    log::set_json(cli.json_logs);
    patchcore::interrupt::install();
    match run(cli) {
        Ok(Outcome::Done) => ExitCode::SUCCESS,
        Ok(Outcome::Anomalous) => ExitCode::from(EXIT_ANOMALY),
        Err(e) => {
            let msg = format!("{e:#}");
            log::error(msg.lines().next().unwrap_or(&msg));
            if patchcore::interrupt::requested() {
                ExitCode::from(EXIT_INTERRUPTED)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

enum Outcome {
    Done,
    /// `--fail-on-anomaly` and an image was anomalous.
    Anomalous,
}

fn run(cli: Cli) -> Result<Outcome> {
    match cli.command {
        Command::Train(a) => {
            let device = setup(&a.runtime)?;
            let defaults = ModelDefaults {
                resize: 224,
                crop: None,
                calibration_ratio: 0.1,
            };
            let mut opts =
                a.model
                    .train_options(Arch::parse(&a.backbone)?, defaults, &a.runtime, device)?;
            opts.input = a.input;
            opts.output = a.output;
            let info = train::run(&opts)?;
            if !a.runtime.quiet {
                train::log_summary(&info, &opts.output);
            }
            Ok(Outcome::Done)
        }
        Command::Predict(a) => {
            let device = setup(&a.runtime)?;
            let opts = predict::PredictOptions {
                inputs: a.input,
                output: a.output,
                index: a.index,
                weights: a.weights.as_deref().map(WeightsSpec::parse).transpose()?,
                threshold: a.threshold,
                pixel_threshold: a.pixel_threshold,
                contour: a.contour,
                format: match a.format {
                    FormatArg::Csv => predict::ResultsFormat::Csv,
                    FormatArg::Json => predict::ResultsFormat::Json,
                },
                report: !a.no_report,
                // A gate without a threshold would always pass.
                require_threshold: a.fail_on_anomaly.then_some("--fail-on-anomaly"),
                batch_size: a.runtime.batch_size,
                device,
                quiet: a.runtime.quiet,
            };
            let run = predict::run(&opts)?;
            if let Some(path) = &a.timings {
                patchcore::outputs::write_json(path, &run.timings, true)?;
            }
            let anomalous = run.anomalous();
            if !a.runtime.quiet {
                predict::log_summary(&run, &opts.output);
            }
            Ok(if a.fail_on_anomaly && anomalous > 0 {
                Outcome::Anomalous
            } else {
                Outcome::Done
            })
        }
        Command::Calibrate(a) => {
            let device = setup(&a.runtime)?;
            let opts = calibrate::CalibrateOptions {
                input: a.input,
                index: a.index,
                weights: a.weights.as_deref().map(WeightsSpec::parse).transpose()?,
                rule: Rule::parse(&a.rule, a.coef, "--coef")?,
                dry_run: a.dry_run,
                batch_size: a.runtime.batch_size,
                device,
                quiet: a.runtime.quiet,
            };
            let run = calibrate::run(&opts)?;
            if !a.runtime.quiet || opts.dry_run {
                calibrate::log_summary(&opts, &run);
            }
            Ok(Outcome::Done)
        }
        Command::Serve { serve, runtime } => {
            patchcore::serve::run(&serve, setup(&runtime)?, runtime.batch_size, runtime.quiet)
                .map(|()| Outcome::Done)
        }
        Command::Mvtec { command } => mvtec_command(command),
        Command::MakeSample {
            output,
            size,
            train,
            test,
        } => synthetic::write_sample(&output, size, train, test).map(|()| Outcome::Done),
    }
}

fn mvtec_command(command: MvtecCommand) -> Result<Outcome> {
    match command {
        MvtecCommand::Runall(a) => {
            let device = setup(&a.runtime)?;
            let backbones = if a.backbones.is_empty() {
                vec![Arch::WideResnet50_2]
            } else {
                a.backbones
                    .iter()
                    .map(|b| Arch::parse(b))
                    .collect::<Result<_>>()?
            };
            let defaults = ModelDefaults {
                resize: 256,
                crop: Some(224),
                calibration_ratio: 0.0,
            };
            let train = a
                .model
                .train_options(backbones[0], defaults, &a.runtime, device)?;
            let results = mvtec::run_all(&mvtec::RunAllOptions {
                data: a.data,
                categories: a.categories,
                backbones,
                out: a.out.clone(),
                force: a.force,
                train,
                weights_arg: a.model.weights.clone(),
            })?;
            log::info(&format!(
                "{} runs in {}; tables and plots: patchcore mvtec summarize --runs {}",
                results.len(),
                a.out.display(),
                a.out.display()
            ));
            Ok(Outcome::Done)
        }
        MvtecCommand::Summarize { runs, out } => {
            let written = mvtec::summary::summarize(&runs, &out)?;
            log::info(&format!(
                "wrote {} files into {} (summary.md, summary.csv, *.svg, curves/, results/)",
                written.len(),
                out.display()
            ));
            Ok(Outcome::Done)
        }
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
