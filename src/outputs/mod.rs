//! What a run writes: `files` (.npy, overlays, masks, results files), `regions` (connected
//! defect regions), `plots` (SVG figures) and `report` (the self-contained HTML page).

pub mod files;
pub mod plots;
pub mod regions;
pub mod report;
