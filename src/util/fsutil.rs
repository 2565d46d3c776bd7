//! File utilities every stage may use: atomic writes, the removal of temporary files that
//! killed runs left, and checksums (SHA-256, and BLAKE3 where a file is checked at every
//! start: memory-mapped and hashed on all cores, it costs a fraction of SHA-256's time on
//! large files). Below all the stages, so that a stage never
//! imports a later one to write a file.

use std::io::{BufWriter, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};
use tempfile::NamedTempFile;

/// A file written under a temporary name in the destination's folder and renamed over the
/// destination only by `commit`; dropped uncommitted (an error, a Ctrl-C that unwinds to
/// the command's end), it removes itself. So a reader (or a crash) never sees a half-written
/// file, and an existing file survives a failed write.
///
/// The temporary name is `.NAME.tmp-PID-XXXXXX`, PID the writer's process id: a kill
/// (SIGKILL, a power cut) leaves it behind, and the next durable write of NAME removes it
/// once that process is gone ([`remove_stale_temps`]).
pub struct AtomicFile {
    file: Option<BufWriter<NamedTempFile>>,
    dest: PathBuf,
    durable: bool,
    /// Written to since the last `sync`.
    dirty: bool,
}

impl AtomicFile {
    /// For files that must survive a power cut once written (models, downloads): the data is
    /// flushed to disk before the rename. Temporary files of NAME left by killed runs are
    /// removed first.
    pub fn create(dest: &Path) -> Result<Self> {
        remove_stale_temps(dest);
        Self::open(dest, true)
    }

    /// For per-image outputs: still atomic for readers and crashes of the process, but not
    /// forced to disk one by one (that would cost more than computing them), nor looking
    /// for stale temporary files (a scan of the folder per image).
    pub fn create_fast(dest: &Path) -> Result<Self> {
        Self::open(dest, false)
    }

    fn open(dest: &Path, durable: bool) -> Result<Self> {
        let dir = folder(dest);
        let name = dest
            .file_name()
            .ok_or_else(|| anyhow!("{} is not a file path", dest.display()))?;
        // `.NAME.tmp-PID-XXXXXX` beside the destination: hidden, recognizably ours, and on
        // the same file system, so the final rename is atomic.
        let prefix = own_temp_prefix(Path::new(name));
        // The permissions `File::create` gives (0666 less the umask), not tempfile's private
        // 0600: the temporary file becomes the output.
        let mut builder = tempfile::Builder::new();
        builder
            .prefix(&prefix)
            .rand_bytes(6)
            .permissions(std::fs::Permissions::from_mode(0o666));
        let file = builder.tempfile_in(dir).with_context(|| {
            format!(
                "cannot write {} (in folder {})",
                dest.display(),
                dir.display()
            )
        })?;
        Ok(AtomicFile {
            file: Some(BufWriter::new(file)),
            dest: dest.to_path_buf(),
            durable,
            dirty: true,
        })
    }

    /// Where the data goes until `commit`, for writers that take a path (FAISS).
    pub fn temp_path(&self) -> &Path {
        self.file
            .as_ref()
            .expect("not yet committed")
            .get_ref()
            .path()
    }

    /// Flushes the data written so far to disk (done by `commit` too): lets a caller make two
    /// files durable first and then rename both in quick succession (a model's index and
    /// sidecar).
    pub fn sync(&mut self) -> Result<()> {
        let file = self.file.as_mut().expect("not yet committed");
        file.flush()
            .and_then(|()| file.get_ref().as_file().sync_all())
            .with_context(|| format!("cannot write {}", self.dest.display()))?;
        self.dirty = false;
        Ok(())
    }

    /// Flushes (to disk if durable and not synced since the last write) and renames the file
    /// into place.
    pub fn commit(mut self) -> Result<()> {
        let file = self.file.take().expect("not yet committed");
        let file = file
            .into_inner()
            .map_err(|e| anyhow!("cannot write {}: {}", self.dest.display(), e.error()))?;
        if self.durable && self.dirty {
            file.as_file()
                .sync_all()
                .with_context(|| format!("cannot write {}", self.dest.display()))?;
        }
        file.persist(&self.dest)
            .map_err(|e| e.error)
            .with_context(|| format!("cannot write {}", self.dest.display()))?;
        Ok(())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.dirty = true;
        self.file.as_mut().expect("not yet committed").write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.as_mut().expect("not yet committed").flush()
    }
}

/// For writers that go back to fill in what they wrote (zip archives: `.npz`).
impl std::io::Seek for AtomicFile {
    fn seek(&mut self, pos: std::io::SeekFrom) -> std::io::Result<u64> {
        self.dirty = true;
        std::io::Seek::seek(self.file.as_mut().expect("not yet committed"), pos)
    }
}

/// The folder `path` is in (`.` for a bare file name).
pub fn folder(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// `.NAME.tmp-`, how the temporary files of `NAME` begin.
fn temp_prefix(name: &std::ffi::OsStr) -> std::ffi::OsString {
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(name);
    prefix.push(".tmp-");
    prefix
}

/// `.NAME.tmp-PID-`: how this process's temporary files for `dest` begin (the caller adds
/// random characters), so that later runs can tell when they are stale.
pub fn own_temp_prefix(dest: &Path) -> std::ffi::OsString {
    let mut prefix = temp_prefix(dest.file_name().unwrap_or(dest.as_os_str()));
    prefix.push(format!("{}-", std::process::id()));
    prefix
}

/// The temporary files of `dest` in its folder (`.NAME.tmp-PID-XXXXXX`, whatever their
/// state), with the id of the process that made each.
pub fn temp_files(dest: &Path) -> Vec<(PathBuf, u32)> {
    let Some(name) = dest.file_name() else {
        return Vec::new();
    };
    let prefix = temp_prefix(name);
    let prefix = prefix.as_encoded_bytes();
    let Ok(entries) = std::fs::read_dir(folder(dest)) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let file = entry.file_name();
            let rest = file.as_encoded_bytes().strip_prefix(prefix)?;
            let (pid, suffix) = std::str::from_utf8(rest).ok()?.split_once('-')?;
            let pid = pid.parse().ok().filter(|_| !suffix.is_empty())?;
            Some((entry.path(), pid))
        })
        .collect()
}

/// Whether process `pid` exists (it may belong to another user). A process that has
/// exited but not been reaped yet still counts.
pub fn process_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // Signal 0 checks without sending anything; only ESRCH means there is no such process.
    // SAFETY: kill with signal 0 has no effect on the target.
    let found = unsafe { libc::kill(pid, 0) } == 0;
    found || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Removes the temporary files of `dest` (see [`AtomicFile`]) whose process is gone: only
/// files named as ours, never one of a running process (this one included). Files that
/// cannot be removed are left; returns those removed.
pub fn remove_stale_temps(dest: &Path) -> Vec<PathBuf> {
    temp_files(dest)
        .into_iter()
        .filter(|(path, pid)| {
            *pid != std::process::id()
                && !process_exists(*pid)
                && std::fs::remove_file(path).is_ok()
        })
        .map(|(path, _)| path)
        .collect()
}

/// Flushes a folder's entries (renames into it) to disk.
pub fn sync_folder(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot write in folder {}", dir.display()))
}

/// Disk space an output needs, as estimated before the work: `bytes`, and how it was
/// estimated (for the message).
#[derive(Debug, Clone)]
pub struct SpaceNeed {
    pub bytes: u64,
    /// E.g. "the memory bank (60 images x 784 patches x ratio 0.1 x 1024 dims x 4 bytes)".
    pub what: String,
}

/// An output folder checked before any work: it is (or can be created as) a folder, a file
/// can be written in it, and its file system has the space estimated for the outputs.
/// The folders it created (the output folder and missing parents) are removed again when it
/// is dropped before [`OutputFolder::keep`], if still empty: a run that fails before its
/// work starts (a model that does not load, an interrupt) leaves no empty folder behind. Every command that writes files
/// checks its output folder with it before loading a backbone.
#[derive(Debug)]
pub struct OutputFolder {
    /// Created by this run, deepest last.
    created: Vec<PathBuf>,
}

impl OutputFolder {
    /// Checks (and creates) the output folder `dir`; errors are one line naming `dir`.
    pub fn prepare(dir: &Path, need: Option<&SpaceNeed>) -> Result<OutputFolder> {
        let mut out = OutputFolder {
            created: Vec::new(),
        };
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => bail!(
                "output folder {} is not a folder (a file of that name exists)",
                dir.display()
            ),
            Err(_) => {
                // The folders to create, from the nearest existing one down.
                let mut missing = Vec::new();
                let mut at = Some(dir);
                while let Some(p) = at.filter(|p| !p.as_os_str().is_empty()) {
                    match std::fs::metadata(p) {
                        Ok(m) if m.is_dir() => break,
                        Ok(_) => bail!(
                            "cannot create output folder {}: {} is a file, not a folder",
                            dir.display(),
                            p.display()
                        ),
                        Err(_) => missing.push(p.to_path_buf()),
                    }
                    at = p.parent();
                }
                for p in missing.into_iter().rev() {
                    match std::fs::create_dir(&p) {
                        Ok(()) => out.created.push(p),
                        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && p.is_dir() => {}
                        Err(e) => bail!("cannot create output folder {}: {e}", dir.display()),
                    }
                }
            }
        }
        // A file created and removed at once: permission bits, read-only mounts, immutable
        // folders and full inode tables all show here, for root too.
        let probe = dir.join(format!(".patchcore-write-check-{}", std::process::id()));
        let _ = std::fs::remove_file(&probe); // a killed run's (same pid)
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&probe)
            .map_err(|e| anyhow!("cannot write in output folder {}: {e}", dir.display()))?;
        let _ = std::fs::remove_file(&probe);
        if let Some(need) = need {
            if let Some(free) = free_space(dir) {
                if need.bytes > free {
                    bail!(
                        "not enough free space in output folder {}: {} free, about {} needed \
                         for {}",
                        dir.display(),
                        human_bytes(free),
                        human_bytes(need.bytes),
                        need.what
                    );
                }
            }
        }
        Ok(out)
    }
}

impl OutputFolder {
    /// The work has started (the model loaded): the folders stay, empty or not.
    pub fn keep(mut self) {
        self.created.clear();
    }
}

impl Drop for OutputFolder {
    fn drop(&mut self) {
        // `remove_dir` removes only empty folders: outputs written stay.
        for p in self.created.iter().rev() {
            if std::fs::remove_dir(p).is_err() {
                break;
            }
        }
    }
}

/// Bytes available to this user on the file system of `path`, if it can tell.
pub fn free_space(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `st` a valid out-parameter.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// A size for messages: `512 bytes`, `3.2 MiB`, `1.5 GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} bytes");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// The SHA-256 of a file's contents, as lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut f, &mut hasher)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(hex(&hasher.finalize()))
}

/// The SHA-256 of bytes already in memory (e.g. a mapped file), as lowercase hex.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// The BLAKE3 of a file's contents, as lowercase hex: the file is memory-mapped and hashed
/// in parallel (on rayon's pool).
pub fn blake3_file(path: &Path) -> Result<String> {
    let mut hasher = blake3::Hasher::new();
    hasher
        .update_mmap_rayon(path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(hasher.finalize().to_hex().to_string())
}

/// The BLAKE3 of bytes already in memory, hashed in parallel, as lowercase hex.
pub fn blake3_bytes(bytes: &[u8]) -> String {
    blake3::Hasher::new()
        .update_rayon(bytes)
        .finalize()
        .to_hex()
        .to_string()
}

/// Lowercase hex of bytes (checksums).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_file_keeps_old_content_until_commit() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt");
        std::fs::write(&p, "old").unwrap();
        {
            let mut f = AtomicFile::create(&p).unwrap();
            f.write_all(b"new").unwrap();
            let temp = f.temp_path().to_path_buf();
            assert_eq!(temp.parent(), Some(dir.path()), "beside the destination");
            let name = temp.file_name().unwrap().to_str().unwrap();
            let ours = format!(".a.txt.tmp-{}-", std::process::id());
            assert!(name.starts_with(&ours), "{name}");
            assert_eq!(temp_files(&p), vec![(temp.clone(), std::process::id())]);
            assert!(
                remove_stale_temps(&p).is_empty(),
                "a live process's file stays"
            );
            assert!(temp.exists());
            // dropped without commit
        }
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "old");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "an uncommitted file removes itself"
        );
        let mut f = AtomicFile::create_fast(&p).unwrap();
        f.write_all(b"new").unwrap();
        f.commit().unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "new");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp file left"
        );
    }

    #[test]
    fn committed_files_get_the_usual_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::File::create(&a).unwrap();
        AtomicFile::create(&b).unwrap().commit().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&b), mode(&a), "as File::create, not tempfile's 0600");
    }

    #[test]
    fn output_folder_is_checked_and_removed_when_left_empty() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("a/b/c");
        let need = SpaceNeed {
            bytes: 1,
            what: "a test".into(),
        };
        let out = OutputFolder::prepare(&deep, Some(&need)).unwrap();
        assert!(deep.is_dir());
        drop(out);
        assert!(!dir.path().join("a").exists(), "empty folders it made go");
        // Written into: kept.
        let out = OutputFolder::prepare(&deep, None).unwrap();
        std::fs::write(deep.join("x"), "x").unwrap();
        drop(out);
        assert!(deep.join("x").is_file());
        assert_eq!(
            std::fs::read_dir(&deep).unwrap().count(),
            1,
            "no check file left"
        );
        // A file in the way, at the folder or above it.
        let file = dir.path().join("f");
        std::fs::write(&file, "").unwrap();
        let e = OutputFolder::prepare(&file, None).unwrap_err().to_string();
        assert!(
            e.contains("not a folder") && e.contains(&*file.to_string_lossy()),
            "{e}"
        );
        let below = file.join("sub/dir");
        let e = OutputFolder::prepare(&below, None).unwrap_err().to_string();
        assert!(
            e.contains("not a folder") && e.contains(&*below.to_string_lossy()),
            "{e}"
        );
        // More than the disk holds.
        let huge = SpaceNeed {
            bytes: u64::MAX,
            what: "the memory bank (a test)".into(),
        };
        let other = dir.path().join("other");
        let e = OutputFolder::prepare(&other, Some(&huge))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not enough free space") && e.contains("the memory bank (a test)"),
            "{e}"
        );
        assert!(!other.exists(), "refused: nothing left behind");
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(12), "12 bytes");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
        assert_eq!(human_bytes(1536 << 20), "1.5 GiB");
    }

    #[test]
    fn checksums_are_sha256_hex() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("abc");
        std::fs::write(&p, "abc").unwrap();
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(sha256_file(&p).unwrap(), abc);
        assert_eq!(sha256_bytes(b"abc"), abc);
    }

    #[test]
    fn blake3_checksums_match_the_reference_on_files_of_any_size() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("abc");
        std::fs::write(&p, "abc").unwrap();
        // The BLAKE3 paper's test vector for "abc".
        let abc = "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85";
        assert_eq!(blake3_file(&p).unwrap(), abc);
        assert_eq!(blake3_bytes(b"abc"), abc);
        // Large enough to be mapped and hashed in parallel; one changed byte changes it.
        let mut big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &big).unwrap();
        let whole = blake3_file(&p).unwrap();
        assert_eq!(whole, blake3_bytes(&big));
        big[2_999_999] ^= 1;
        std::fs::write(&p, &big).unwrap();
        assert_ne!(blake3_file(&p).unwrap(), whole);
        let missing = blake3_file(&dir.path().join("none")).unwrap_err();
        assert!(format!("{missing:#}").contains("none"), "{missing:#}");
    }
}
