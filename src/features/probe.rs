//! The official code's BatchNorm probe (`Backbone::batchnorm_probe`), run once per weights and
//! then read from the cache.
//!
//! The probe's outcome, every BatchNorm's running statistics, depends only on the weights,
//! the backbone, the deepest extracted layer, the probe side, the device kind, libtorch and
//! (in its last bits) the thread count, yet running it costs about 0.3 s of a one-image
//! predict call (a WideResNet-50 forward at batch statistics). So the statistics it leaves (a
//! few hundred KB) are saved under `CACHE/probe/KEY.pt`, KEY being a SHA-256 of all of the
//! above, and later starts load them instead: bit for bit what the probe computed. An entry
//! that cannot be read or does not fit the network is recomputed (and rewritten); a cache that
//! cannot be written only costs the time.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use sha2::{Digest, Sha256};
use tch::{nn::VarStore, Device, Tensor};

use crate::features::backbone::{Arch, Backbone};
use crate::util::fsutil::{hex, AtomicFile};
use crate::util::records::WeightsInfo;

/// Bump when what an entry holds or how its key is made changes.
const FORMAT: u32 = 2;

/// What the probe's outcome depends on.
pub struct ProbeKey<'a> {
    pub arch: Arch,
    pub layers: &'a [usize],
    pub side: u32,
    pub device: Device,
    pub weights: &'a WeightsInfo,
}

impl ProbeKey<'_> {
    /// The entry's file in the cache folder `cache`.
    fn file(&self, cache: &Path) -> PathBuf {
        let deepest = self.layers.iter().max().copied().unwrap_or(0);
        let device = if self.device.is_cuda() { "cuda" } else { "cpu" };
        let key = format!(
            "{FORMAT}|{}|{}|{deepest}|{}|{device}|{}|{}",
            self.weights.sha256,
            self.arch.name(),
            self.side,
            crate::util::version::libtorch(),
            // The convolutions' sums are split by thread, so the last bits of the statistics
            // depend on the thread count: an entry holds what a probe with as many threads
            // computes, so that a cached start scores exactly as an uncached one.
            tch::get_num_threads()
        );
        cache
            .join("probe")
            .join(format!("{}.pt", hex(&Sha256::digest(key))))
    }
}

/// Whether a variable is a BatchNorm running statistic (what the probe changes).
fn is_statistic(name: &str) -> bool {
    name.ends_with("running_mean") || name.ends_with("running_var")
}

/// Runs the probe on `net` (whose variables live in `vs`, still float32), or loads its
/// outcome from the cache folder `cache` (`weights::cache_dir()`; None: no cache is read or
/// written, for a self-contained model's weights). Returns whether it came from the cache.
pub fn apply(net: &Backbone, vs: &VarStore, key: &ProbeKey, cache: Option<&Path>) -> bool {
    let Some(cache) = cache else {
        net.batchnorm_probe(key.side as i64, key.device);
        return false;
    };
    let file = key.file(cache);
    if load(vs, &file).is_ok() {
        return true;
    }
    net.batchnorm_probe(key.side as i64, key.device);
    let _ = save(vs, &file);
    false
}

/// The running statistics of `vs`, by name, sorted.
fn statistics(vs: &VarStore) -> Vec<(String, Tensor)> {
    let mut stats: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(name, _)| is_statistic(name))
        .collect();
    stats.sort_by(|a, b| a.0.cmp(&b.0));
    stats
}

/// Copies a cache entry into `vs`'s statistics, or fails (leaving `vs` as it was) when the
/// entry is missing, unreadable or does not name and shape exactly those statistics.
fn load(vs: &VarStore, file: &Path) -> Result<()> {
    let mut saved = Tensor::load_multi(file)?;
    saved.sort_by(|a, b| a.0.cmp(&b.0));
    let current = statistics(vs);
    let fits = saved.len() == current.len()
        && saved
            .iter()
            .zip(&current)
            .all(|((n, s), (m, c))| n == m && s.size() == c.size() && s.kind() == c.kind());
    if !fits {
        return Err(anyhow!("{} does not fit the network", file.display()));
    }
    tch::no_grad(|| {
        for ((_, s), (_, mut c)) in saved.iter().zip(current) {
            c.copy_(&s.to_device(c.device()));
        }
    });
    Ok(())
}

/// Writes `vs`'s statistics to `file`, atomically.
fn save(vs: &VarStore, file: &Path) -> Result<()> {
    std::fs::create_dir_all(crate::util::fsutil::folder(file))?;
    let stats: Vec<(String, Tensor)> = statistics(vs)
        .into_iter()
        .map(|(n, t)| (n, t.to_device(Device::Cpu)))
        .collect();
    let out = AtomicFile::create(file)?;
    Tensor::save_multi(&stats, out.temp_path())?;
    out.commit()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::backbone::Arch;

    fn network(seed: u64) -> (VarStore, Backbone, WeightsInfo) {
        let mut vs = VarStore::new(Device::Cpu);
        let net = Backbone::unfilled(&vs.root(), Arch::Resnet18, &[2, 3]).unwrap();
        let spec = crate::features::weights::WeightsSpec::Random(seed);
        let info = crate::features::weights::load(&mut vs, Arch::Resnet18, &spec, true).unwrap();
        (vs, net, info)
    }

    fn stats(vs: &VarStore) -> Vec<(String, Vec<f32>)> {
        statistics(vs)
            .into_iter()
            .map(|(n, t)| (n, Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()))
            .collect()
    }

    /// The first start computes and saves, the second loads the same bits; a damaged entry
    /// is recomputed; another side is another entry.
    #[test]
    fn cached_statistics_are_the_probed_ones() {
        let cache = tempfile::tempdir().unwrap();
        let cache = cache.path();
        let (vs0, _, _) = network(3);
        let untouched = stats(&vs0);

        let (vs1, net1, info) = network(3);
        let key = |side| ProbeKey {
            arch: Arch::Resnet18,
            layers: &[2, 3],
            side,
            device: Device::Cpu,
            weights: &info,
        };
        assert!(
            !apply(&net1, &vs1, &key(32), Some(cache)),
            "computed the first time"
        );
        let probed = stats(&vs1);
        assert_ne!(probed, untouched, "the probe moved the statistics");
        let file = key(32).file(cache);
        assert!(file.exists());

        let (vs2, net2, _) = network(3);
        assert!(
            apply(&net2, &vs2, &key(32), Some(cache)),
            "loaded the second time"
        );
        assert_eq!(stats(&vs2), probed, "bit for bit");

        std::fs::write(&file, b"damaged").unwrap();
        let (vs3, net3, _) = network(3);
        assert!(
            !apply(&net3, &vs3, &key(32), Some(cache)),
            "a damaged entry is recomputed"
        );
        assert_eq!(stats(&vs3), probed);

        let (vs4, net4, _) = network(3);
        assert!(
            !apply(&net4, &vs4, &key(48), Some(cache)),
            "another side, another entry"
        );
        assert_ne!(stats(&vs4), probed);
    }
}
