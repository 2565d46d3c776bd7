//! The backbone weights file a self-contained model keeps beside its index
//! (`ModelInfo::weights_file`, written by `patchcore export`, `train --self-contained` and
//! `merge` of such models): where a spec's weights are on this machine, the file's name, its
//! checked copy and its check at load.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

use super::cache::{fetch, Expected};
use super::{resolve, WeightsSpec};
use crate::features::backbone::Arch;
use crate::util::fsutil::{self, sha256_file, AtomicFile};

/// The file on this machine that holds the weights `spec` names for `arch`: the file itself,
/// or for a known source or a URL its copy in the cache, downloaded now (with its progress bar
/// and checksum checks) when it is not there yet. None for random weights, which need no file.
pub fn local_file(spec: &WeightsSpec, arch: Arch, quiet: bool) -> Result<Option<PathBuf>> {
    Ok(match spec {
        WeightsSpec::Random(_) => None,
        WeightsSpec::File(path) | WeightsSpec::ModelFile { path, .. } => Some(path.clone()),
        WeightsSpec::Url { url, sha256 } => {
            let expected = sha256.as_deref().map_or(Expected::Nothing, Expected::Full);
            Some(fetch(url, None, expected, quiet)?.0)
        }
        WeightsSpec::Known { name, pth } => {
            let src = resolve(name, *pth, arch)?;
            let expected = src.checksum.expected();
            Some(fetch(&src.url(), Some(src.cache_name), expected, quiet)?.0)
        }
    })
}

/// The name a self-contained model gives its weights file: `BACKBONE-SHA8.EXT`, the first 8
/// hex digits of the file's SHA-256 and the extension of its format (`safetensors`, or `pth`
/// for PyTorch's `torch.save` files), e.g. `resnet18-694f673d.safetensors`.
pub fn file_name(backbone: &str, sha256: &str, file: &Path) -> Result<String> {
    let short = sha256.get(..8).unwrap_or(sha256);
    Ok(format!("{backbone}-{short}.{}", format_extension(file)?))
}

/// `safetensors` or `pth`: the file's own extension when it is one of them, else its format
/// as its first bytes tell (a safetensors header is JSON after an 8-byte length).
fn format_extension(file: &Path) -> Result<&'static str> {
    match file.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => return Ok("safetensors"),
        Some("pth") => return Ok("pth"),
        _ => {}
    }
    let mut head = Vec::new();
    std::fs::File::open(file)
        .and_then(|f| f.take(9).read_to_end(&mut head))
        .with_context(|| format!("cannot read weights file {}", file.display()))?;
    Ok(if super::is_safetensors(&head) {
        "safetensors"
    } else {
        "pth"
    })
}

/// Copies the weights file `src` (SHA-256 `sha256`, of backbone `backbone`) beside the model
/// `index` under its [`file_name`], unless a file of that name and checksum is there already.
/// The copy takes the name only once its checksum is checked. Returns the name.
pub fn place_beside(index: &Path, backbone: &str, src: &Path, sha256: &str) -> Result<String> {
    let name = file_name(backbone, sha256, src)?;
    let dest = fsutil::folder(index).join(&name);
    if sha256_file(&dest).is_ok_and(|h| h == sha256) {
        return Ok(name);
    }
    let mut out = AtomicFile::create(&dest)?;
    std::fs::File::open(src)
        .and_then(|mut f| std::io::copy(&mut f, &mut out))
        .with_context(|| {
            format!(
                "cannot copy weights file {} to {}",
                src.display(),
                dest.display()
            )
        })?;
    out.sync()?;
    let copied = sha256_file(out.temp_path())?;
    if copied != sha256 {
        bail!(
            "weights file {} has checksum {copied}, not {sha256} as the model records: it \
             changed since the model was trained",
            src.display()
        );
    }
    out.commit()?;
    Ok(name)
}

/// Places the weights `spec` names for `arch` (SHA-256 `sha256`) beside the model `index`
/// ([`local_file`], then [`place_beside`]); returns the file's name, or None for random
/// weights, which need no file.
pub fn keep_beside(
    index: &Path,
    arch: Arch,
    spec: &WeightsSpec,
    sha256: &str,
    quiet: bool,
) -> Result<Option<String>> {
    let Some(src) = local_file(spec, arch, quiet)? else {
        return Ok(None);
    };
    place_beside(index, arch.name(), &src, sha256).map(Some)
}

/// Refuses a self-contained model's weights file that cannot be read or whose SHA-256 is not
/// `sha256` (damaged, or replaced), naming it. The SHA-256 is worked out from the file itself,
/// never remembered in the cache.
pub fn check_file(path: &Path, sha256: &str) -> Result<()> {
    let actual = sha256_file(path).map_err(|e| {
        anyhow!(
            "cannot read backbone weights file {}: {}",
            path.display(),
            e.root_cause()
        )
    })?;
    if actual != sha256 {
        bail!(
            "backbone weights file {} is damaged or was replaced: its checksum is {actual}, the \
             model records {sha256} (copy the model's folder again)",
            path.display()
        );
    }
    Ok(())
}
