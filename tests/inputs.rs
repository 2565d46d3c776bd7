//! predict's inputs: image files as well as folders, several `-i`, and inputs whose outputs
//! would land on the same file refused before anything is written.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;

use common::{assert_fails_naming, error_line, stderr};
use patchcore::util::synthetic::{self, Defect};

/// One small model shared by the tests of this file.
fn model() -> &'static Path {
    static MODEL: OnceLock<PathBuf> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        common::train_small(&dir, 2)
    })
}

/// `patchcore predict -q -i IN... -o OUT` with the shared model, then `extra`.
fn predict(inputs: &[&Path], out: &Path, extra: &[&str]) -> Output {
    let mut cmd = common::bin();
    cmd.arg("predict");
    for i in inputs {
        cmd.arg("-i").arg(i);
    }
    cmd.arg("-o").arg(out).arg("--index").arg(model());
    cmd.args(["-q"]).args(extra);
    cmd.output().unwrap()
}

fn save(path: &Path, seed: u64, format: image::ImageFormat) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let (img, _) = synthetic::render(seed, 64, 48, Defect::None);
    img.save_with_format(path, format).unwrap();
}

/// Every file under `dir`, relative, sorted.
fn files_under(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    let mut out = Vec::new();
    if dir.exists() {
        walk(dir, dir, &mut out);
    }
    out.sort();
    out
}

/// `path,score` of results.csv.
fn scores(out: &Path) -> Vec<(String, f32)> {
    let mut r = csv::Reader::from_path(out.join("results.csv")).unwrap();
    r.records()
        .map(|rec| {
            let rec = rec.unwrap();
            (rec[0].to_string(), rec[1].parse().unwrap())
        })
        .collect()
}

#[test]
fn files_and_folders_mix_and_files_are_named_after_themselves() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    save(&r.join("loose/part.png"), 1, image::ImageFormat::Png);
    save(&r.join("other/b.bmp"), 2, image::ImageFormat::Bmp);
    save(&r.join("dir/x/0.png"), 3, image::ImageFormat::Png);
    save(&r.join("dir/y/0.png"), 4, image::ImageFormat::Png);
    let out = r.join("out");
    let o = predict(
        &[
            &r.join("loose/part.png"),
            &r.join("other/b.bmp"),
            &r.join("dir"),
        ],
        &out,
        &["--format", "json"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let paths: Vec<&str> = run["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        ["part.png", "b.bmp", "x/0.png", "y/0.png"],
        "in order given"
    );
    for stem in ["part", "b", "x/0", "y/0"] {
        for suffix in [".npy", ".jpg", ".json"] {
            assert!(
                out.join(format!("{stem}{suffix}")).is_file(),
                "{stem}{suffix}"
            );
        }
    }

    // A file scores the same alone as inside its folder.
    let alone = r.join("alone");
    let o = predict(&[&r.join("dir/y/0.png")], &alone, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = scores(&alone);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].0, "0.png");
    let in_folder = run["results"][3]["score"].as_f64().unwrap() as f32;
    assert!(
        (s[0].1 - in_folder).abs() <= 1e-4 * in_folder,
        "{} vs {in_folder}",
        s[0].1
    );
    assert!(alone.join("0.npy").is_file() && alone.join("index.html").is_file());

    // A file given by name is scored whatever its extension (decoding checks the content);
    // a missing one is named.
    std::fs::copy(r.join("loose/part.png"), r.join("loose/part.data")).unwrap();
    let o = predict(&[&r.join("loose/part.data")], &r.join("ext"), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(r.join("ext/part.npy").is_file());
    let o = predict(&[&r.join("loose/nope.png")], &r.join("missing"), &[]);
    assert_fails_naming(&o, &["nope.png", "does not exist"]);
}

/// Asserts predict refuses before writing anything, naming `names` in its one error line.
fn refused(inputs: &[&Path], out: &Path, extra: &[&str], names: &[&str]) -> String {
    let o = predict(inputs, out, extra);
    let line = assert_fails_naming(&o, names);
    assert_eq!(
        files_under(out),
        Vec::<String>::new(),
        "nothing written: {line}"
    );
    line
}

#[test]
fn inputs_writing_the_same_outputs_are_refused_before_anything_is_written() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    // The reported bug: a.png and a.bmp in one folder both write a.npy, a.jpg, ...
    let same_stem = r.join("same_stem");
    save(&same_stem.join("a.png"), 1, image::ImageFormat::Png);
    save(&same_stem.join("a.bmp"), 2, image::ImageFormat::Bmp);
    save(&same_stem.join("b.png"), 3, image::ImageFormat::Png);
    let line = refused(&[&same_stem], &r.join("o1"), &[], &["a.png", "a.bmp"]);
    assert!(line.contains("would both write"), "{line}");

    // ... in a sub-folder, too.
    let nested = r.join("nested");
    save(&nested.join("sub/c.png"), 1, image::ImageFormat::Png);
    save(&nested.join("sub/c.tif"), 2, image::ImageFormat::Tiff);
    refused(&[&nested], &r.join("o2"), &[], &["sub/c.png", "sub/c.tif"]);

    // Two folders given with -i whose images have the same relative path.
    let (d1, d2) = (r.join("d1"), r.join("d2"));
    save(&d1.join("000.png"), 1, image::ImageFormat::Png);
    save(&d2.join("000.png"), 2, image::ImageFormat::Png);
    refused(
        &[&d1, &d2],
        &r.join("o3"),
        &[],
        &["d1/000.png", "d2/000.png"],
    );

    // Two files of the same name from different folders, or a file and a folder's image.
    refused(
        &[&d1.join("000.png"), &d2.join("000.png")],
        &r.join("o4"),
        &[],
        &["d1/000.png", "d2/000.png"],
    );
    refused(
        &[&d1.join("000.png"), &d2],
        &r.join("o5"),
        &[],
        &["d1/000.png", "d2/000.png"],
    );
    // The same file twice.
    refused(
        &[&d1.join("000.png"), &d1.join("000.png")],
        &r.join("o6"),
        &[],
        &["d1/000.png"],
    );

    // An image whose NAME.json is the run's results.json.
    let results = r.join("results_img");
    save(&results.join("results.png"), 1, image::ImageFormat::Png);
    refused(
        &[&results],
        &r.join("o7"),
        &["--format", "json"],
        &["results.png", "results.json"],
    );
    // ... which is fine with results.csv.
    let o = predict(&[&results], &r.join("o7csv"), &[]);
    assert!(o.status.success(), "{}", stderr(&o));

    // An output file where another image's outputs need a folder.
    let clash = r.join("clash");
    save(&clash.join("x.png"), 1, image::ImageFormat::Png);
    save(&clash.join("x.jpg/0.png"), 2, image::ImageFormat::Png);
    refused(&[&clash], &r.join("o8"), &[], &["x.png", "x.jpg/0.png"]);

    // An existing output folder keeps what it had.
    let kept = r.join("kept");
    std::fs::create_dir(&kept).unwrap();
    std::fs::write(kept.join("a.npy"), b"old").unwrap();
    let o = predict(&[&same_stem], &kept, &[]);
    error_line(&o);
    assert_eq!(files_under(&kept), ["a.npy"]);
    assert_eq!(std::fs::read(kept.join("a.npy")).unwrap(), b"old");
}
