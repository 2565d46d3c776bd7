//! Downloads into the cache (`CACHE/weights/NAME`), once, with their checksums checked, and
//! the SHA-256 memos that spare re-hashing an unchanged file.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::util::fsutil::{blake3_file, hex, sha256_file, AtomicFile};

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

/// Where a download of `url` is cached: `CACHE/weights/NAME`, with `name` given for the
/// known sources and derived from the URL (a short hash plus its file name) otherwise.
pub(super) fn cached_path(url: &str, name: Option<&str>) -> PathBuf {
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

/// The SHA-256 of a weights file, which models record and published checksums are. SHA-256
/// over a few hundred MB costs a good part of a second at every start, so each content's
/// SHA-256 is worked out once and kept in the cache under the content's BLAKE3
/// (`CACHE/weights/blake3/HEX`), and under the file's identity as the file system states it
/// (`CACHE/weights/stat/HEX`: path, device, inode, size, modification and change times, which
/// any write to or replacement of the file changes, and which a user cannot set back). A start
/// that finds the file unchanged since it was hashed reads only that; otherwise it hashes the
/// file with BLAKE3 (mapped, on all cores), which identifies the content as surely. Without a
/// writable cache, SHA-256 it is.
pub fn checksum(path: &Path) -> Result<String> {
    checksum_with_memos(path, &memo_dir())
}

/// Where [`checksum`] keeps the SHA-256 of each content, under its BLAKE3 (and `stat/`).
pub(super) fn memo_dir() -> PathBuf {
    cache_dir().join("weights").join("blake3")
}

/// The file's identity as the file system states it, hashed: `None` when it cannot be read.
pub(super) fn stat_key(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let path = std::fs::canonicalize(path).ok()?;
    let m = std::fs::metadata(&path).ok()?;
    let id = format!(
        "{}|{}|{}|{}|{}.{}|{}.{}",
        path.display(),
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec()
    );
    Some(hex(&Sha256::digest(id)))
}

/// A SHA-256 kept in a memo file, if it holds one.
pub(super) fn read_memo(memo: &Path) -> Option<String> {
    let known = std::fs::read_to_string(memo).ok()?;
    let known = known.trim();
    is_hex(known, 64).then(|| known.to_string())
}

pub(super) fn checksum_with_memos(path: &Path, memos: &Path) -> Result<String> {
    let by_stat = stat_key(path).map(|k| memos.join("stat").join(k));
    if let Some(known) = by_stat.as_deref().and_then(read_memo) {
        return Ok(known);
    }
    let blake3 = blake3_file(path).map_err(|e| {
        anyhow!(
            "cannot read weights file {}: {}",
            path.display(),
            e.root_cause()
        )
    })?;
    let memo = memos.join(&blake3);
    let sha256 = match read_memo(&memo) {
        Some(known) => known,
        None => {
            let sha256 = sha256_file(path)?;
            remember(&memo, &sha256);
            sha256
        }
    };
    if let Some(by_stat) = by_stat {
        remember(&by_stat, &sha256);
    }
    Ok(sha256)
}

/// Keeps `sha256` in the memo file `memo` of [`checksum`], if the cache can be written
/// (a read-only cache only makes later starts slower).
pub(super) fn remember(memo: &Path, sha256: &str) {
    let dir = memo.parent().expect("memo path has a folder");
    let _ = std::fs::create_dir_all(dir)
        .map_err(anyhow::Error::from)
        .and_then(|_| record(memo, sha256));
}

/// What a file's SHA-256 must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Expected<'a> {
    Full(&'a str),
    Prefix(&'a str),
    Nothing,
}

impl Expected<'_> {
    /// Why `actual` does not qualify, if it does not.
    pub(super) fn mismatch(self, actual: &str) -> Option<String> {
        match self {
            Expected::Full(e) if e != actual => Some(format!("expected {e}")),
            Expected::Prefix(p) if !actual.starts_with(p) => {
                Some(format!("the published checksum begins with {p}"))
            }
            _ => None,
        }
    }
}

/// A download that could not be made (no connection, an HTTP error, a broken transfer), as
/// opposed to one that was refused.
/// (`load` matches on it: an unreachable source names the other forms of the weights.)
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(super) struct Unreachable(String);

/// Returns the cached copy of `url` and its SHA-256, downloading it first if needed. The file
/// must satisfy `expected`; the checksum of the first download is recorded beside the file
/// and checked on every later use as well.
pub(super) fn fetch(
    url: &str,
    name: Option<&str>,
    expected: Expected<'_>,
    quiet: bool,
) -> Result<(PathBuf, String)> {
    let path = cached_path(url, name);
    let recorded = path.with_extension("sha256");
    if path.exists() {
        let actual = checksum(&path)?;
        let first = std::fs::read_to_string(&recorded)
            .ok()
            .map(|s| s.trim().to_string());
        let why = expected.mismatch(&actual).or_else(|| match first {
            Some(r) if r != actual => Some(format!("expected {r} (recorded at its download)")),
            _ => None,
        });
        if let Some(why) = why {
            bail!(
                "cached weights {} have checksum {actual}, {why}: delete the file to download \
                 it again",
                path.display()
            );
        }
        if !recorded.exists() {
            // Put there by hand: its checksum now is the one to keep.
            record(&recorded, &actual)?;
        }
        return Ok((path, actual));
    }
    let dir = path.parent().expect("cache path has a folder");
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create cache folder {}", dir.display()))?;
    let actual = download(url, &path, quiet)?;
    if let Some(why) = expected.mismatch(&actual) {
        let _ = std::fs::remove_file(&path);
        bail!("download of {url} has checksum {actual}, {why}: refusing to use it");
    }
    record(&recorded, &actual)?;
    Ok((path, actual))
}

pub(super) fn record(path: &Path, sha256: &str) -> Result<()> {
    let mut f = AtomicFile::create(path)?;
    writeln!(f, "{sha256}")?;
    f.commit()
}

/// Streams `url` into `dest` (atomically), with a progress bar; returns the file's SHA-256.
pub(super) fn download(url: &str, dest: &Path, quiet: bool) -> Result<String> {
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
        Unreachable(format!("download of {url} failed ({why})"))
    })?;
    let total: Option<u64> = resp.header("Content-Length").and_then(|v| v.parse().ok());
    let bar = crate::util::progress::bytes(total, &format!("downloading {url}"), quiet);
    let mut reader = resp.into_reader();
    let mut out = AtomicFile::create(dest)?;
    let mut hasher = Sha256::new();
    let mut blake3 = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut received = 0u64;
    loop {
        let n = reader
            .read(&mut buf)
            .map_err(|e| Unreachable(format!("download of {url} broke off: {e}")))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        blake3.update(&buf[..n]);
        out.write_all(&buf[..n])?;
        received += n as u64;
        bar.set_position(received);
    }
    bar.finish_and_clear();
    if let Some(t) = total {
        if t != received {
            return Err(Unreachable(format!(
                "download of {url} ended after {received} of {t} bytes"
            ))
            .into());
        }
    }
    out.commit()?;
    let sha256 = hex(&hasher.finalize());
    remember(
        &memo_dir().join(blake3.finalize().to_hex().as_str()),
        &sha256,
    );
    Ok(sha256)
}

pub(super) fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}
