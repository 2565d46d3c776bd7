//! The commands, each driving the stages below it: `train`, `predict`, `calibrate` (new
//! thresholds for a trained model), `merge` (partial models of sharded training into one),
//! `export` (a self-contained model folder) and `mvtec` (train + evaluation over a dataset).

pub(crate) mod calibrate;
pub(crate) mod export;
pub(crate) mod merge;
pub mod mvtec;
pub(crate) mod predict;
pub mod train;
