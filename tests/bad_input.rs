//! Bad input: a non-zero exit, one clear error line naming the file, no panic, and nothing
//! already written lost.

mod common;

use std::path::Path;

use common::{assert_fails_naming, run, s, stderr, train_small, write_images};
use patchcore::util::synthetic::Defect;

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
    assert_fails_naming(
        &run(&train_args(&missing, &root.path().join("i.faiss"))),
        &["does not exist", "nope"],
    );
}

#[test]
fn empty_folder_and_folder_without_images() {
    let root = tempfile::tempdir().unwrap();
    let empty = root.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert_fails_naming(
        &run(&train_args(&empty, &root.path().join("i.faiss"))),
        &["contains no images", "empty"],
    );

    let texts = root.path().join("texts");
    std::fs::create_dir(&texts).unwrap();
    std::fs::write(texts.join("readme.txt"), "hello").unwrap();
    assert_fails_naming(
        &run(&train_args(&texts, &root.path().join("i.faiss"))),
        &["contains no images"],
    );
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
    assert_fails_naming(&run(&train_args(&bad, &index)), &["002.png"]);
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
    assert_fails_naming(
        &common::predict(&root.path().join("train"), &out, &index),
        &["index.faiss.json"],
    );
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
    assert_fails_naming(&predict(), &["does not match its sidecar"]);

    // The same sidecar claiming another backbone.
    std::fs::write(&side, original.replace("wide_resnet50_2", "resnet18")).unwrap();
    assert_fails_naming(&predict(), &["index.faiss.json", "inconsistent"]);

    // ... or an unknown one, or another model format version.
    std::fs::write(&side, original.replace("wide_resnet50_2", "alexnet")).unwrap();
    assert_fails_naming(&predict(), &["unknown backbone 'alexnet'"]);
    // A backbone we have, whose layers have other names.
    std::fs::write(&side, original.replace("wide_resnet50_2", "vgg16")).unwrap();
    assert_fails_naming(&predict(), &["unknown layer 'layer2' for vgg16"]);
    std::fs::write(
        &side,
        original.replace("\"format_version\": 1", "\"format_version\": 99"),
    )
    .unwrap();
    assert_fails_naming(&predict(), &["format 99", "train the model again"]);

    // A damaged sidecar.
    std::fs::write(&side, &original[..original.len() / 2]).unwrap();
    assert_fails_naming(&predict(), &["index.faiss.json", "not valid JSON"]);
}

#[test]
fn truncated_index_is_never_handed_to_faiss() {
    let root = tempfile::tempdir().unwrap();
    let index = train_small(root.path(), 2);
    let bytes = std::fs::read(&index).unwrap();
    std::fs::write(&index, &bytes[..bytes.len() / 3]).unwrap();
    assert_fails_naming(
        &common::predict(&root.path().join("train"), &root.path().join("o"), &index),
        &["does not match its sidecar"],
    );
}

/// One changed byte anywhere in the index is refused before FAISS reads it, by the BLAKE3
/// the sidecar records; a model from before that field (SHA-256 only) still loads, still
/// checked.
#[test]
fn a_changed_index_is_refused_by_either_checksum() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let index = train_small(r, 2);
    let side = index.with_extension("faiss.json");
    let original = std::fs::read_to_string(&side).unwrap();
    let mut sidecar: serde_json::Value = serde_json::from_str(&original).unwrap();
    let blake3 = sidecar["index_blake3"].as_str().unwrap().to_string();
    assert_eq!(
        blake3,
        patchcore::util::fsutil::blake3_file(&index).unwrap()
    );
    let good = std::fs::read(&index).unwrap();
    let predict = |out: &str| common::predict(&r.join("train"), &r.join(out), &index);
    let o = predict("new");
    assert!(o.status.success(), "{}", stderr(&o));

    let mut bad = good.clone();
    let middle = bad.len() / 2;
    bad[middle] ^= 0x10;
    std::fs::write(&index, &bad).unwrap();
    assert_fails_naming(
        &predict("bad"),
        &["model/index.faiss", "does not match its sidecar"],
    );

    // An older sidecar: no index_blake3. Its SHA-256 is checked instead.
    sidecar.as_object_mut().unwrap().remove("index_blake3");
    std::fs::write(&side, serde_json::to_string_pretty(&sidecar).unwrap()).unwrap();
    assert_fails_naming(&predict("old-bad"), &["does not match its sidecar"]);
    std::fs::write(&index, &good).unwrap();
    let o = predict("old");
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(r.join("old/000.npy")).unwrap(),
        std::fs::read(r.join("new/000.npy")).unwrap(),
        "an older model scores as before"
    );
}

#[test]
fn predict_refuses_to_overwrite_input_images() {
    let root = tempfile::tempdir().unwrap();
    let index = train_small(root.path(), 2);
    let dir = root.path().join("jpgs");
    std::fs::create_dir(&dir).unwrap();
    let (img, _) = patchcore::util::synthetic::render(1, 64, 64, Defect::None);
    img.save(dir.join("a.jpg")).unwrap();
    let before = std::fs::read(dir.join("a.jpg")).unwrap();
    assert_fails_naming(
        &common::predict(&dir, &dir, &index),
        &["would overwrite input image"],
    );
    assert_eq!(std::fs::read(dir.join("a.jpg")).unwrap(), before);
}

#[test]
fn odd_images_are_converted() {
    // One picture stored in many ways; each decodes to the same 8-bit RGB pixels (gray
    // replicated, 16 bits scaled, alpha dropped, palette looked up), so each scores the same
    // as its plain 8-bit RGB form, and the heatmap keeps the original size.
    let root = tempfile::tempdir().unwrap();
    let index = train_small(root.path(), 2);
    let dir = root.path().join("odd");
    std::fs::create_dir(&dir).unwrap();
    let (img, _) = patchcore::util::synthetic::render(9, 80, 64, Defect::Spot);
    // A colour cast, so the colour and the gray forms differ.
    let color = image::RgbImage::from_fn(80, 64, |x, y| {
        let p = img.get_pixel(x, y);
        image::Rgb([p[0], p[1].saturating_sub(40), p[2].saturating_add(30)])
    });
    let alpha = |x: u32, y: u32| ((x * 7 + y * 3) % 256) as u8;
    let wide = |v: u8| v as u16 * 257;

    // The colour group.
    color.save(dir.join("rgb.png")).unwrap();
    image::RgbaImage::from_fn(80, 64, |x, y| {
        let p = color.get_pixel(x, y);
        image::Rgba([p[0], p[1], p[2], alpha(x, y)])
    })
    .save(dir.join("rgba.png"))
    .unwrap();
    image::ImageBuffer::<image::Rgb<u16>, Vec<u16>>::from_fn(80, 64, |x, y| {
        let p = color.get_pixel(x, y);
        image::Rgb([wide(p[0]), wide(p[1]), wide(p[2])])
    })
    .save(dir.join("rgb16.tiff"))
    .unwrap();
    color.save(dir.join("plain.bmp")).unwrap();

    // The gray group.
    let gray = image::DynamicImage::ImageRgb8(color.clone()).to_luma8();
    image::DynamicImage::ImageLuma8(gray.clone())
        .to_rgb8()
        .save(dir.join("gray_as_rgb.png"))
        .unwrap();
    gray.save(dir.join("gray.png")).unwrap();
    image::ImageBuffer::<image::Luma<u16>, Vec<u16>>::from_fn(80, 64, |x, y| {
        image::Luma([wide(gray.get_pixel(x, y)[0])])
    })
    .save(dir.join("gray16.png"))
    .unwrap();
    image::GrayAlphaImage::from_fn(80, 64, |x, y| {
        image::LumaA([gray.get_pixel(x, y)[0], alpha(x, y)])
    })
    .save(dir.join("gray_alpha.png"))
    .unwrap();
    let mut palette_png = Vec::new();
    {
        // Palette entry i is (255 - i) gray, so indices and values differ.
        let mut enc = png::Encoder::new(&mut palette_png, 80, 64);
        enc.set_color(png::ColorType::Indexed);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_palette((0..=255u8).flat_map(|i| [255 - i; 3]).collect::<Vec<_>>());
        let mut w = enc.write_header().unwrap();
        let data: Vec<u8> = gray.pixels().map(|p| 255 - p[0]).collect();
        w.write_image_data(&data).unwrap();
    }
    std::fs::write(dir.join("palette.png"), palette_png).unwrap();

    let out = root.path().join("out");
    let o = common::predict(&dir, &out, &index);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut rows = csv::Reader::from_path(out.join("results.csv")).unwrap();
    let scores: std::collections::HashMap<String, f32> = rows
        .records()
        .map(|r| {
            let r = r.unwrap();
            (r[0].to_string(), r[1].parse().unwrap())
        })
        .collect();
    for (reference, same) in [
        ("rgb.png", &["rgba.png", "rgb16.tiff", "plain.bmp"][..]),
        (
            "gray_as_rgb.png",
            &["gray.png", "gray16.png", "gray_alpha.png", "palette.png"][..],
        ),
    ] {
        let want = scores[reference];
        for name in same {
            // Equal up to float rounding (images may land in batches of different sizes).
            assert!(
                (scores[*name] - want).abs() <= 1e-5 * want,
                "{name} scores unlike {reference}: {scores:?}"
            );
            let stem = name.split('.').next().unwrap();
            let heat: ndarray::Array2<f32> =
                ndarray_npy::read_npy(out.join(format!("{stem}.npy"))).unwrap();
            assert_eq!(heat.dim(), (64, 80), "{name}");
        }
    }
    let (c, g) = (scores["rgb.png"], scores["gray_as_rgb.png"]);
    assert!(
        (c - g).abs() > 1e-3 * c,
        "the two groups differ: {c} vs {g}"
    );
}

#[test]
fn index_names_and_file_messages() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    write_images(&r.join("train"), 12, 0, (64, 64), Defect::None);

    // train's bank kind is --bank-index; --index, what names the model elsewhere, is taken
    // as the old spelling only for flat or ivf, and a model path points at -o.
    let (train_dir, m, ivf) = (r.join("train"), r.join("m.faiss"), r.join("ivf.faiss"));
    let mut args = train_args(&train_dir, &m);
    args.extend(["--index", "m.faiss"]);
    let line = assert_fails_naming(
        &run(&args),
        &[
            "'m.faiss'",
            "--index",
            "-o m.faiss",
            "--bank-index flat|ivf",
        ],
    );
    assert!(!line.contains("possible values"), "{line}");
    assert!(!r.join("m.faiss").exists());
    let help = stderr(&run(&["train", "--help"]))
        + &String::from_utf8_lossy(&run(&["train", "--help"]).stdout);
    assert!(help.contains("--bank-index <KIND>"), "{help}");
    assert!(!help.contains("--index "), "{help}");
    let mut args = train_args(&train_dir, &ivf);
    args.extend(["--index", "ivf", "--nlist", "2"]);
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        common::json(&r.join("ivf.faiss.json"))["index"]["kind"],
        "ivf"
    );

    // --index names the sidecar: the model beside it, not a sidecar X.json.json.
    let model = r.join("ivf.faiss.json");
    let o = common::predict_with(&r.join("train/000.png"), &r.join("p"), &model, &["-q"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains(".json.json"));

    // An empty image says so.
    std::fs::write(r.join("empty.png"), b"").unwrap();
    let o = common::predict_with(&r.join("empty.png"), &r.join("q"), &model, &["-q"]);
    assert_fails_naming(&o, &["empty.png", "is empty"]);
}
