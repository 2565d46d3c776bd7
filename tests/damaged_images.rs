//! Cut and damaged image files are refused, naming the file, in every format and by every
//! command that decodes images; intact ones still work. All files are made here.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::{error_line, stderr};
use image::ImageFormat;
use patchcore::util::synthetic::{self, Defect};

/// A small resnet18 model with random weights, shared by the tests of this file.
fn model() -> &'static Path {
    static MODEL: OnceLock<PathBuf> = OnceLock::new();
    MODEL.get_or_init(|| {
        let root = tempfile::tempdir().unwrap().keep();
        let train = root.join("train");
        common::write_images(&train, 12, 0, (96, 96), Defect::None);
        let index = root.join("index.faiss");
        let o = common::train(&train, &index, &small_model());
        assert!(o.status.success(), "{}", stderr(&o));
        index
    })
}

fn small_model() -> Vec<&'static str> {
    let args = "--backbone resnet18 --weights random:0 --resize 96 -s 0.25 -q";
    args.split(' ').collect()
}

/// A 256x192 picture with fine detail (so its JPEG is well over 2,000 bytes) in `format`.
fn encoded(format: ImageFormat) -> Vec<u8> {
    let (img, _) = synthetic::render(3, 256, 192, Defect::Spot);
    let mut buf = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut buf, format)
        .unwrap();
    buf.into_inner()
}

/// A plain 8-bit gray TIFF laid out as many writers do, unlike image's encoder: its
/// directory first, then one strip of pixels (so a cut leaves the directory whole).
fn tiff_directory_first(w: u16, h: u16) -> Vec<u8> {
    let data_at = 8 + 2 + 9 * 12 + 4;
    let entries: [(u16, u16, u32); 9] = [
        (256, 3, w as u32),            // ImageWidth
        (257, 3, h as u32),            // ImageLength
        (258, 3, 8),                   // BitsPerSample
        (259, 3, 1),                   // Compression: none
        (262, 3, 1),                   // PhotometricInterpretation: black is zero
        (273, 4, data_at),             // StripOffsets
        (277, 3, 1),                   // SamplesPerPixel
        (278, 3, h as u32),            // RowsPerStrip
        (279, 4, w as u32 * h as u32), // StripByteCounts
    ];
    let mut b = b"II*\0".to_vec();
    b.extend(8u32.to_le_bytes());
    b.extend(9u16.to_le_bytes());
    for (tag, kind, value) in entries {
        b.extend(tag.to_le_bytes());
        b.extend(kind.to_le_bytes());
        b.extend(1u32.to_le_bytes());
        b.extend(value.to_le_bytes());
    }
    b.extend(0u32.to_le_bytes());
    assert_eq!(b.len(), data_at as usize);
    b.extend((0..w as u32 * h as u32).map(|i| (i * 7 % 251) as u8));
    b
}

/// Where chunk `kind` of a PNG starts (its length field) and its data length.
fn png_chunk(png: &[u8], kind: &[u8; 4]) -> (usize, usize) {
    let at = png.windows(4).position(|w| w == kind).unwrap() - 4;
    let len = u32::from_be_bytes(png[at..at + 4].try_into().unwrap()) as usize;
    (at, len)
}

/// Every damaged file the tests try, by name: cut at several points, or with a flipped
/// checksum byte.
fn damaged() -> Vec<(&'static str, Vec<u8>)> {
    let jpg = encoded(ImageFormat::Jpeg);
    assert!(jpg.len() > 4000, "the JPEG is {} bytes", jpg.len());
    let png = encoded(ImageFormat::Png);
    let bmp = encoded(ImageFormat::Bmp);
    let tiff = encoded(ImageFormat::Tiff);
    let strips_last = tiff_directory_first(200, 150);
    let flip = |bytes: &[u8], at: usize| {
        let mut b = bytes.to_vec();
        b[at] ^= 0x01;
        b
    };
    let (idat, idat_len) = png_chunk(&png, b"IDAT");
    let (iend, _) = png_chunk(&png, b"IEND");
    vec![
        ("cut2000.jpg", jpg[..2000].to_vec()),
        ("half.jpg", jpg[..jpg.len() / 2].to_vec()),
        ("no_eoi.jpg", jpg[..jpg.len() - 2].to_vec()),
        ("last_byte.jpg", jpg[..jpg.len() - 1].to_vec()),
        ("no_iend.png", png[..iend].to_vec()),
        ("iend_cut.png", png[..png.len() - 2].to_vec()),
        ("idat_crc.png", flip(&png, idat + 8 + idat_len)),
        ("iend_crc.png", flip(&png, png.len() - 1)),
        ("half.png", png[..png.len() / 2].to_vec()),
        ("half.bmp", bmp[..bmp.len() / 2].to_vec()),
        ("last_byte.bmp", bmp[..bmp.len() - 1].to_vec()),
        ("half.tiff", tiff[..tiff.len() / 2].to_vec()),
        ("last_byte.tiff", tiff[..tiff.len() - 1].to_vec()),
        (
            "half_strip.tif",
            strips_last[..strips_last.len() / 2].to_vec(),
        ),
        (
            "strip_byte.tif",
            strips_last[..strips_last.len() - 1].to_vec(),
        ),
    ]
}

fn intact() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("a.jpg", encoded(ImageFormat::Jpeg)),
        ("b.png", encoded(ImageFormat::Png)),
        ("c.bmp", encoded(ImageFormat::Bmp)),
        ("d.tiff", encoded(ImageFormat::Tiff)),
        ("e.tif", tiff_directory_first(200, 150)),
    ]
}

fn folder(root: &Path, name: &str, files: &[(&str, Vec<u8>)]) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for (file, bytes) in files {
        std::fs::write(dir.join(file), bytes).unwrap();
    }
    dir
}

/// The error line of a failed run, checked to name `file` as damaged or truncated.
fn refused(o: &std::process::Output, file: &Path) -> String {
    let line = error_line(o);
    let named = format!("image {} is damaged or truncated: ", file.display());
    assert!(line.contains(&named), "{line}");
    line
}

#[test]
fn predict_refuses_each_damaged_file_and_scores_intact_ones() {
    let root = tempfile::tempdir().unwrap();
    let good = folder(root.path(), "good", &intact());
    let out = root.path().join("good_out");
    let o = common::predict(&good, &out, model());
    assert!(o.status.success(), "{}", stderr(&o));
    let rows = csv::Reader::from_path(out.join("results.csv"))
        .unwrap()
        .records()
        .count();
    assert_eq!(rows, 5);

    for (name, bytes) in damaged() {
        // Beside an intact image: the run fails, naming the damaged file, and writes no results.
        let dir = folder(
            root.path(),
            name,
            &[("a.png", encoded(ImageFormat::Png)), (name, bytes)],
        );
        let out = root.path().join(format!("{name}_out"));
        let line = refused(&common::predict(&dir, &out, model()), &dir.join(name));
        eprintln!("{name}: {line}");
        // No per-image file either (NAME.npy, .jpg, .json), for the damaged image or the
        // intact one beside it: the batch holding a damaged file is never scored.
        let left: Vec<_> = walkdir::WalkDir::new(&out)
            .into_iter()
            .flatten()
            .filter(|e| e.file_type().is_file())
            .map(|e| e.into_path())
            .collect();
        assert!(left.is_empty(), "{name}: left {left:?}");
    }
}

#[test]
fn train_and_calibrate_refuse_damaged_files() {
    let root = tempfile::tempdir().unwrap();
    // Two of each intact kind, and a JPEG cut in half.
    let mut files = intact();
    files.extend(intact().into_iter().map(|(n, b)| (&n[1..], b)));
    let (name, cut) = damaged().swap_remove(1);
    files.push((name, cut));
    let dir = folder(root.path(), "train", &files);

    let index = root.path().join("m.faiss");
    let o = common::train(&dir, &index, &small_model());
    refused(&o, &dir.join(name));
    assert!(!index.exists(), "no model from a refused run");

    // calibrate, on a copy of the shared model: the sidecar stays as it was.
    let copy = root.path().join("copy.faiss");
    std::fs::copy(model(), &copy).unwrap();
    let side = |p: &Path| patchcore::model::bank::sidecar_path(p);
    std::fs::copy(side(model()), side(&copy)).unwrap();
    let before = std::fs::read(side(&copy)).unwrap();
    let o = common::run(&[
        "calibrate",
        "-i",
        dir.to_str().unwrap(),
        "--index",
        copy.to_str().unwrap(),
        "-q",
    ]);
    refused(&o, &dir.join(name));
    assert_eq!(std::fs::read(side(&copy)).unwrap(), before);
}
