//! Backbone weights: where they come from (a local file, seeded random initialization, or the
//! ImageNet weights downloaded once into a cache) and loading them into the network by name.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};
use tch::{nn::VarStore, Kind, Tensor};

use crate::backbone::Arch;
use crate::outputs::AtomicFile;

/// What `--weights` asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightsSpec {
    /// torchvision's ImageNet weights for the architecture, from the cache or downloaded.
    ImageNet,
    /// torchvision-style initialization from a seed: for smoke tests and offline demos.
    Random(u64),
    /// A safetensors file or a PyTorch state dict saved by `torch.save`.
    File(PathBuf),
    /// A file to download (into the cache), optionally pinned by `#sha256=HEX`.
    Url { url: String, sha256: Option<String> },
}

impl WeightsSpec {
    pub fn parse(s: &str) -> Result<Self> {
        if s == "imagenet" {
            return Ok(WeightsSpec::ImageNet);
        }
        if let Some(seed) = s.strip_prefix("random:") {
            let seed = seed
                .parse()
                .map_err(|_| anyhow!("--weights random:SEED needs an integer seed, got '{s}'"))?;
            return Ok(WeightsSpec::Random(seed));
        }
        if s.starts_with("http://") || s.starts_with("https://") {
            let (url, sha256) = match s.split_once("#sha256=") {
                Some((u, h)) => (u.to_string(), Some(h.to_ascii_lowercase())),
                None => (s.to_string(), None),
            };
            return Ok(WeightsSpec::Url { url, sha256 });
        }
        Ok(WeightsSpec::File(PathBuf::from(s)))
    }
}

/// What was loaded, recorded in the model so predict can check it uses the same weights.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WeightsInfo {
    /// How to get them again, in `--weights` syntax ("imagenet", "random:0", a path, a URL).
    pub spec: String,
    /// Where they came from: "random:0", a file path, or a URL.
    pub source: String,
    /// SHA-256 of the weights file, or of the spec for random weights.
    pub sha256: String,
}

/// A known public source of torchvision ImageNet weights, served as safetensors.
struct Source {
    arch: Arch,
    /// Path under the base URL.
    file: &'static str,
    /// Pinned SHA-256 of the file, where it is known.
    sha256: Option<&'static str>,
}

/// torchvision's ImageNet-1k weights (the `IMAGENET1K_V1` ones the official PatchCore uses),
/// as republished in safetensors by the timm project ("tv_in1k" = torchvision's weights).
/// The checksums could not be read while this table was written (no network); until they are
/// pinned here, the first download's checksum is recorded and every later load is verified
/// against it.
const SOURCES: &[Source] = &[
    Source {
        arch: Arch::Resnet18,
        file: "timm/resnet18.tv_in1k/resolve/main/model.safetensors",
        sha256: None,
    },
    Source {
        arch: Arch::Resnet34,
        file: "timm/resnet34.tv_in1k/resolve/main/model.safetensors",
        sha256: None,
    },
    Source {
        arch: Arch::Resnet50,
        file: "timm/resnet50.tv_in1k/resolve/main/model.safetensors",
        sha256: None,
    },
    Source {
        arch: Arch::Resnet101,
        file: "timm/resnet101.tv_in1k/resolve/main/model.safetensors",
        sha256: None,
    },
    Source {
        arch: Arch::Resnet152,
        file: "timm/resnet152.tv_in1k/resolve/main/model.safetensors",
        sha256: None,
    },
    Source {
        arch: Arch::WideResnet50_2,
        file: "timm/wide_resnet50_2.tv_in1k/resolve/main/model.safetensors",
        sha256: None,
    },
    Source {
        arch: Arch::WideResnet101_2,
        file: "timm/wide_resnet101_2.tv_in1k/resolve/main/model.safetensors",
        sha256: None,
    },
];

const DEFAULT_BASE_URL: &str = "https://huggingface.co/";

/// The cache folder: `$PATCHCORE_CACHE`, else `$XDG_CACHE_HOME/patchcore`, else
/// `~/.cache/patchcore`.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("PATCHCORE_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(p).join("patchcore");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    PathBuf::from(home).join(".cache").join("patchcore")
}

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
            load_file(vs, path)?;
            let absolute = path.canonicalize().unwrap_or_else(|_| path.clone());
            Ok(WeightsInfo {
                spec: absolute.display().to_string(),
                source: absolute.display().to_string(),
                sha256: sha256_file(path)?,
            })
        }
        WeightsSpec::Url { url, sha256 } => {
            let path = fetch(url, None, sha256.as_deref(), quiet)?;
            load_file(vs, &path)?;
            Ok(WeightsInfo {
                spec: match sha256 {
                    Some(h) => format!("{url}#sha256={h}"),
                    None => url.clone(),
                },
                source: url.clone(),
                sha256: sha256_file(&path)?,
            })
        }
        WeightsSpec::ImageNet => {
            let src = SOURCES
                .iter()
                .find(|s| s.arch == arch)
                .expect("every architecture has a source");
            let base = std::env::var("PATCHCORE_WEIGHTS_BASE_URL")
                .unwrap_or_else(|_| DEFAULT_BASE_URL.to_string());
            let url = format!("{}/{}", base.trim_end_matches('/'), src.file);
            let name = format!("{}.tv_in1k.safetensors", arch.name());
            let path = fetch(&url, Some(&name), src.sha256, quiet).map_err(|e| {
                anyhow!(
                    "no ImageNet weights for {}: {e:#}. Put the safetensors file from {url} at {}, \
                     or pass --weights FILE (safetensors or a PyTorch state dict), \
                     or --weights random:0 to try the pipeline with random weights",
                    arch.name(),
                    cached_path(&url, Some(&name)).display()
                )
            })?;
            load_file(vs, &path)?;
            Ok(WeightsInfo {
                spec: "imagenet".to_string(),
                source: url,
                sha256: sha256_file(&path)?,
            })
        }
    }
}

/// torchvision's initialization: convolutions Kaiming-normal (fan-out, ReLU gain), batch norms
/// at identity. Deterministic for a seed on a given libtorch.
fn init_random(vs: &mut VarStore, seed: u64) {
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

/// Loads a weights file by tensor name, checking that every variable is present with the
/// right shape. Extra tensors (the classifier, deeper layers) are ignored.
pub fn load_file(vs: &mut VarStore, path: &Path) -> Result<()> {
    let mut magic = [0u8; 9];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut magic))
        .with_context(|| format!("cannot read weights file {}", path.display()))?;
    let named = if n >= 4 && magic[..4] == *b"PK\x03\x04" {
        Tensor::loadz_multi(path)
    } else if n == 9 && magic[8] == b'{' {
        Tensor::read_safetensors(path)
    } else {
        bail!(
            "weights file {} is neither safetensors nor a PyTorch state dict saved by torch.save",
            path.display()
        );
    }
    .map_err(|e| anyhow!("cannot load weights file {}: {e}", path.display()))?;
    let named: HashMap<String, Tensor> = named
        .into_iter()
        .map(|(k, v)| (k.strip_prefix("module.").unwrap_or(&k).to_string(), v))
        .collect();
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
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

/// Where a download of `url` is cached: `CACHE/weights/NAME`, with `name` given for the
/// known sources and derived from the URL (a short hash plus its file name) otherwise.
fn cached_path(url: &str, name: Option<&str>) -> PathBuf {
    let file = match name {
        Some(n) => n.to_string(),
        None => {
            let digest = hex(&Sha256::digest(url.as_bytes()));
            let base: String = url
                .rsplit('/')
                .next()
                .unwrap_or("weights")
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            format!("{}-{base}", &digest[..12])
        }
    };
    cache_dir().join("weights").join(file)
}

/// Returns the cached copy of `url`, downloading it first if needed. With `expected` the file
/// must have that SHA-256; without, the checksum of the first download is recorded beside the
/// file and checked on every later use.
pub fn fetch(
    url: &str,
    name: Option<&str>,
    expected: Option<&str>,
    quiet: bool,
) -> Result<PathBuf> {
    let path = cached_path(url, name);
    let recorded = path.with_extension("sha256");
    if path.exists() {
        let actual = sha256_file(&path)?;
        let want = match expected {
            Some(e) => Some(e.to_string()),
            None => std::fs::read_to_string(&recorded)
                .ok()
                .map(|s| s.trim().to_string()),
        };
        match want {
            Some(w) if w != actual => bail!(
                "cached weights {} have checksum {actual}, expected {w}: delete the file to \
                 download it again",
                path.display()
            ),
            _ => return Ok(path),
        }
    }
    let dir = path.parent().expect("cache path has a folder");
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create cache folder {}", dir.display()))?;
    let actual = download(url, &path, quiet)?;
    if let Some(e) = expected {
        if e != actual {
            let _ = std::fs::remove_file(&path);
            bail!("download of {url} has checksum {actual}, expected {e}: refusing to use it");
        }
    }
    let mut f = AtomicFile::create(&recorded)?;
    writeln!(f, "{actual}")?;
    f.commit()?;
    Ok(path)
}

/// Streams `url` into `dest` (atomically), with a progress bar; returns the file's SHA-256.
fn download(url: &str, dest: &Path, quiet: bool) -> Result<String> {
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(20))
        .timeout_read(Duration::from_secs(60))
        .build();
    let resp = agent.get(url).call().map_err(|e| {
        let why = match e {
            ureq::Error::Status(code, _) => format!("HTTP status {code}"),
            ureq::Error::Transport(t) => match t.message() {
                Some(m) => format!("{}: {m}", t.kind()),
                None => t.kind().to_string(),
            },
        };
        anyhow!("download of {url} failed ({why})")
    })?;
    let total: Option<u64> = resp.header("Content-Length").and_then(|v| v.parse().ok());
    let bar = crate::progress::bytes(total, &format!("downloading {url}"), quiet);
    let mut reader = resp.into_reader();
    let mut out = AtomicFile::create(dest)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut received = 0u64;
    loop {
        let n = reader
            .read(&mut buf)
            .map_err(|e| anyhow!("download of {url} broke off: {e}"))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])?;
        received += n as u64;
        bar.set_position(received);
    }
    bar.finish_and_clear();
    if let Some(t) = total {
        if t != received {
            bail!("download of {url} ended after {received} of {t} bytes");
        }
    }
    out.commit()?;
    Ok(hex(&hasher.finalize()))
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut f, &mut hasher)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(hex(&hasher.finalize()))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        assert_eq!(
            WeightsSpec::parse("imagenet").unwrap(),
            WeightsSpec::ImageNet
        );
        assert_eq!(
            WeightsSpec::parse("random:7").unwrap(),
            WeightsSpec::Random(7)
        );
        assert!(WeightsSpec::parse("random:x").is_err());
        assert_eq!(
            WeightsSpec::parse("http://h/f#sha256=AB").unwrap(),
            WeightsSpec::Url {
                url: "http://h/f".into(),
                sha256: Some("ab".into())
            }
        );
        assert_eq!(
            WeightsSpec::parse("w.safetensors").unwrap(),
            WeightsSpec::File("w.safetensors".into())
        );
    }

    #[test]
    fn every_arch_has_a_source() {
        for a in Arch::ALL {
            assert!(SOURCES.iter().any(|s| s.arch == a), "{}", a.name());
        }
    }
}
