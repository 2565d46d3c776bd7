//! The training set's patch features while the memory bank is chosen, within a memory budget.
//!
//! The coreset needs every patch's 128-d projection, which stays in RAM (512 bytes a patch,
//! and as much again while the greedy search runs: it keeps a copy ordered by group).
//! The 1024-d features (4 KiB a patch) are needed only for the selected patches: they stay in
//! RAM only while they are few (`RAM_FEATURES`) and the budget allows; beyond, they go to a
//! temporary file beside the model (`tempfile`: removed when the store is dropped, on error
//! too), from which only the selected rows are read back. So training holds the projections,
//! not 8 times as much, and pays one sequential write of the features instead. Either way the projections are computed
//! batch by batch with the same arithmetic, so the selection does not depend on the budget.

use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ndarray::{Array2, ArrayView2};
use tempfile::NamedTempFile;

/// Rows per in-RAM block (64 MiB of 1024-d features).
const BLOCK_ROWS: usize = 16_384;

/// Features kept in RAM at most (64 MiB: 16 k patches, a few dozen images); a larger
/// training set's go to disk.
pub const RAM_FEATURES: u64 = 64 << 20;

/// Test-only hook (tests/e2e.rs), unset in normal use: bytes of features kept in RAM at most,
/// instead of [`RAM_FEATURES`], so that a small training set spills to disk within its
/// budget, as one of tens of thousands of patches does: the only way features spill at
/// `--sampling-ratio 1` (over the budget, a bank of every patch cannot be held either).
/// train says when the features spilled under it.
pub const RAM_FEATURES_ENV: &str = "PATCHCORE_TEST_RAM_FEATURES";

/// Test-only hook (tests/e2e.rs), unset in normal use: bytes reserved out of the budget for
/// everything but the features, instead of what train measured (`FeatureStore::with_reserve`:
/// the runtime and a batch's activations), so that a test can place its budget just above the
/// reserve whatever the process's resident size.
pub const RESERVE_ENV: &str = "PATCHCORE_TEST_RESERVE";

/// Parses a size like `4G`, `4GiB`, `512M`, `1.5g` or a plain byte count.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.trim_end_matches("ib").trim_end_matches('b');
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        Some('t') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    match num.trim().parse::<f64>() {
        Ok(v) if v > 0.0 => Ok((v * mult as f64) as u64),
        _ => bail!("cannot read '{s}' as a memory size (examples: 4G, 512M)"),
    }
}

/// The default budget: 80% of the memory the kernel reports as available.
pub fn default_budget() -> u64 {
    let available = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(8 << 30);
    available / 5 * 4
}

pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

pub struct FeatureStore {
    dim: usize,
    rows: usize,
    budget: u64,
    /// Bytes of the budget kept for everything but the features and projections while they
    /// are extracted (the runtime and a batch's activations) ...
    reserve: u64,
    /// ... and while the coreset holds the projections twice (the runtime).
    runtime: u64,
    /// Features kept in RAM at most (`RAM_FEATURES`; changed in tests).
    ram_cap: u64,
    /// Whether the features went to disk because of the budget (not just `ram_cap`).
    over_budget: bool,
    projection: Option<Array2<f32>>,
    projected: Vec<f32>,
    /// In-RAM rows, in fixed-size blocks so growing never copies (or doubles) them.
    ram: Vec<Vec<f32>>,
    ram_floats: usize,
    block_rows: usize,
    /// The features on disk once they outgrew the budget.
    spill: Option<BufWriter<NamedTempFile>>,
    /// The spill file goes beside this path, named after it.
    spill_beside: PathBuf,
}

impl FeatureStore {
    /// `projection` (`[dim, 128]`) is applied to every row pushed; `None` keeps no projection
    /// (when every patch is kept). Features that outgrow `budget` go to a temporary file
    /// beside `spill_beside` (in its folder, named `.NAME.tmp-PID-XXXXXX`).
    pub fn new(
        dim: usize,
        budget: u64,
        projection: Option<Array2<f32>>,
        spill_beside: &Path,
    ) -> Self {
        FeatureStore {
            dim,
            rows: 0,
            budget,
            reserve: 0,
            runtime: 0,
            ram_cap: std::env::var(RAM_FEATURES_ENV)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(RAM_FEATURES),
            over_budget: false,
            projection,
            projected: Vec::new(),
            ram: Vec::new(),
            ram_floats: 0,
            block_rows: BLOCK_ROWS,
            spill: None,
            spill_beside: spill_beside.to_path_buf(),
        }
    }

    /// Keeps `bytes` of the budget for everything but the features and their projections
    /// (the runtime and a batch's activations, measured by train), or what [`RESERVE_ENV`]
    /// says.
    /// `runtime` of it stays resident while the coreset runs.
    pub fn with_reserve(mut self, bytes: u64, runtime: u64) -> Self {
        let fixed: Option<u64> = std::env::var(RESERVE_ENV).ok().and_then(|v| v.parse().ok());
        self.reserve = fixed.unwrap_or(bytes);
        self.runtime = fixed.unwrap_or(runtime);
        self
    }

    pub fn len(&self) -> usize {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Makes room for the projections of `rows` rows at once, so that growing them does not
    /// briefly need twice their size.
    pub fn reserve(&mut self, rows: usize) {
        if let Some(w) = &self.projection {
            let want = rows * w.ncols();
            self.projected
                .reserve_exact(want.saturating_sub(self.projected.len()));
        }
    }

    /// Whether the features went to disk.
    pub fn spilled(&self) -> bool {
        self.spill.is_some()
    }

    /// Whether they went to disk because they exceed the memory budget.
    pub fn over_budget(&self) -> bool {
        self.over_budget
    }

    /// Appends rows (`[n, dim]`).
    pub fn push(&mut self, rows: ArrayView2<f32>) -> Result<()> {
        if let Some(w) = &self.projection {
            let p = rows.dot(w);
            self.projected
                .extend_from_slice(p.as_standard_layout().as_slice().expect("standard layout"));
        }
        let rows = rows.as_standard_layout();
        let data = rows.as_slice().expect("standard layout");
        self.rows += rows.nrows();
        // The greedy search keeps a second copy of the projections, ordered by group
        // (coreset.rs), so each counts twice then, beside the runtime; now, beside a batch.
        let once = 4 * self.projected.len() as u64;
        let projected_bytes = 2 * once;
        let need = (once + self.reserve).max(projected_bytes + self.runtime);
        if need > self.budget {
            // Train refuses up front what the first image's size predicts; this is for
            // images larger than it.
            bail!(
                "the training set is too large for --max-memory {}: after {} patches, their \
                 projections and the coreset's copy of them need {} beside {} of runtime: \
                 it needs at least --max-memory {}, or fewer images",
                crate::training::memory::flag_size(self.budget),
                crate::training::memory::count(self.rows),
                crate::training::memory::human(projected_bytes),
                crate::training::memory::human(self.runtime),
                crate::training::memory::flag_size(need)
            );
        }
        if self.spill.is_none() {
            let ram_bytes = 4 * (self.ram_floats + data.len()) as u64;
            let in_budget = ram_bytes + need <= self.budget;
            if in_budget && ram_bytes <= self.ram_cap {
                for part in data.chunks(self.block_rows * self.dim) {
                    let block_floats = self.block_rows * self.dim;
                    if self.ram.last().is_none_or(|b| b.len() == block_floats) {
                        self.ram.push(Vec::with_capacity(block_floats));
                    }
                    let last = self.ram.last_mut().expect("a block");
                    let room = block_floats - last.len();
                    let (now, later) = part.split_at(room.min(part.len()));
                    last.extend_from_slice(now);
                    if !later.is_empty() {
                        let mut block = Vec::with_capacity(block_floats);
                        block.extend_from_slice(later);
                        self.ram.push(block);
                    }
                }
                self.ram_floats += data.len();
                return Ok(());
            }
            self.over_budget = !in_budget;
            let mut spill = BufWriter::with_capacity(1 << 22, self.spill_file()?);
            for block in std::mem::take(&mut self.ram) {
                write_f32(&mut spill, &block)?;
            }
            self.ram_floats = 0;
            self.spill = Some(spill);
        }
        write_f32(self.spill.as_mut().expect("spilling"), data)
    }

    /// A new temporary file beside `spill_beside`, named as fsutil names ours
    /// (`.NAME.tmp-PID-XXXXXX`), so that a killed run's file is removed by the next run.
    fn spill_file(&self) -> Result<NamedTempFile> {
        let dir = crate::util::fsutil::folder(&self.spill_beside);
        tempfile::Builder::new()
            .prefix(&crate::util::fsutil::own_temp_prefix(&self.spill_beside))
            .rand_bytes(6)
            .tempfile_in(dir)
            .with_context(|| format!("cannot write temporary features in {}", dir.display()))
    }

    /// The 128-d projections of all rows pushed (`[len, 128]`).
    pub fn projected(&self) -> ArrayView2<'_, f32> {
        let cols = self.projection.as_ref().map_or(0, |w| w.ncols());
        ArrayView2::from_shape((self.rows, cols), &self.projected).expect("rows x cols")
    }

    /// The projections, moved out of the store (which keeps the features for `gather`), so
    /// the coreset can free them once it holds its own copy.
    pub fn take_projected(&mut self) -> Array2<f32> {
        let cols = self.projection.as_ref().map_or(0, |w| w.ncols());
        Array2::from_shape_vec((self.rows, cols), std::mem::take(&mut self.projected))
            .expect("rows x cols")
    }

    /// The selected rows, in the order given.
    pub fn gather(&mut self, indices: &[usize]) -> Result<Array2<f32>> {
        let d = self.dim;
        let mut out = Array2::<f32>::zeros((indices.len(), d));
        match &mut self.spill {
            None => {
                for (k, &i) in indices.iter().enumerate() {
                    let (block, at) = (i / self.block_rows, (i % self.block_rows) * d);
                    out.row_mut(k)
                        .as_slice_mut()
                        .expect("standard layout")
                        .copy_from_slice(&self.ram[block][at..at + d]);
                }
            }
            Some(spill) => {
                spill.flush().with_context(|| {
                    format!(
                        "cannot write temporary features {}",
                        spill.get_ref().path().display()
                    )
                })?;
                let (file, path) = (spill.get_ref().as_file(), spill.get_ref().path());
                // Read in file order for sequential I/O, then place each row where it belongs.
                let mut order: Vec<(usize, usize)> =
                    indices.iter().enumerate().map(|(k, &i)| (i, k)).collect();
                order.sort_unstable();
                let mut bytes = vec![0u8; 4 * d];
                for (i, k) in order {
                    file.read_exact_at(&mut bytes, (i * d * 4) as u64)
                        .with_context(|| {
                            format!("cannot read temporary features {}", path.display())
                        })?;
                    for (v, b) in out
                        .row_mut(k)
                        .as_slice_mut()
                        .expect("standard layout")
                        .iter_mut()
                        .zip(bytes.chunks_exact(4))
                    {
                        *v = f32::from_le_bytes(b.try_into().expect("4 bytes"));
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Writes floats little-endian to the spill file, a block at a time (no copy of the whole
/// slice).
fn write_f32(w: &mut BufWriter<NamedTempFile>, data: &[f32]) -> Result<()> {
    let mut bytes = Vec::with_capacity(4 << 16);
    for block in data.chunks(1 << 16) {
        bytes.clear();
        for v in block {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        w.write_all(&bytes).with_context(|| {
            format!(
                "cannot write temporary features {}",
                w.get_ref().path().display()
            )
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4G").unwrap(), 4 << 30);
        assert_eq!(parse_size("4GiB").unwrap(), 4 << 30);
        assert_eq!(parse_size("512m").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("-1G").is_err());
    }

    #[test]
    fn spilled_and_in_ram_stores_agree() {
        let dir = tempfile::tempdir().unwrap();
        let x = Array2::from_shape_fn((50, 8), |(i, j)| (i * 8 + j) as f32 * 0.5);
        let w = Array2::from_shape_fn((8, 3), |(i, j)| (i + j) as f32);
        let mut ram = FeatureStore::new(8, u64::MAX / 2, Some(w.clone()), &dir.path().join("a"));
        ram.block_rows = 7; // pushes of 10 rows straddle blocks
                            // A budget just over the reserve: spills after the first batch.
        let reserve = 3 << 29;
        let mut disk = FeatureStore::new(
            8,
            reserve + 2 * 4 * 50 * 3 + 4 * 8 * 10,
            Some(w.clone()),
            &dir.path().join("b"),
        )
        .with_reserve(reserve, reserve);
        // Within the budget, but more features than it keeps in RAM.
        let capped_dir = tempfile::tempdir().unwrap();
        let mut capped = FeatureStore::new(
            8,
            u64::MAX / 2,
            Some(w.clone()),
            &capped_dir.path().join("c"),
        );
        capped.ram_cap = 4 * 8 * 10;
        for chunk in x.axis_chunks_iter(ndarray::Axis(0), 10) {
            ram.push(chunk).unwrap();
            disk.push(chunk).unwrap();
            capped.push(chunk).unwrap();
        }
        assert!(!ram.spilled());
        assert!(disk.spilled() && disk.over_budget());
        assert!(capped.spilled() && !capped.over_budget());
        assert_eq!(ram.projected(), disk.projected());
        assert_eq!(ram.projected(), capped.projected());
        let pick = [42, 3, 17, 3];
        assert_eq!(ram.gather(&pick).unwrap(), disk.gather(&pick).unwrap());
        assert_eq!(ram.gather(&pick).unwrap(), capped.gather(&pick).unwrap());
        assert_eq!(ram.gather(&pick).unwrap().row(0), x.row(42));
        let files = || -> Vec<String> {
            std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        };
        let spilled = files();
        assert!(
            spilled.len() == 1
                && spilled[0].starts_with(&format!(".b.tmp-{}-", std::process::id())),
            "{spilled:?}"
        );
        drop(disk);
        assert!(files().is_empty(), "temporary file removed");
    }
}
