//! Sharded training: which part of the training images one `train --shard I/N` run takes,
//! and what it leaves for `merge`.
//!
//! The held-out calibration images are chosen from the whole input first
//! (`train::split_calibration`), so they are the same whatever N; the remaining images, in
//! folder order, are cut into N contiguous runs of near-equal length. Each shard writes a
//! partial model (`bank::PARTIAL_FORMAT`) that `merge` combines: an index with the full
//! features of its *candidates* (by default every patch; with `--shard-oversample F` only its
//! own greedy coreset of F times the training ratio), and [`ShardPatches`]: the coreset
//! projection of every patch, with the candidate nearest to it.
//!
//! With every patch's projection, `merge` runs the unsharded training's own greedy selection
//! (the same points, seed and order) and stands in for a selected patch that is not a
//! candidate with its nearest candidate. By default all patches are candidates and the merged
//! model is byte for byte the unsharded one. Why not the composable greedy over the union of
//! the shards' coresets alone: on MVTec screw it lost 0.8 to 1.1 points of pixel AUROC at 4 to
//! 2 times over-sampling, ten times the spread between coreset seeds
//! (`experiments/sharded-training.md`); a patch's projection costs 512 bytes beside its 4 KiB
//! of features.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use faiss::{FlatIndex, Index};
use ndarray::{Array1, Array2, ArrayView2, Axis};

use crate::util::fsutil::{self, AtomicFile};

/// What `merge` needs of every patch of a shard besides the candidates' full features (in
/// the partial model's index). Written beside the index as `NAME.patches.npz`.
pub struct ShardPatches {
    /// The coreset projection of each patch, `[patches, 128]`, in folder order (`[patches,
    /// 0]` at `--sampling-ratio 1`, where nothing is selected).
    pub projected: Array2<f32>,
    /// Bank row of each patch's nearest candidate in the projection; a candidate's own row.
    pub nearest: Array1<u32>,
    /// The patch each bank row holds.
    pub kept: Array1<u32>,
}

/// Query rows per FAISS search in `ShardPatches::new`: bounds the copies to 32 MiB.
const SEARCH_ROWS: usize = 1 << 16;

impl ShardPatches {
    /// The patches `projected` of a shard whose bank keeps `picked` (bank row `j` is patch
    /// `picked[j]`): every other patch gets the candidate nearest to it (exact L2 search).
    pub fn new(projected: Array2<f32>, picked: &[usize]) -> Result<Self> {
        let n = projected.nrows();
        let mut nearest = vec![u32::MAX; n];
        for (row, &patch) in picked.iter().enumerate() {
            nearest[patch] = row as u32;
        }
        let others: Vec<usize> = (0..n).filter(|&i| nearest[i] == u32::MAX).collect();
        if !others.is_empty() {
            if projected.ncols() == 0 || picked.is_empty() {
                bail!("a shard that keeps only some of its patches needs their projections");
            }
            let mut index = FlatIndex::new_l2(projected.ncols() as u32)?;
            let candidates = projected.select(Axis(0), picked);
            index.add(candidates.as_slice().expect("standard layout"))?;
            for chunk in others.chunks(SEARCH_ROWS) {
                let queries = projected.select(Axis(0), chunk);
                let found = index.search(queries.as_slice().expect("standard layout"), 1)?;
                for (&patch, label) in chunk.iter().zip(found.labels) {
                    nearest[patch] = label
                        .get()
                        .ok_or_else(|| anyhow!("no nearest candidate found for patch {patch}"))?
                        as u32;
                }
            }
        }
        Ok(ShardPatches {
            projected,
            nearest: Array1::from(nearest),
            kept: picked.iter().map(|&p| p as u32).collect(),
        })
    }

    /// Where the patches of the partial model `index` are.
    pub fn path(index: &Path) -> PathBuf {
        let mut s = index.as_os_str().to_owned();
        s.push(".patches.npz");
        PathBuf::from(s)
    }

    /// Writes them beside `index` (atomically, durably); returns the file's BLAKE3 for the
    /// sidecar.
    pub fn write(&self, index: &Path) -> Result<String> {
        let path = Self::path(index);
        let mut file = AtomicFile::create(&path)?;
        let cannot = |e: &dyn std::fmt::Display| anyhow!("cannot write {}: {e}", path.display());
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .large_file(true);
        let mut npz = ndarray_npy::NpzWriter::new_with_options(&mut file, options);
        npz.add_array("projected", &self.projected)
            .map_err(|e| cannot(&e))?;
        npz.add_array("nearest", &self.nearest)
            .map_err(|e| cannot(&e))?;
        npz.add_array("kept", &self.kept).map_err(|e| cannot(&e))?;
        npz.finish().map_err(|e| cannot(&e))?;
        file.sync()?;
        let blake3 = fsutil::blake3_file(file.temp_path())?;
        file.commit()?;
        Ok(blake3)
    }

    /// Reads the patches of the partial model `index`, checked against its sidecar: the
    /// file's BLAKE3, `patches` rows and candidates within its `bank_size`.
    pub fn read(index: &Path, blake3: &str, patches: usize, bank_size: usize) -> Result<Self> {
        let path = Self::path(index);
        let damaged = |why: &dyn std::fmt::Display| {
            anyhow!(
                "{} cannot be read or does not belong to {} ({why}): train the shard again",
                path.display(),
                index.display()
            )
        };
        // One read-only mapping for the checksum and the arrays: the file is read once.
        let file = std::fs::File::open(&path).map_err(|e| damaged(&e))?;
        // SAFETY: read-only; partial models are replaced by renaming, never rewritten in place.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| damaged(&e))?;
        if fsutil::blake3_bytes(&map) != blake3 {
            return Err(damaged(&"its checksum is not the one its sidecar records"));
        }
        let mut npz =
            ndarray_npy::NpzReader::new(std::io::Cursor::new(&map[..])).map_err(|e| damaged(&e))?;
        let projected: Array2<f32> = npz.by_name("projected").map_err(|e| damaged(&e))?;
        let nearest: Array1<u32> = npz.by_name("nearest").map_err(|e| damaged(&e))?;
        let kept: Array1<u32> = npz.by_name("kept").map_err(|e| damaged(&e))?;
        if projected.nrows() != patches || nearest.len() != patches {
            return Err(damaged(&format!(
                "{} projections and {} nearest candidates for {patches} patches",
                projected.nrows(),
                nearest.len()
            )));
        }
        if nearest.iter().any(|&row| row as usize >= bank_size) {
            return Err(damaged(&format!(
                "a nearest candidate beyond the bank's {bank_size} rows"
            )));
        }
        let stands_for_itself = |(row, &patch): (usize, &u32)| {
            nearest
                .get(patch as usize)
                .is_some_and(|&r| r as usize == row)
        };
        if kept.len() != bank_size || !kept.iter().enumerate().all(stands_for_itself) {
            return Err(damaged(&format!(
                "its {} kept patches do not match the bank's {bank_size} rows",
                kept.len()
            )));
        }
        Ok(ShardPatches {
            projected,
            nearest,
            kept,
        })
    }

    /// The patches of a complete model's bank (`merge --base`): every one its own candidate.
    pub fn of_bank(bank: ArrayView2<f32>, seed: u64, project: bool) -> Self {
        let projected = if project {
            crate::training::coreset::project(bank, seed)
        } else {
            Array2::zeros((bank.nrows(), 0))
        };
        ShardPatches {
            projected,
            nearest: (0..bank.nrows() as u32).collect(),
            kept: (0..bank.nrows() as u32).collect(),
        }
    }
}

/// Shard `index` of `count` (`I/N` on the command line); `0/1` is a partial model of a whole
/// folder (`train --partial`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// Parses `I/N` with `I` in `0..N`.
    pub fn parse(s: &str) -> Result<Shard> {
        let parsed = s
            .split_once('/')
            .and_then(|(i, n)| Some((i.trim().parse().ok()?, n.trim().parse().ok()?)));
        match parsed {
            Some((index, count)) if index < count => Ok(Shard { index, count }),
            _ => bail!("--shard must be I/N with 0 <= I < N (e.g. 0/4), got {s:?}"),
        }
    }

    /// This shard's run of `items`: the `index`-th of `count` contiguous runs whose lengths
    /// differ by at most one.
    pub fn select<T>(&self, items: Vec<T>) -> Vec<T> {
        let n = items.len();
        let (start, end) = (
            self.index * n / self.count,
            (self.index + 1) * n / self.count,
        );
        items.into_iter().skip(start).take(end - start).collect()
    }

    /// The share of its patches whose full features a shard keeps, for the training ratio
    /// `ratio`: all by default, `oversample` times `ratio` when given.
    pub fn kept_ratio(ratio: f64, oversample: Option<f64>) -> f64 {
        oversample.map_or(1.0, |f| (ratio * f).min(1.0))
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_every_item_once_in_order() {
        for n in [0usize, 1, 5, 10, 13] {
            for count in 1..=6 {
                let all: Vec<usize> = (0..count)
                    .flat_map(|index| Shard { index, count }.select((0..n).collect()))
                    .collect();
                assert_eq!(all, (0..n).collect::<Vec<_>>(), "n {n}, count {count}");
            }
        }
    }

    #[test]
    fn patches_stand_in_for_their_nearest_candidate_and_read_back_checked() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let projected = Array2::from_shape_fn((300, 8), |_| rng.gen::<f32>());
        let picked = crate::training::coreset::greedy_select(projected.view(), 30, 0);
        let patches = ShardPatches::new(projected.clone(), &picked).unwrap();
        for (row, &patch) in picked.iter().enumerate() {
            assert_eq!(
                patches.nearest[patch], row as u32,
                "a candidate stands for itself"
            );
        }
        let d = |i: usize, c: usize| {
            crate::training::coreset::squared_distance(
                projected.row(i).as_slice().unwrap(),
                projected.row(picked[c]).as_slice().unwrap(),
            )
        };
        for i in 0..300 {
            let best = (0..30).map(|c| d(i, c)).fold(f32::INFINITY, f32::min);
            assert!(
                d(i, patches.nearest[i] as usize) <= best * (1.0 + 1e-4) + 1e-6,
                "patch {i}"
            );
        }

        let dir = tempfile::tempdir().unwrap();
        let index = dir.path().join("part.faiss");
        let blake3 = patches.write(&index).unwrap();
        let back = ShardPatches::read(&index, &blake3, 300, 30).unwrap();
        assert_eq!(back.projected, patches.projected);
        assert_eq!(back.nearest, patches.nearest);
        assert_eq!(
            back.kept.to_vec(),
            picked.iter().map(|&p| p as u32).collect::<Vec<_>>()
        );
        let e = ShardPatches::read(&index, "00", 300, 30).err().unwrap();
        assert!(e.to_string().contains("part.faiss.patches.npz"), "{e}");
        let e = ShardPatches::read(&index, &blake3, 299, 30).err().unwrap();
        assert!(e.to_string().contains("for 299 patches"), "{e}");
        let e = ShardPatches::read(&index, &blake3, 300, 20).err().unwrap();
        assert!(e.to_string().contains("beyond the bank"), "{e}");
    }

    #[test]
    fn parse_refuses_out_of_range() {
        assert_eq!(Shard::parse("1/4").unwrap(), Shard { index: 1, count: 4 });
        for bad in ["4/4", "1", "a/2", "0/0", "-1/3"] {
            assert!(Shard::parse(bad).is_err(), "{bad}");
        }
    }
}
