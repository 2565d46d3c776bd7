//! Loading weights into a freshly built backbone by tensor name: safetensors (read by
//! libtorch), PyTorch `torch.save` files (`pth`), seeded random initialization.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use anyhow::{anyhow, bail, Result};
use sha2::{Digest, Sha256};
use tch::{nn::VarStore, Kind, Tensor};

use super::cache::{cached_path, checksum, fetch, Expected, Unreachable};
use super::sources::{known_names, resolve, SOURCES};
use super::WeightsSpec;
use super::{check_file, pth};
use crate::features::backbone::Arch;
use crate::util::fsutil::hex;
use crate::util::records::WeightsInfo;

/// Fills every variable of `vs` (a freshly built backbone) according to `spec`.
pub fn load(vs: &mut VarStore, arch: Arch, spec: &WeightsSpec, quiet: bool) -> Result<WeightsInfo> {
    match spec {
        WeightsSpec::Random(seed) => {
            init_random(vs, *seed);
            Ok(WeightsInfo {
                spec: format!("random:{seed}"),
                source: format!("random:{seed}"),
                sha256: hex(&Sha256::digest(format!("random:{seed}:{}", arch.name()))),
            })
        }
        WeightsSpec::File(path) => {
            if !path.exists() && looks_like_a_name(path) {
                bail!(
                    "--weights {}: no such file, nor a known source (known: {}, each also as \
                     NAME:pth; random:SEED; or an http(s) URL)",
                    path.display(),
                    known_names().join(", ")
                );
            }
            let sha256 = checksum(path)?;
            load_file(vs, path)?;
            let absolute = path.canonicalize().unwrap_or_else(|_| path.clone());
            Ok(WeightsInfo {
                spec: absolute.display().to_string(),
                source: absolute.display().to_string(),
                sha256,
            })
        }
        WeightsSpec::ModelFile { path, sha256 } => {
            check_file(path, sha256)?;
            load_file(vs, path)?;
            Ok(WeightsInfo {
                spec: path.display().to_string(),
                source: path.display().to_string(),
                sha256: sha256.clone(),
            })
        }
        WeightsSpec::Url { url, sha256 } => {
            let expected = match sha256 {
                Some(h) => Expected::Full(h),
                None => Expected::Nothing,
            };
            let (path, actual) = fetch(url, None, expected, quiet)?;
            load_file(vs, &path)?;
            Ok(WeightsInfo {
                spec: match sha256 {
                    Some(h) => format!("{url}#sha256={h}"),
                    None => url.clone(),
                },
                source: url.clone(),
                sha256: actual,
            })
        }
        WeightsSpec::Known { name, pth } => {
            let src = resolve(name, *pth, arch)?;
            let url = src.url();
            let (path, actual) = fetch(&url, Some(src.cache_name), src.checksum.expected(), quiet)
                .map_err(|e| {
                    if e.downcast_ref::<Unreachable>().is_none() {
                        return e;
                    }
                    let other = SOURCES
                        .iter()
                        .find(|k| k.name == src.name && k.arch == arch && k.pth != src.pth)
                        .map(|k| {
                            format!(
                                ", or --weights {} (from {})",
                                k.spec(),
                                k.host.default_base()
                            )
                        })
                        .unwrap_or_default();
                    anyhow!(
                        "no {} weights for {}: {e:#}. Put the file from {url} at {}{other}, or \
                         pass --weights FILE (safetensors or a PyTorch state dict), or --weights \
                         random:0 to try the pipeline with random weights",
                        src.label,
                        arch.name(),
                        cached_path(&url, Some(src.cache_name)).display()
                    )
                })?;
            load_file(vs, &path)?;
            Ok(WeightsInfo {
                spec: src.spec(),
                source: url,
                sha256: actual,
            })
        }
    }
}

/// A bare word (no folder, no extension): more likely a mistyped source name than a file.
pub(super) fn looks_like_a_name(path: &Path) -> bool {
    path.components().count() == 1 && path.extension().is_none()
}

/// torchvision's initialization: convolutions Kaiming-normal (fan-out, ReLU gain), batch norms
/// at identity. Deterministic for a seed on a given libtorch.
pub(super) fn init_random(vs: &mut VarStore, seed: u64) {
    tch::manual_seed(seed as i64);
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    tch::no_grad(|| {
        for (name, mut t) in vars {
            let size = t.size();
            if size.len() == 4 {
                let fan_out = (size[0] * size[2] * size[3]) as f64;
                let std = (2.0 / fan_out).sqrt();
                t.copy_(&(Tensor::randn(&size, (Kind::Float, t.device())) * std));
            } else if name.ends_with("running_var") || name.ends_with("weight") {
                let _ = t.fill_(1.0);
            } else {
                let _ = t.fill_(0.0);
            }
        }
    });
}

/// Every tensor of a weights file, by name: safetensors, or a `torch.save` file (zip or the
/// older pickle stream) holding a state dict (also under a "state_dict" or "model" key).
pub fn read_file(path: &Path) -> Result<Vec<(String, Tensor)>> {
    read_tensors(path, &|_| true)
}

/// Whether a weights file's first bytes are a safetensors header (an 8-byte length, then
/// JSON); anything else is read as a `torch.save` file.
pub(crate) fn is_safetensors(head: &[u8]) -> bool {
    head.get(8) == Some(&b'{')
}

/// The `wanted` tensors of a weights file (see [`read_file`]), by name. The file is mapped,
/// not read: only the bytes of the wanted tensors are touched and converted (a backbone cut
/// after layer3 needs well under half of a full checkpoint).
pub(super) fn read_tensors(
    path: &Path,
    wanted: &dyn Fn(&str) -> bool,
) -> Result<Vec<(String, Tensor)>> {
    let cannot_read =
        |e: std::io::Error| anyhow!("cannot read weights file {}: {e}", path.display());
    let file = std::fs::File::open(path).map_err(cannot_read)?;
    // SAFETY: the mapping is only read, and dropped before this returns (every tensor is a
    // copy). Weights files are written once; one changed under us gives wrong values or a
    // refusal, as it would with read().
    let data = unsafe { memmap2::Mmap::map(&file) }.map_err(cannot_read)?;
    let magic = &data[..data.len().min(9)];
    let cannot =
        |e: &dyn std::fmt::Display| anyhow!("cannot load weights file {}: {e}", path.display());
    if is_safetensors(magic) {
        let st = safetensors::SafeTensors::deserialize(&data).map_err(|e| cannot(&e))?;
        return st
            .tensors()
            .into_iter()
            .filter(|(name, _)| wanted(name))
            .map(|(name, view)| Ok((name, Tensor::try_from(view).map_err(|e| cannot(&e))?)))
            .collect();
    }
    let is_zip = magic.starts_with(b"PK\x03\x04");
    let is_pickle = magic.len() >= 2 && magic[0] == 0x80;
    if !is_zip && !is_pickle {
        bail!(
            "weights file {} is neither safetensors nor a PyTorch state dict saved by torch.save",
            path.display()
        );
    }
    let read = if is_zip {
        match pth::read_zip(&data, wanted) {
            // A zip without data.pkl: perhaps libtorch's own format.
            Ok(None) => return Tensor::loadz_multi(path).map_err(|e| cannot(&e)),
            Ok(Some(tensors)) => Ok(tensors),
            Err(e) => Err(e),
        }
    } else {
        pth::read_legacy(&data, wanted)
    };
    read.map_err(|e| cannot(&format!("{e:#}")))
}

/// Loads a weights file by tensor name, checking that every variable is present with the
/// right shape. Extra tensors (the classifier, deeper layers) are ignored, never converted;
/// a `module.` prefix (from `DataParallel`) is dropped.
pub fn load_file(vs: &mut VarStore, path: &Path) -> Result<()> {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let needed: HashSet<&str> = vars.iter().map(|(k, _)| k.as_str()).collect();
    let strip = |k: &str| legacy_densenet_name(k.strip_prefix("module.").unwrap_or(k));
    let named: HashMap<String, Tensor> =
        read_tensors(path, &|k| needed.contains(strip(k).as_str()))?
            .into_iter()
            .map(|(k, v)| (strip(&k), v))
            .collect();
    tch::no_grad(|| -> Result<()> {
        for (name, mut var) in vars {
            let Some(src) = named.get(&name) else {
                bail!(
                    "weights file {} has no tensor '{name}' (is it for another backbone?)",
                    path.display()
                );
            };
            if src.size() != var.size() {
                bail!(
                    "weights file {}: tensor '{name}' has shape {:?}, the backbone needs {:?} \
                     (is it for another backbone?)",
                    path.display(),
                    src.size(),
                    var.size()
                );
            }
            var.copy_(&src.to_kind(Kind::Float).to_device(var.device()));
        }
        Ok(())
    })
}

/// torchvision's DenseNet files are older than its module names: `...denselayer1.norm.1.weight`
/// is now `...denselayer1.norm1.weight` (torchvision's `_load_state_dict` renames them with a
/// regex). Other names are returned as they are.
pub(super) fn legacy_densenet_name(k: &str) -> String {
    let parts: Vec<&str> = k.split('.').collect();
    let n = parts.len();
    let legacy = n >= 4
        && parts[n - 4]
            .strip_prefix("denselayer")
            .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
        && ["norm", "relu", "conv"].contains(&parts[n - 3])
        && ["1", "2"].contains(&parts[n - 2])
        && ["weight", "bias", "running_mean", "running_var"].contains(&parts[n - 1]);
    if !legacy {
        return k.to_string();
    }
    let head = parts[..n - 2].join(".");
    format!("{head}{}.{}", parts[n - 2], parts[n - 1])
}
