//! What training needs beyond the features: `feature_store` (training features within the
//! memory budget), `coreset` (the greedy memory-bank subsampling), `shard` (sharded training's
//! share of the images and its patches for the merge) and `calibration` (thresholds from
//! good images, also used by `calibrate`); `memory` plans `--max-memory` from the measured
//! runtime and each stage's arrays, and refuses up front what cannot fit.

pub mod calibration;
pub mod coreset;
pub mod feature_store;
pub mod memory;
pub(crate) mod shard;
