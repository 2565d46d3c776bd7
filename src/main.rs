//! The `patchcore` command line: declares the commands and dispatches each to its run in
//! `patchcore::cli` (options, conversion, summary); maps the outcome to the exit status.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

use patchcore::cli::{self, Outcome};
use patchcore::util::{log, synthetic};

#[derive(Parser)]
#[command(
    name = "patchcore",
    version,
    long_version = patchcore::util::version::long_version(),
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
    Train(cli::train::TrainArgs),
    /// Score images: per image NAME.npy heatmap, NAME.jpg overlay, NAME_mask.png and NAME.json
    /// (verdict, regions); for the run results.csv (or .json) and the report index.html
    /// (opening with a histogram of the scores against the threshold).
    ///
    /// Exit status: 0 done (and, with --fail-on-anomaly, every image good); 1 error;
    /// 2 at least one image anomalous (only with --fail-on-anomaly); 3 at least one image
    /// could not be scored and was skipped (only with --on-error skip; before 2: the results
    /// are incomplete); 130 interrupted.
    Predict(cli::predict::PredictArgs),
    /// New thresholds for a trained model from a folder of good images (after lighting or
    /// material drift): scored exactly as predict scores them, stored in the model's sidecar;
    /// the index is not touched.
    Calibrate(cli::calibrate::CalibrateArgs),
    /// Combine partial models (`train --shard I/N`, `train --partial`) into one model, as
    /// train writes it: train's greedy coreset over all their patches, calibrated on the
    /// held-out images the shards recorded. With --base, grows an existing model by the
    /// partial model of new good images.
    Merge(cli::merge::MergeArgs),
    /// Write a model as a self-contained folder DIR for machines without network or cache
    /// (a line PC): the index, its sidecar INDEX.json (naming the weights file), the
    /// calibration figure if any, and the backbone weights file BACKBONE-SHA8.safetensors (or
    /// .pth); an ensemble's sidecar and every member likewise. predict, serve and calibrate
    /// load DIR/INDEX wherever DIR is moved, offline. DIR must be new or empty; it appears
    /// only complete and checked.
    Export(cli::export::ExportArgs),
    /// Serve a model over HTTP: POST /predict with an image as the body answers NAME.json's
    /// fields as JSON (?heatmap=png|npy, ?overlay=jpg add them base64-encoded); GET /health,
    /// GET /model. Concurrent requests are scored in one forward pass; SIGTERM or Ctrl-C
    /// answers the requests in flight and exits 0.
    Serve(cli::serve::ServeArgs),
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

#[derive(Subcommand)]
enum MvtecCommand {
    /// Train and evaluate every category x backbone of an MVTec AD-style dataset: image
    /// AUROC, pixel AUROC, AUPRO, best F1, timings; one result.json per pair, with its curves
    /// (curves.json; image_roc.svg, pixel_roc.svg, pro.svg). Resumable: a
    /// pair with a result of the same configuration is not recomputed (unless --force).
    Runall(Box<cli::mvtec::RunallArgs>),
    /// Tables (Markdown, CSV) per category and mean, SVG bar charts, and per category the ROC
    /// and PRO curves of every backbone overlaid (curves/CATEGORY/*.svg), from the results.
    Summarize(cli::mvtec::SummarizeArgs),
}

/// Exit status on an error.
const EXIT_FAILURE: u8 = 1;
/// Exit status when `--fail-on-anomaly` finds an anomalous image.
const EXIT_ANOMALY: u8 = 2;
/// Exit status when `predict --on-error skip` skipped an image.
const EXIT_SKIPPED: u8 = 3;
/// Exit status after Ctrl-C.
const EXIT_INTERRUPTED: u8 = 130;

fn main() {
    patchcore::util::runtime::record_start_up();
    let status = command_status();
    // Every file is complete by now: skip libtorch's exit-time teardown (runtime::exit_now).
    patchcore::util::runtime::exit_now(status)
}

/// Parses the command line and runs the command; the process's exit status.
fn command_status() -> u8 {
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
            return if e.use_stderr() { EXIT_FAILURE } else { 0 };
        }
    };
    log::set_json(cli.json_logs);
    patchcore::util::interrupt::install();
    match run(cli) {
        Ok(Outcome::Done) => 0,
        Ok(Outcome::Anomalous) => EXIT_ANOMALY,
        Ok(Outcome::Skipped) => EXIT_SKIPPED,
        Err(e) => {
            let msg = format!("{e:#}");
            log::error(msg.lines().next().unwrap_or(&msg));
            if patchcore::util::interrupt::requested() {
                EXIT_INTERRUPTED
            } else {
                EXIT_FAILURE
            }
        }
    }
}

fn run(parsed: Cli) -> Result<Outcome> {
    match parsed.command {
        Command::Train(a) => cli::train::run(&a),
        Command::Predict(a) => cli::predict::run(&a),
        Command::Calibrate(a) => cli::calibrate::run(&a),
        Command::Merge(a) => cli::merge::run(&a),
        Command::Export(a) => cli::export::run(&a),
        Command::Serve(a) => cli::serve::run(&a),
        Command::Mvtec { command } => match command {
            MvtecCommand::Runall(a) => cli::mvtec::runall(&a),
            MvtecCommand::Summarize(a) => cli::mvtec::summarize(&a),
        },
        Command::MakeSample {
            output,
            size,
            train,
            test,
        } => synthetic::write_sample(&output, size, train, test).map(|()| Outcome::Done),
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    /// clap's own consistency checks over every command.
    #[test]
    fn command_line_is_consistent() {
        super::Cli::command().debug_assert();
    }

    /// Every command's options read into their types: two options of one command sharing a
    /// name (flattened from different groups) pass `debug_assert` and fail only here, or when
    /// that command runs.
    #[test]
    fn every_command_parses() {
        let commands: [&[&str]; 10] = [
            &["train", "-i", "a", "-o", "m.faiss"],
            &[
                "train",
                "-i",
                "a",
                "--backbone",
                "resnet18:layer2,layer3",
                "--backbone",
                "densenet121",
                "--target-dim",
                "384",
            ],
            &[
                "mvtec",
                "runall",
                "--data",
                "d",
                "--preset",
                "official-ensemble",
            ],
            &["predict", "-i", "a", "-o", "out", "--index", "m.faiss"],
            &["calibrate", "-i", "a", "--index", "m.faiss"],
            &["serve", "--index", "m.faiss"],
            &["merge", "-o", "m.faiss", "p.faiss"],
            &["export", "--index", "m.faiss", "-o", "dir", "-q"],
            &["train", "-i", "a", "--self-contained"],
            &["mvtec", "runall", "--data", "d", "--category", "c"],
        ];
        for args in commands {
            let argv = std::iter::once("patchcore").chain(args.iter().copied());
            if let Err(e) = super::Cli::try_parse_from(argv) {
                panic!("{args:?}: {e}");
            }
        }
    }

    /// `--preset official-ensemble` reads into the official IM320 ensemble's configuration
    /// (sample_training.sh), and refuses the options it sets.
    #[test]
    fn official_ensemble_preset() {
        let argv = [
            "patchcore",
            "mvtec",
            "runall",
            "--data",
            "d",
            "--preset",
            "official-ensemble",
        ];
        let cli = super::Cli::try_parse_from(argv).unwrap();
        let super::Command::Mvtec {
            command: super::MvtecCommand::Runall(args),
        } = cli.command
        else {
            panic!("not runall");
        };
        let o = args.options(tch::Device::Cpu).unwrap();
        assert!(o.ensemble);
        let got: Vec<(String, Vec<String>)> = o
            .backbones
            .iter()
            .map(|(t, _)| {
                let layers = t.layers.iter().map(|&l| t.arch.layer_name(l)).collect();
                (t.arch.name().to_string(), layers)
            })
            .collect();
        let want = [
            ("wide_resnet101_2", ["layer2", "layer3"]),
            ("resnext101_32x8d", ["layer2", "layer3"]),
            (
                "densenet201",
                ["features.denseblock2", "features.denseblock3"],
            ),
        ];
        assert_eq!(got.len(), 3);
        for ((name, layers), (wn, wl)) in got.iter().zip(want) {
            assert_eq!(
                (name.as_str(), layers.as_slice()),
                (wn, &wl.map(String::from)[..])
            );
        }
        for (t, weights) in &o.backbones {
            assert_eq!(t.preprocess.resize, 366);
            assert_eq!(t.preprocess.crop, Some(320));
            assert_eq!(t.sampling_ratio, 0.01);
            assert_eq!((t.dims.pretrain, t.dims.target), (1024, 384));
            assert_eq!((t.n_neighbors, t.seed), (1, 40));
            assert_eq!(t.calibration_ratio, 0.0);
            assert_eq!(weights, "imagenet");
        }
        for clash in [
            ["--seed", "3"],
            ["--backbone", "resnet18"],
            ["--crop", "224"],
        ] {
            let argv = argv.iter().copied().chain(clash);
            assert!(super::Cli::try_parse_from(argv).is_err(), "{clash:?}");
        }
    }
}
