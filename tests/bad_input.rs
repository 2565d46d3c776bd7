//! Bad input: a non-zero exit, one clear error line naming the file, no panic, and nothing
//! already written lost.

mod common;

use std::path::Path;

use common::{error_line, run, stderr, train_small, write_images};
use patchcore::synthetic::Defect;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn train_args<'a>(input: &'a Path, output: &'a Path) -> Vec<&'a str> {
    vec![
        "train",
        "-i",
        s(input),
        "-o",
        s(output),
        "--weights",
        "random:0",
        "--resize",
        "64",
        "-q",
    ]
}

#[test]
fn missing_input_folder() {
    let root = tempfile::tempdir().unwrap();
    let missing = root.path().join("nope");
    let line = error_line(&run(&train_args(&missing, &root.path().join("i.faiss"))));
    assert!(
        line.contains("does not exist") && line.contains("nope"),
        "{line}"
    );
}

#[test]
fn empty_folder_and_folder_without_images() {
    let root = tempfile::tempdir().unwrap();
    let empty = root.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let line = error_line(&run(&train_args(&empty, &root.path().join("i.faiss"))));
    assert!(
        line.contains("contains no images") && line.contains("empty"),
        "{line}"
    );

    let texts = root.path().join("texts");
    std::fs::create_dir(&texts).unwrap();
    std::fs::write(texts.join("readme.txt"), "hello").unwrap();
    let line = error_line(&run(&train_args(&texts, &root.path().join("i.faiss"))));
    assert!(line.contains("contains no images"), "{line}");
}

#[test]
fn corrupt_image_is_named_and_the_old_model_survives() {
    let root = tempfile::tempdir().unwrap();
    let index = train_small(root.path(), 2);
    let before = std::fs::read(&index).unwrap();
    let side = index.with_extension("faiss.json");
    let side_before = std::fs::read(&side).unwrap();

    let bad = root.path().join("bad");
    write_images(&bad, 2, 0, (64, 64), Defect::None);
    std::fs::write(bad.join("002.png"), b"\x89PNG\r\n\x1a\n truncated").unwrap();
    let line = error_line(&run(&train_args(&bad, &index)));
    assert!(line.contains("002.png"), "{line}");
    assert_eq!(std::fs::read(&index).unwrap(), before, "old index intact");
    assert_eq!(
        std::fs::read(&side).unwrap(),
        side_before,
        "old sidecar intact"
    );
    let leftovers: Vec<_> = std::fs::read_dir(index.parent().unwrap())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(leftovers.len(), 2, "no temporary files left: {leftovers:?}");
}

#[test]
fn index_without_sidecar() {
    let root = tempfile::tempdir().unwrap();
    let index = train_small(root.path(), 2);
    std::fs::remove_file(index.with_extension("faiss.json")).unwrap();
    let out = root.path().join("out");
    let line = error_line(&common::predict(&root.path().join("train"), &out, &index));
    assert!(line.contains("index.faiss.json"), "{line}");
    assert!(!out.join("results.csv").exists());
}

#[test]
fn sidecar_from_another_training_or_backbone() {
    let root = tempfile::tempdir().unwrap();
    let index = train_small(root.path(), 2);
    let side = index.with_extension("faiss.json");
    let original = std::fs::read_to_string(&side).unwrap();
    let predict = || common::predict(&root.path().join("train"), &root.path().join("out"), &index);

    // A sidecar of a resnet18 model next to this index: the checksum tells them apart.
    let other = root.path().join("other");
    write_images(&other, 2, 0, (64, 64), Defect::None);
    let other_index = root.path().join("other.faiss");
    let mut args = train_args(&other, &other_index);
    args.extend(["--backbone", "resnet18"]);
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::copy(other_index.with_extension("faiss.json"), &side).unwrap();
    let line = error_line(&predict());
    assert!(line.contains("does not match its sidecar"), "{line}");

    // The same sidecar claiming another backbone.
    std::fs::write(&side, original.replace("wide_resnet50_2", "resnet18")).unwrap();
    let line = error_line(&predict());
    assert!(
        line.contains("index.faiss.json") && line.contains("inconsistent"),
        "{line}"
    );

    // ... or an unknown one, or another model format version.
    std::fs::write(&side, original.replace("wide_resnet50_2", "vgg16")).unwrap();
    let line = error_line(&predict());
    assert!(line.contains("unknown backbone 'vgg16'"), "{line}");
    std::fs::write(
        &side,
        original.replace("\"format_version\": 1", "\"format_version\": 99"),
    )
    .unwrap();
    let line = error_line(&predict());
    assert!(
        line.contains("format 99") && line.contains("train the model again"),
        "{line}"
    );

    // A damaged sidecar.
    std::fs::write(&side, &original[..original.len() / 2]).unwrap();
    let line = error_line(&predict());
    assert!(
        line.contains("index.faiss.json") && line.contains("not valid JSON"),
        "{line}"
    );
}

#[test]
fn truncated_index_is_never_handed_to_faiss() {
    let root = tempfile::tempdir().unwrap();
    let index = train_small(root.path(), 2);
    let bytes = std::fs::read(&index).unwrap();
    std::fs::write(&index, &bytes[..bytes.len() / 3]).unwrap();
    let line = error_line(&common::predict(
        &root.path().join("train"),
        &root.path().join("o"),
        &index,
    ));
    assert!(line.contains("does not match its sidecar"), "{line}");
}

#[test]
fn predict_refuses_to_overwrite_input_images() {
    let root = tempfile::tempdir().unwrap();
    let index = train_small(root.path(), 2);
    let dir = root.path().join("jpgs");
    std::fs::create_dir(&dir).unwrap();
    let (img, _) = patchcore::synthetic::render(1, 64, 64, Defect::None);
    img.save(dir.join("a.jpg")).unwrap();
    let before = std::fs::read(dir.join("a.jpg")).unwrap();
    let line = error_line(&common::predict(&dir, &dir, &index));
    assert!(line.contains("would overwrite input image"), "{line}");
    assert_eq!(std::fs::read(dir.join("a.jpg")).unwrap(), before);
}

#[test]
fn odd_images_are_converted() {
    // Grayscale, RGBA and 16-bit inputs all work; the heatmap keeps each original size.
    let root = tempfile::tempdir().unwrap();
    let index = train_small(root.path(), 2);
    let dir = root.path().join("odd");
    std::fs::create_dir(&dir).unwrap();
    let (img, _) = patchcore::synthetic::render(9, 80, 64, Defect::None);
    let dynimg = image::DynamicImage::ImageRgb8(img);
    dynimg.to_luma8().save(dir.join("gray.png")).unwrap();
    dynimg.to_rgba8().save(dir.join("rgba.png")).unwrap();
    dynimg.to_luma16().save(dir.join("gray16.png")).unwrap();
    dynimg.to_rgb16().save(dir.join("rgb16.tiff")).unwrap();
    dynimg.to_rgb8().save(dir.join("plain.bmp")).unwrap();
    let out = root.path().join("out");
    let o = common::predict(&dir, &out, &index);
    assert!(o.status.success(), "{}", stderr(&o));
    for name in ["gray", "rgba", "gray16", "rgb16", "plain"] {
        let heat: ndarray::Array2<f32> =
            ndarray_npy::read_npy(out.join(format!("{name}.npy"))).unwrap();
        assert_eq!(heat.dim(), (64, 80), "{name}");
    }
}
