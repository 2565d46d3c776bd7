//! PatchCore industrial anomaly detection (Roth et al., CVPR 2022), numerically faithful to the
//! official implementation.
//!
//! Data flows one way through the stages:
//! `images` (files in, network input) -> `backbone` (CNN layers) -> `features` (patch
//! features) -> `coreset` (memory-bank subsampling) -> `bank` (FAISS index + sidecar) ->
//! `knn` (its search) -> `scoring` (patch scores, image score, heatmap, per input and per whole image) ->
//! `calibration` (thresholds) and `regions` (defect areas) -> `outputs` (files) -> `verdict`
//! (what is said of one image: verdict, normalized score, regions, overlay) and `report` (the
//! HTML page). `extractor` runs the first three for a folder (`probe` runs the official
//! BatchNorm probe once per weights); `train`, `predict`, `calibrate` (new thresholds for a
//! trained model), `merge` (partial models of `shard`ed training into one) and `serve` (a model over HTTP) drive whole commands; `weights` supplies the
//! backbone's parameters; `metrics` evaluates scores against labels, and `mvtec` drives
//! train + evaluation over a dataset. `plots` draws the SVG figures of `report`, `train`,
//! `calibrate` and `mvtec`. `ensemble` holds several single-backbone models as one (trained,
//! scored and calibrated through the commands above, one member at a time) and combines
//! their scores. `export` writes a model (or ensemble) as a self-contained folder with its
//! backbone weights file. `log` writes messages, `version` names the libraries. `cli`, above
//! every command, turns the command line's options into each command's options and runs it
//! (`main.rs` dispatches).
//! Below all stages, usable by any: `fsutil` (atomic writes, checksums), `config` (types
//! the model records, such as the precision, the weights' identity and the calibration) and
//! `runtime` (CUDA loaded on demand, the process's start-up time).

pub mod backbone;
pub mod bank;
pub mod calibrate;
pub mod calibration;
pub mod cli;
pub mod config;
pub mod coreset;
pub mod ensemble;
pub mod export;
pub mod extractor;
pub mod feature_store;
pub mod features;
pub mod fsutil;
pub mod images;
pub mod interrupt;
pub mod knn;
pub mod log;
pub mod memory;
pub mod merge;
pub mod metrics;
pub mod model;
pub mod mvtec;
pub mod outputs;
pub mod plots;
pub mod predict;
pub mod probe;
pub mod progress;
pub mod regions;
pub mod report;
pub mod runtime;
pub mod scoring;
pub mod serve;
pub mod shard;
pub mod synthetic;
pub mod train;
pub mod verdict;
pub mod version;
pub mod weights;
