//! Sharded training: which part of the training images one `train --shard I/N` run takes.
//!
//! The held-out calibration images are chosen from the whole input first
//! (`train::split_calibration`), so they are the same whatever N; the remaining images, in
//! folder order, are cut into N contiguous runs of near-equal length. Each shard writes a
//! partial model (`bank::PARTIAL_FORMAT`) that `merge` combines.

use anyhow::{bail, Result};

/// Default over-sampling of a shard's coreset: a shard keeps this many times the training
/// ratio of its patches, so the final greedy selection over the union has twice as many
/// candidates as it keeps and can drop the points that two shards both chose to cover the
/// same kind of patch (the two-round greedy of composable k-center coresets). With 1 the
/// union is exactly the final size and the merge has nothing to choose.
pub const DEFAULT_OVERSAMPLE: f64 = 2.0;

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

    /// The share of its patches a shard keeps for the training ratio `ratio`.
    pub fn kept_ratio(ratio: f64, oversample: f64) -> f64 {
        (ratio * oversample).min(1.0)
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
    fn parse_refuses_out_of_range() {
        assert_eq!(Shard::parse("1/4").unwrap(), Shard { index: 1, count: 4 });
        for bad in ["4/4", "1", "a/2", "0/0", "-1/3"] {
            assert!(Shard::parse(bad).is_err(), "{bad}");
        }
    }
}
