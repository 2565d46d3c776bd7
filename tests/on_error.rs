//! `predict --on-error skip`: an empty, a truncated and a not-an-image file among good ones are
//! listed with their one-line reason (verdict "error", no score) in results.csv,
//! results.json and the report, the others are scored as without them, and the run exits 3.
//! The default (abort) is unchanged.

mod common;

use std::path::Path;

use common::{error_line, json, s, stderr, write_images};
use patchcore::util::synthetic::Defect;

/// A model, and a folder of 3 good images with an empty file, a PNG cut in half and a text
/// file named .png among them.
fn setup(root: &Path, extra: &[&str]) -> (std::path::PathBuf, std::path::PathBuf) {
    let index = common::train_resnet18_small(root, extra);
    let test = root.join("test");
    write_images(&test, 3, 500, (64, 64), Defect::None);
    std::fs::write(test.join("001b_empty.png"), b"").unwrap();
    let png = std::fs::read(test.join("000.png")).unwrap();
    std::fs::write(test.join("002b_half.png"), &png[..png.len() / 2]).unwrap();
    std::fs::write(test.join("003_text.png"), b"not an image\n").unwrap();
    (index, test)
}

const BAD: [&str; 3] = ["001b_empty.png", "002b_half.png", "003_text.png"];

#[test]
fn skip_lists_bad_images_scores_the_rest_and_exits_3() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let (index, test) = setup(r, &[]);

    // The default stops at the first bad file.
    let o = common::predict(&test, &r.join("abort"), &index);
    assert_eq!(o.status.code(), Some(1));
    error_line(&o);
    assert!(!r.join("abort/results.csv").exists());

    // The good images alone, for their scores.
    let good = r.join("good");
    write_images(&good, 3, 500, (64, 64), Defect::None);
    let o = common::predict(&good, &r.join("good_out"), &index);
    assert!(o.status.success(), "{}", stderr(&o));
    let alone: Vec<csv::StringRecord> = csv::Reader::from_path(r.join("good_out/results.csv"))
        .unwrap()
        .records()
        .map(Result::unwrap)
        .collect();

    let out = r.join("out");
    let o = common::predict_with(&test, &out, &index, &["--on-error", "skip"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let err = stderr(&o);
    for bad in BAD {
        assert!(
            err.contains(&format!("skipped {}", s(&test.join(bad)))),
            "{err}"
        );
    }
    let mut reader = csv::Reader::from_path(out.join("results.csv")).unwrap();
    let headers = reader.headers().unwrap().clone();
    let col = |name: &str| headers.iter().position(|h| h == name).unwrap();
    let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    let names: Vec<&str> = rows.iter().map(|r| &r[0]).collect();
    assert_eq!(
        names,
        [
            "000.png",
            "001.png",
            "001b_empty.png",
            "002.png",
            "002b_half.png",
            "003_text.png"
        ],
        "input order"
    );
    for row in &rows {
        let name = &row[0];
        if BAD.contains(&name) {
            assert_eq!(&row[col("verdict")], "error", "{name}");
            assert_eq!(&row[col("score")], "", "{name}: no score");
            let reason = &row[col("error")];
            assert!(
                reason.contains(name) && !reason.contains('\n'),
                "{name}: {reason}"
            );
            let stem = name.trim_end_matches(".png");
            assert!(!out.join(format!("{stem}.npy")).exists());
        } else {
            let same = alone.iter().find(|a| &a[0] == name).unwrap();
            assert_eq!(&row[1], &same[1], "{name} scores as without the bad ones");
            assert_ne!(&row[col("verdict")], "error");
            assert_eq!(&row[col("error")], "");
        }
    }

    // The report lists them with their reasons.
    let html = std::fs::read_to_string(out.join("index.html")).unwrap();
    assert_eq!(html.matches("data-verdict=\"error\"").count(), 3);
    for bad in BAD {
        assert!(html.contains(&format!("data-name=\"{bad}\"")), "{bad}");
    }
    let reason = &rows[2][col("error")];
    assert!(
        html.contains(&patchcore::outputs::report::escape(reason)),
        "{reason}"
    );

    // results.json likewise.
    let o = common::predict_with(
        &test,
        &r.join("jout"),
        &index,
        &["-q", "--on-error", "skip", "--format", "json"],
    );
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let v = json(&r.join("jout/results.json"));
    assert_eq!(v["errors"], 3);
    assert_eq!(v["images"], 6);
    let empty = &v["results"][2];
    assert_eq!(empty["verdict"], "error");
    assert!(empty["score"].is_null());
    assert!(empty["error"].as_str().unwrap().contains("001b_empty.png"));
    assert!(v["results"][0].get("error").is_none());

    // Only good files: exit 0, as without the option.
    let o = common::predict_with(
        &good,
        &r.join("all_good"),
        &index,
        &["-q", "--on-error", "skip"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn skip_works_for_an_ensemble() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let (index, test) = setup(r, &["--backbone", "resnet18:layer2,layer3"]);
    let out = r.join("out");
    let o = common::predict_with(&test, &out, &index, &["-q", "--on-error", "skip"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let rows = common::csv_rows(&out.join("results.csv"));
    assert_eq!(rows.len(), 6);
    assert_eq!(rows.iter().filter(|r| &r[3] == "error").count(), 3);
    assert!(out.join("002.npy").exists());
}
