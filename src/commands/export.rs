//! `patchcore export`: a trained model as a self-contained folder, for machines without
//! network or cache (a line PC). The folder holds the index, its sidecar with `weights_file`
//! naming the backbone weights file beside it (`BACKBONE-SHA8.safetensors` or `.pth`,
//! `weights::file_name`), the calibration figure if there is one, and that weights file; for
//! an ensemble, its sidecar and every member so, weights shared by members written once.
//! Random weights need no file (nor network nor cache): such a model keeps no `weights_file`.
//!
//! Every model is loaded first (index and weights checked by checksum; weights of a known
//! source or URL downloaded into the cache when not there yet). The folder is written under a
//! hidden temporary name beside DIR, checked (index checksums, weights SHA-256) and only then
//! renamed to DIR, so a failure leaves nothing half-written.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use tch::Device;

use crate::features::weights::{self, WeightsSpec};
use crate::model::bank::{self, ModelInfo};
use crate::model::ensemble;
use crate::model::single::{self, SingleModel};
use crate::outputs::plots;
use crate::util::fsutil;
use crate::util::log::{self, Level};

pub struct ExportOptions {
    /// The model's index (a single model's or an ensemble's).
    pub index: PathBuf,
    /// The folder to write: new, or empty.
    pub output: PathBuf,
    /// Where the backbone weights are, if not where the model recorded them (a single
    /// model's; checked by checksum).
    pub weights: Option<WeightsSpec>,
    pub quiet: bool,
}

/// What an export wrote.
pub struct Exported {
    /// Every file of the folder with its size in bytes, by name.
    pub files: Vec<(String, u64)>,
    /// The models whose weights are random (`random:SEED`), which need no weights file.
    pub random: Vec<String>,
}

/// One model of the export: its index, its sidecar as it is written (with `weights_file`),
/// and the weights file to copy (none for random weights).
struct Item {
    index: PathBuf,
    info: ModelInfo,
    weights: Option<PathBuf>,
}

/// Everything an export copies: the models, and the ensemble's index when they are its
/// members.
struct Plan {
    ensemble: Option<PathBuf>,
    items: Vec<Item>,
}

/// Exports the model `opts.index` into the folder `opts.output`.
pub fn run(opts: &ExportOptions) -> Result<Exported> {
    check_target(&opts.output)?;
    let plan = plan(opts)?;
    let staging = Staging::create(&opts.output)?;
    write(&plan, &staging.path)?;
    verify(&plan, &staging.path)?;
    let files = listing(&staging.path)?;
    staging.commit(&opts.output)?;
    let random = plan
        .items
        .iter()
        .filter(|i| i.weights.is_none())
        .map(|i| i.info.weights.spec.clone())
        .collect();
    Ok(Exported { files, random })
}

/// Refuses an output that exists and is not an empty folder, before any work.
fn check_target(output: &Path) -> Result<()> {
    match std::fs::read_dir(output).map(|mut entries| entries.next().is_none()) {
        Ok(true) => Ok(()),
        Ok(_) => bail!(
            "export folder {} exists and is not empty: give a new or empty folder (nothing \
             written)",
            output.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(_) if output.exists() && !output.is_dir() => bail!(
            "export folder {} exists and is not a folder (nothing written)",
            output.display()
        ),
        Err(e) => bail!("cannot read export folder {}: {e}", output.display()),
    }
}

/// The models to export, each loaded and checked, with their weights files found.
fn plan(opts: &ExportOptions) -> Result<Plan> {
    if !ensemble::is_ensemble(&opts.index) {
        let item = item(&opts.index, opts.weights.as_ref(), opts.quiet)?;
        return Ok(Plan {
            ensemble: None,
            items: vec![item],
        });
    }
    if opts.weights.is_some() {
        bail!(
            "--weights cannot be given for ensemble {}: each backbone's weights come from its \
             own model",
            opts.index.display()
        );
    }
    let info = ensemble::read_info(&opts.index)?;
    let mut items = Vec::new();
    for (path, m) in ensemble::member_paths(&opts.index, &info)
        .iter()
        .zip(&info.members)
    {
        ensemble::read_member(&opts.index, path, m)?;
        items.push(item(path, None, opts.quiet)?);
    }
    share_weights(&mut items);
    Ok(Plan {
        ensemble: Some(opts.index.clone()),
        items,
    })
}

/// The model `index` ready to export: its weights file found (downloaded into the cache if
/// needed), the model loaded with exactly that file (index and weights checksums, backbone),
/// and its sidecar checked to be written back with no field lost.
fn item(index: &Path, overridden: Option<&WeightsSpec>, quiet: bool) -> Result<Item> {
    let info = bank::read_info(index)?;
    let arch = crate::features::backbone::Arch::parse(&info.backbone)
        .with_context(|| format!("model sidecar {}", bank::sidecar_path(index).display()))?;
    let spec = single::model_weights(index, &info, overridden)?;
    let file = weights::local_file(&spec, arch, quiet)?;
    let sha256 = info.weights.sha256.clone();
    let load_spec = match &file {
        Some(path) => WeightsSpec::ModelFile {
            path: path.clone(),
            sha256: sha256.clone(),
        },
        None => spec,
    };
    let loaded = SingleModel::load(index, info, Some(&load_spec), Device::Cpu, quiet)?.info;
    let name = file
        .as_deref()
        .map(|f| weights::file_name(&loaded.backbone, &sha256, f))
        .transpose()?;
    let info = bank::rewritten(index, "weights_file", |i| i.weights_file = name.clone())?;
    if (ModelInfo {
        weights_file: loaded.weights_file.clone(),
        ..info.clone()
    }) != loaded
    {
        bail!(
            "model {} changed while it was exported (trained again?): nothing written, \
             export it again",
            index.display()
        );
    }
    Ok(Item {
        index: index.to_path_buf(),
        info,
        weights: file,
    })
}

/// Gives every model whose weights have the same SHA-256 the same weights file name, so
/// that the file is written once.
fn share_weights(items: &mut [Item]) {
    let mut names: HashMap<String, String> = HashMap::new();
    for item in items.iter_mut() {
        if let Some(name) = &item.info.weights_file {
            let shared = names
                .entry(item.info.weights.sha256.clone())
                .or_insert_with(|| name.clone());
            item.info.weights_file = Some(shared.clone());
        }
    }
}

/// The export's folder while it is written: a hidden sibling of DIR (`.DIR.tmp-PID-export`),
/// removed when dropped before `commit` renamed it to DIR. One left by a killed export is
/// removed by the next export to DIR.
struct Staging {
    path: PathBuf,
    committed: bool,
}

impl Staging {
    fn create(output: &Path) -> Result<Staging> {
        let parent = fsutil::folder(output);
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create folder {}", parent.display()))?;
        for (path, pid) in fsutil::temp_files(output) {
            if pid == std::process::id() || !fsutil::process_exists(pid) {
                let _ = std::fs::remove_dir_all(&path);
            }
        }
        let mut name = fsutil::own_temp_prefix(output);
        name.push("export");
        let path = parent.join(name);
        std::fs::create_dir(&path)
            .with_context(|| format!("cannot write in folder {}", parent.display()))?;
        Ok(Staging {
            path,
            committed: false,
        })
    }

    /// Renames the written folder to `output` (which may be an empty folder).
    fn commit(mut self, output: &Path) -> Result<()> {
        fsutil::sync_folder(&self.path)?;
        std::fs::rename(&self.path, output).map_err(|e| {
            anyhow!(
                "cannot write export folder {} ({e}; it must be new or empty): nothing written",
                output.display()
            )
        })?;
        self.committed = true;
        fsutil::sync_folder(fsutil::folder(output))
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Writes every file of the plan into `dir`.
fn write(plan: &Plan, dir: &Path) -> Result<()> {
    for item in &plan.items {
        crate::util::interrupt::check()?;
        let dest = dir.join(file_name(&item.index)?);
        copy(&item.index, &dest)?;
        bank::write_info(&dest, &item.info)?;
        copy_if_present(&plots::calibration_svg_path(&item.index), dir)?;
        if let (Some(src), Some(name)) = (&item.weights, &item.info.weights_file) {
            let dest = dir.join(name);
            if !dest.exists() {
                copy(src, &dest)?;
            }
        }
    }
    if let Some(index) = &plan.ensemble {
        copy_if_present(&bank::sidecar_path(index), dir)?;
        copy_if_present(&plots::calibration_svg_path(index), dir)?;
    }
    Ok(())
}

/// A path's file name, as a path in another folder.
fn file_name(path: &Path) -> Result<&std::ffi::OsStr> {
    path.file_name()
        .ok_or_else(|| anyhow!("{} is not a file path", path.display()))
}

/// Copies `src` to `dest`, flushed to disk, with the permissions a new file gets (0666 less
/// the umask), not the source's: a weights file kept private in a cache must still be readable
/// by the service account that runs the exported model.
fn copy(src: &Path, dest: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let copied = std::fs::File::open(src).and_then(|mut from| {
        let mut to = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o666)
            .open(dest)?;
        std::io::copy(&mut from, &mut to)?;
        to.sync_all()
    });
    copied.with_context(|| format!("cannot copy {} to {}", src.display(), dest.display()))
}

/// Copies `src` into the folder `dir` under its own name, if it exists.
fn copy_if_present(src: &Path, dir: &Path) -> Result<()> {
    if src.is_file() {
        copy(src, &dir.join(file_name(src)?))?;
    }
    Ok(())
}

/// Checks the written copy: every model's sidecar reads, its index matches it (checksum,
/// then read by FAISS), its weights file has the SHA-256 it records; an ensemble's sidecar
/// lists exactly the members written.
fn verify(plan: &Plan, dir: &Path) -> Result<()> {
    for item in &plan.items {
        let index = dir.join(file_name(&item.index)?);
        let info = bank::read_info(&index)?;
        bank::read_index(&index, &info)?;
        if let Some(path) = info.weights_path(&index) {
            weights::check_file(&path, &info.weights.sha256)?;
        }
    }
    if let Some(source) = &plan.ensemble {
        let index = dir.join(file_name(source)?);
        let info = ensemble::read_info(&index)?;
        for (path, m) in ensemble::member_paths(&index, &info)
            .iter()
            .zip(&info.members)
        {
            ensemble::read_member(&index, path, m)?;
        }
    }
    Ok(())
}

/// The files of `dir` with their sizes, by name.
fn listing(dir: &Path) -> Result<Vec<(String, u64)>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let entry = entry?;
        let size = entry.metadata()?.len();
        files.push((entry.file_name().to_string_lossy().into_owned(), size));
    }
    files.sort();
    Ok(files)
}

/// The end-of-run message of `export` (plain text, or a JSON line with every file).
pub fn log_summary(exported: &Exported, index: &Path, output: &Path) {
    let total: u64 = exported.files.iter().map(|(_, n)| n).sum();
    let names: Vec<&str> = exported.files.iter().map(|(n, _)| n.as_str()).collect();
    let random = match exported.random.first() {
        Some(spec) => format!(
            "; random weights ({spec}) need no weights file: the model loads without network \
             or cache as it is"
        ),
        None => String::new(),
    };
    let msg = format!(
        "exported {} to {}: {} files, {:.1} MB ({}){random}",
        index.display(),
        output.display(),
        names.len(),
        total as f64 / 1e6,
        names.join(", ")
    );
    log::emit(
        Level::Info,
        &msg,
        serde_json::json!({
            "event": "exported",
            "model": index.display().to_string(),
            "folder": output.display().to_string(),
            "files": exported.files.iter()
                .map(|(n, size)| serde_json::json!({"name": n, "bytes": size}))
                .collect::<Vec<_>>(),
            "bytes": total,
            "random_weights": exported.random,
        }),
    );
}
