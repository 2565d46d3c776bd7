//! PatchCore industrial anomaly detection (Roth et al., CVPR 2022), numerically faithful to the
//! official implementation.
//!
//! To use it from Rust, start at [`api`]: load a model, score images in memory, train.
//!
//! The rest serves the `patchcore` binary, one folder per stage, data flowing one way:
//! - `features`: images -> backbone -> patch features (`images`, `weights`, `backbone`,
//!   `probe`, `patch`, `extractor`);
//! - `training`: the memory bank from the features (`feature_store`, `coreset`, `shard`) and
//!   the thresholds (`calibration`);
//! - `model`: a trained model and its scoring (`bank`, `knn`, `scoring`, `single`,
//!   `ensemble`, `verdict`; `model::Model` is the one type for single and ensemble models);
//! - `outputs`: what runs write (`files`, `regions`, `plots`, `report`);
//! - `commands`: train, predict, calibrate, merge, export, mvtec, each driving the stages
//!   above; `serve` a model over HTTP; `cli` turns the command line into each command's
//!   options (`main.rs` dispatches);
//! - `util`, below every stage: atomic files and checksums, the types the model records,
//!   logging, progress, Ctrl-C, runtime, version, synthetic images.

pub mod api;
pub mod cli;
pub mod commands;
pub mod features;
pub mod model;
pub mod outputs;
pub mod serve;
pub mod training;
pub mod util;
