//! Below every stage, usable by any: `fsutil` (atomic writes, checksums), `records` (types
//! the model records: precision, weights' identity, calibration), `runtime` (CUDA loaded on
//! demand, start-up time), `log`, `progress`, `interrupt` (Ctrl-C at safe points), `version`
//! and `synthetic` (the images of data/sample and of the tests).

pub mod fsutil;
pub mod interrupt;
pub mod log;
pub(crate) mod progress;
pub mod records;
pub mod runtime;
pub mod synthetic;
pub mod version;
