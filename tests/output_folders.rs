//! Output folders: every command checks its output folder (a folder, writable, room for
//! what it writes where that can be estimated) before loading a backbone, in one error line
//! naming the folder, and leaves no empty folder behind when it fails before its work
//! starts; predict's results name each image's source file as given, and an output folder
//! holding an earlier run's outputs is refused, or with --overwrite cleared of exactly those.
//!
//! The checks are shown to come before any backbone loads by giving a weights file that does
//! not exist: the folder's error comes first. Read-only folders are made immutable with
//! `chattr +i`, which holds for root too (skipped where the file system does not support it);
//! a path under a regular file fails for everyone.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{assert_fails_naming, error_line, json, run, s, stderr, write_images, RESNET18_64};
use patchcore::util::synthetic::Defect;

/// A folder made immutable (`chattr +i`: no file can be created in it, even by root) until
/// dropped.
struct Immutable(PathBuf);

impl Immutable {
    fn new(dir: &Path) -> Option<Immutable> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("chattr")
            .arg("+i")
            .arg(dir)
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            common::skip("chattr +i is not available or not supported on this file system");
            return None;
        }
        Some(Immutable(dir.to_path_buf()))
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).output();
    }
}

const MISSING_WEIGHTS: &str = "/nonexistent/weights.safetensors";

/// `RESNET18_64` with weights that do not exist: a run fails when the backbone loads.
const RESNET18_64_MISSING: &[&str] = &[
    "--backbone",
    "resnet18",
    "--resize",
    "64",
    "--weights",
    MISSING_WEIGHTS,
];

#[test]
fn train_checks_its_folder_before_the_backbone_loads() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let train = r.join("train");
    write_images(&train, 6, 0, (64, 64), Defect::None);
    let args = |out: &Path| -> Vec<String> {
        let mut a: Vec<String> = ["train", "-q", "-i", s(&train), "-o", s(out)]
            .map(String::from)
            .to_vec();
        a.extend(RESNET18_64_MISSING.iter().map(|x| x.to_string()));
        a
    };
    let train_to = |out: &Path| {
        let a = args(out);
        run(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };

    // A path under a regular file.
    let file = r.join("file");
    std::fs::write(&file, "x").unwrap();
    let o = train_to(&file.join("sub/index.faiss"));
    let line = assert_fails_naming(&o, &[s(&file.join("sub")), "not a folder"]);
    assert!(!line.contains("weights"), "{line}");

    // A folder that does not take files.
    if let Some(ro) = Immutable::new(&r.join("ro")) {
        let o = train_to(&ro.0.join("index.faiss"));
        let line = assert_fails_naming(&o, &["cannot write in output folder", s(&ro.0)]);
        assert!(
            !line.contains("weights") && !line.contains("write-check"),
            "{line}"
        );
        assert!(
            line.contains("Operation not permitted"),
            "the reason: {line}"
        );
    }

    // Checked, created, and removed again when the backbone does not load.
    let new = r.join("new/deep");
    let o = train_to(&new.join("index.faiss"));
    assert_fails_naming(&o, &[MISSING_WEIGHTS]);
    assert!(!r.join("new").exists(), "no empty output folder left");
}

/// The bank is estimated before any feature is extracted: 20 images of 64 pixels (5 held
/// out), resnet18's layer2 grid of 8x8 patches, all kept, 1024 dims: 3.75 MiB, in a 1 MiB
/// tmpfs (mounted in a mount namespace of its own, which goes with the process).
#[test]
fn train_refuses_a_bank_larger_than_the_free_space() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let train = r.join("train");
    write_images(&train, 20, 0, (64, 64), Defect::None);
    let small = r.join("small");
    std::fs::create_dir(&small).unwrap();
    let script = format!(
        "mount -t tmpfs -o size=1m tmpfs '{}' || exit 99; exec \"$@\"",
        s(&small)
    );
    let index = small.join("index.faiss");
    let o = Command::new("unshare")
        .args(["-rm", "sh", "-c", &script, "sh"])
        .arg(env!("CARGO_BIN_EXE_patchcore"))
        .args(["train", "-q", "-i", s(&train), "-o", s(&index)])
        .args(RESNET18_64_MISSING)
        .args(["-s", "1"])
        .output();
    match o {
        Ok(o) if o.status.code() != Some(99) && !stderr(&o).contains("unshare:") => {
            assert_fails_naming(
                &o,
                &[
                    "not enough free space in output folder",
                    s(&small),
                    "the memory bank (15 images x 64 patches x ratio 1 x 1024 dims",
                ],
            );
        }
        Ok(o) => common::skip(&format!(
            "cannot mount a tmpfs in a mount namespace here: {}",
            stderr(&o)
        )),
        Err(e) => common::skip(&format!("unshare is not available: {e}")),
    }
}

#[test]
fn calibrate_merge_and_runall_check_their_folders_first() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let index = common::train_resnet18_small(r, &[]);
    let good = r.join("good");
    write_images(&good, 5, 300, (64, 64), Defect::None);

    // calibrate: the model's folder is written; checked before any image is scored.
    if let Some(ro) = Immutable::new(index.parent().unwrap()) {
        let o = run(&[
            "calibrate",
            "-q",
            "-i",
            s(&good),
            "--index",
            s(&index),
            "--weights",
            MISSING_WEIGHTS,
        ]);
        let line = assert_fails_naming(&o, &["cannot write in output folder", s(&ro.0)]);
        assert!(!line.contains("weights"), "{line}");
    }

    // merge: into a folder under a file, before the coreset.
    let part = r.join("part/part.faiss");
    let o = common::train(
        &r.join("train"),
        &part,
        &[RESNET18_64, &["-s", "0.25", "-q", "--partial"]].concat(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let file = r.join("file");
    std::fs::write(&file, "x").unwrap();
    let merged = file.join("m/merged.faiss");
    let o = run(&["merge", "-q", "-o", s(&merged), s(&part)]);
    assert_fails_naming(&o, &[s(&file.join("m")), "not a folder"]);

    // mvtec runall: its --out.
    let data = r.join("data");
    std::fs::create_dir_all(data.join("widget/train/good")).unwrap();
    std::fs::create_dir_all(data.join("widget/test")).unwrap();
    let o = run(&["mvtec", "runall", "--data", s(&data), "--out", s(&file)]);
    assert_fails_naming(&o, &["output folder", s(&file), "not a folder"]);
}

#[test]
fn predict_checks_its_folder_and_names_each_source() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let index = common::train_resnet18_small(r, &[]);
    let test = r.join("test");
    write_images(&test.join("a"), 2, 500, (64, 64), Defect::None);
    write_images(&r.join("single"), 1, 600, (64, 64), Defect::Spot);
    let predict = |inputs: &[&Path], out: &Path, extra: &[&str]| {
        let mut a = vec!["predict", "-q", "-o", s(out), "--index", s(&index)];
        for i in inputs {
            a.extend(["-i", s(i)]);
        }
        a.extend_from_slice(extra);
        run(&a)
    };

    // -o an existing file, or under one.
    let file = r.join("file");
    std::fs::write(&file, "x").unwrap();
    let o = predict(&[&test], &file, &[]);
    assert_fails_naming(&o, &[s(&file), "not a folder"]);
    let o = predict(&[&test], &file.join("out"), &[]);
    assert_fails_naming(&o, &[s(&file.join("out")), "not a folder"]);
    // A read-only folder is named as itself, not as the report's spool file.
    if let Some(ro) = Immutable::new(&r.join("ro")) {
        let o = predict(&[&test], &ro.0, &[]);
        let line = assert_fails_naming(&o, &["cannot write in output folder", s(&ro.0)]);
        assert!(!line.contains("spool"), "{line}");
        let o = predict(&[&test], &ro.0, &["--no-report"]);
        assert_fails_naming(&o, &["cannot write in output folder", s(&ro.0)]);
    }
    // A model that does not load leaves no empty output folder.
    let new = r.join("new/out");
    let o = predict(&[&test], &new, &["--weights", MISSING_WEIGHTS]);
    assert_fails_naming(&o, &[MISSING_WEIGHTS]);
    assert!(!r.join("new").exists(), "no empty output folder left");

    // Each result names its source as given: a folder's images under it, a file as given.
    let single = r.join("single/000.png");
    let out = r.join("out");
    let o = predict(&[&test, &single], &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut rows = csv::Reader::from_path(out.join("results.csv")).unwrap();
    let headers = rows.headers().unwrap().clone();
    let col = |name: &str| headers.iter().position(|h| h == name).unwrap();
    let (path, source) = (col("path"), col("source"));
    assert_eq!(col("score"), 1, "columns read by position keep their place");
    let got: Vec<(String, String)> = rows
        .records()
        .map(|r| {
            let r = r.unwrap();
            (r[path].to_string(), r[source].to_string())
        })
        .collect();
    let want = |p: &Path| p.to_str().unwrap().to_string();
    assert_eq!(
        got,
        [
            ("a/000.png".into(), want(&test.join("a/000.png"))),
            ("a/001.png".into(), want(&test.join("a/001.png"))),
            ("000.png".into(), want(&single)),
        ]
    );
    assert_eq!(
        json(&out.join("000.json"))["source"],
        want(&single).as_str()
    );
    let o = predict(&[&test], &r.join("jout"), &["--format", "json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let results = json(&r.join("jout/results.json"));
    assert_eq!(
        results["results"][1]["source"],
        want(&test.join("a/001.png")).as_str()
    );
    assert_eq!(results["errors"], 0);
}

/// The files under `dir`, relative, sorted.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap();
                out.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_reused_output_folder_holds_no_stale_file() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let index = common::train_resnet18_small(r, &[]);
    let first = r.join("first");
    write_images(&first.join("sub"), 3, 500, (64, 64), Defect::None);
    let second = r.join("second");
    write_images(&second, 1, 600, (64, 64), Defect::Spot);
    let out = r.join("out");
    let o = common::predict(&first, &out, &index);
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let before = files_under(&out);
    assert!(before.contains(&"sub/002.npy".to_string()), "{before:?}");

    // Refused, untouched.
    let o = common::predict(&second, &out, &index);
    let line = assert_fails_naming(&o, &[s(&out), "earlier run", "--overwrite"]);
    assert!(line.contains("results.csv"), "{line}");
    assert_eq!(files_under(&out), before);

    // --overwrite: the earlier run's files go (its folder too, emptied), the others stay.
    let o = common::predict_with(&second, &out, &index, &["-q", "--overwrite"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut want = vec![
        "000.jpg",
        "000.json",
        "000.npy",
        "index.html",
        "notes.txt",
        "results.csv",
    ];
    if out.join("000_mask.png").exists() {
        want.push("000_mask.png");
        want.sort();
    }
    assert_eq!(files_under(&out), want);
    assert!(!out.join("sub").exists());

    // A JSON run's files likewise, and --format csv after it leaves no results.json.
    let jout = r.join("jout");
    let o = common::predict_with(&first, &jout, &index, &["-q", "--format", "json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = common::predict_with(&second, &jout, &index, &["-q", "--format", "json"]);
    error_line(&o);
    let o = common::predict_with(&second, &jout, &index, &["-q", "--overwrite"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let left = files_under(&jout);
    assert!(
        !left
            .iter()
            .any(|f| f.starts_with("sub") || f == "results.json"),
        "{left:?}"
    );
}
