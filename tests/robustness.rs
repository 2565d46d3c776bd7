//! Odd and hostile inputs, all made here by the tests. Each case either works (and says so)
//! or fails with one clear line naming the file and a non-zero exit, never a panic.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;

use common::{error_line, stderr};
use ndarray::Array2;
use patchcore::util::synthetic::{self, Defect};

/// One small model shared by the tests of this file.
fn model() -> &'static Path {
    static MODEL: OnceLock<PathBuf> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        common::train_small(&dir, 2)
    })
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A folder holding one file `name` with `bytes`.
fn folder_with(name: &str, bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir(&input).unwrap();
    std::fs::write(input.join(name), bytes).unwrap();
    (dir, input)
}

fn predict(input: &Path) -> (Output, PathBuf) {
    let out = input.parent().unwrap().join("out");
    let o = common::predict(input, &out, model());
    (o, out)
}

/// Predict must work; returns the heatmap of `stem`.
fn works(input: &Path, stem: &str) -> Array2<f32> {
    let (o, out) = predict(input);
    assert!(o.status.success(), "{}", stderr(&o));
    ndarray_npy::read_npy(out.join(format!("{stem}.npy"))).unwrap()
}

/// Predict must fail cleanly naming `name`; returns the error line.
fn fails_naming(input: &Path, name: &str) -> String {
    let (o, out) = predict(input);
    let line = error_line(&o);
    assert!(line.contains(name), "error does not name {name}: {line}");
    assert!(
        !out.join("results.csv").exists(),
        "no results for a failed run"
    );
    line
}

fn encode(img: image::DynamicImage, format: image::ImageFormat) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, format).unwrap();
    buf.into_inner()
}

fn sample(w: u32, h: u32) -> image::DynamicImage {
    image::DynamicImage::ImageRgb8(synthetic::render(7, w, h, Defect::None).0)
}

#[test]
fn truncated_png_fails() {
    let png = encode(sample(64, 64), image::ImageFormat::Png);
    let (_d, input) = folder_with("cut.png", &png[..png.len() / 2]);
    fails_naming(&input, "cut.png");
}

#[test]
fn truncated_jpeg_fails() {
    let jpg = encode(sample(64, 64), image::ImageFormat::Jpeg);
    let (_d, input) = folder_with("cut.jpg", &jpg[..jpg.len() / 3]);
    fails_naming(&input, "cut.jpg");
}

#[test]
fn empty_file_fails() {
    let (_d, input) = folder_with("empty.png", b"");
    fails_naming(&input, "empty.png");
}

#[test]
fn text_with_image_extension_fails() {
    let (_d, input) = folder_with("notes.jpg", b"these are not pixels\n");
    fails_naming(&input, "notes.jpg");
}

#[test]
fn bmp_named_png_works_by_content() {
    let bmp = encode(sample(64, 48), image::ImageFormat::Bmp);
    let (_d, input) = folder_with("lies.png", &bmp);
    assert_eq!(works(&input, "lies").dim(), (48, 64));
}

#[test]
fn jpeg_named_png_works_by_content() {
    let jpg = encode(sample(64, 48), image::ImageFormat::Jpeg);
    let (_d, input) = folder_with("lies.png", &jpg);
    assert_eq!(works(&input, "lies").dim(), (48, 64));
}

#[test]
fn grayscale_alpha_works() {
    let la = image::DynamicImage::ImageLumaA8(sample(64, 64).to_luma_alpha8());
    let (_d, input) = folder_with("la.png", &encode(la, image::ImageFormat::Png));
    assert_eq!(works(&input, "la").dim(), (64, 64));
}

#[test]
fn palette_png_works() {
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, 40, 30);
        enc.set_color(png::ColorType::Indexed);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_palette(
            (0..=255u8)
                .flat_map(|v| [v, 255 - v, v / 2])
                .collect::<Vec<_>>(),
        );
        let mut w = enc.write_header().unwrap();
        let data: Vec<u8> = (0..40 * 30).map(|i| (i * 7 % 256) as u8).collect();
        w.write_image_data(&data).unwrap();
    }
    let (_d, input) = folder_with("palette.png", &bytes);
    assert_eq!(works(&input, "palette").dim(), (30, 40));
}

#[test]
fn cmyk_jpeg_works() {
    // Made by Pillow (the image crate cannot write CMYK JPEG).
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir(&input).unwrap();
    let path = input.join("cmyk.jpg");
    let script = "import sys\nfrom PIL import Image\n\
                  Image.new('CMYK', (50, 40), (30, 120, 200, 10)).save(sys.argv[1], quality=95)";
    let o = std::process::Command::new(common::python())
        .args(["-c", script, s(&path)])
        .output()
        .expect("python (scripts/setup.sh)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(works(&input, "cmyk").dim(), (40, 50));
}

#[test]
fn one_pixel_image_works() {
    // Upsampled to the network size like any other image; the heatmap is 1x1.
    let (_d, input) = folder_with("dot.png", &encode(sample(1, 1), image::ImageFormat::Png));
    let heat = works(&input, "dot");
    assert_eq!(heat.dim(), (1, 1));
    assert!(heat[[0, 0]].is_finite());
}

#[test]
fn extreme_aspect_ratio_fails() {
    let (_d, input) = folder_with(
        "sliver.png",
        &encode(sample(3, 5000), image::ImageFormat::Png),
    );
    let line = fails_naming(&input, "sliver.png");
    assert!(line.contains("aspect ratio"), "{line}");
}

/// A PNG whose header claims `w x h` pixels, followed by a little real data.
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, w, h);
        enc.set_color(png::ColorType::Grayscale);
        let mut writer = enc.write_header().unwrap();
        let mut stream = writer.stream_writer().unwrap();
        let _ = stream.write_all(&vec![0u8; 4096]);
        // Dropped unfinished: the image data simply stops.
    }
    bytes
}

#[test]
fn decompression_bomb_is_refused_by_the_decoder_limits() {
    // 100000 x 100000 declared in a file of a few kilobytes.
    let bomb = png_claiming(100_000, 100_000);
    assert!(bomb.len() < 10_000);
    let (_d, input) = folder_with("bomb.png", &bomb);
    let line = fails_naming(&input, "bomb.png");
    assert!(line.contains("limit"), "{line}");
}

#[test]
fn twenty_thousand_square_image_is_refused() {
    // A complete, valid 20000 x 20000 grayscale PNG (all black), streamed row by row.
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir(&input).unwrap();
    let file = std::fs::File::create(input.join("huge.png")).unwrap();
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), 20_000, 20_000);
    enc.set_color(png::ColorType::Grayscale);
    enc.set_compression(png::Compression::Fast);
    let mut writer = enc.write_header().unwrap();
    let mut stream = writer.stream_writer().unwrap();
    let row = vec![0u8; 20_000];
    for _ in 0..20_000 {
        stream.write_all(&row).unwrap();
    }
    stream.finish().unwrap();
    let line = fails_naming(&input, "huge.png");
    assert!(line.contains("limit"), "{line}");
}

#[test]
fn broken_symlink_is_skipped_with_a_note() {
    let (d, input) = folder_with("a.png", &encode(sample(64, 64), image::ImageFormat::Png));
    std::os::unix::fs::symlink(d.path().join("nowhere.png"), input.join("gone.png")).unwrap();
    let out = input.parent().unwrap().join("out");
    let o = common::predict_with(&input, &out, model(), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("gone.png"), "{}", stderr(&o));
    assert!(out.join("a.npy").exists() && !out.join("gone.npy").exists());
}

#[test]
fn symlink_loop_is_not_followed_forever() {
    let (_d, input) = folder_with("a.png", &encode(sample(64, 64), image::ImageFormat::Png));
    std::os::unix::fs::symlink(&input, input.join("loop")).unwrap();
    works(&input, "a");
}

#[test]
fn fifo_named_like_an_image_is_skipped_not_waited_on() {
    let (_d, input) = folder_with("a.png", &encode(sample(64, 64), image::ImageFormat::Png));
    let fifo = input.join("pipe.png");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let out = input.parent().unwrap().join("out");
    let o = common::predict_with(&input, &out, model(), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("pipe.png"),
        "the skip is noted: {}",
        stderr(&o)
    );
}

/// `patchcore predict -q -i INPUT -o OUT` with `hook` run in the child just before exec.
fn predict_with_hook(
    input: &Path,
    out: &Path,
    hook: impl FnMut() -> std::io::Result<()> + Send + Sync + 'static,
) -> std::io::Result<Output> {
    use std::os::unix::process::CommandExt;
    let mut cmd = common::bin();
    cmd.args(["predict", "-q", "-i", s(input), "-o", s(out), "--index"])
        .arg(model());
    unsafe { cmd.pre_exec(hook) };
    cmd.output()
}

#[test]
fn unreadable_file_fails() {
    let (_d, input) = folder_with(
        "secret.png",
        &encode(sample(64, 64), image::ImageFormat::Png),
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        input.join("secret.png"),
        std::fs::Permissions::from_mode(0o000),
    )
    .unwrap();
    let out = input.parent().unwrap().join("out");
    // Root reads any file through two capabilities, DAC_OVERRIDE and DAC_READ_SEARCH: as
    // root (CI), the binary runs without them, dropped from the bounding set so that exec
    // does not grant them again, and so meets the permission checks of an ordinary user.
    // (Running it as `nobody` is not possible: its libtorch lies under /root, mode 700.)
    // linux/capability.h
    const CAP_DAC_OVERRIDE: libc::c_ulong = 1;
    const CAP_DAC_READ_SEARCH: libc::c_ulong = 2;
    let o = predict_with_hook(&input, &out, || {
        if unsafe { libc::geteuid() } == 0 {
            for cap in [CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH] {
                if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
        }
        Ok(())
    });
    let o = match o {
        Ok(o) => o,
        Err(e) => {
            common::skip(&format!(
                "cannot drop root's file capabilities here (needs CAP_SETPCAP): {e}"
            ));
            return;
        }
    };
    let line = error_line(&o);
    assert!(
        line.contains("secret.png") && line.contains("ermission denied"),
        "{line}"
    );
    assert!(!out.join("results.csv").exists());
}

#[test]
fn non_utf8_file_name_works() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir(&input).unwrap();
    let name = std::ffi::OsStr::from_bytes(b"caf\xe9.png");
    sample(64, 64)
        .save_with_format(input.join(name), image::ImageFormat::Png)
        .unwrap();
    let (o, out) = predict(&input);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out
        .join(std::ffi::OsStr::from_bytes(b"caf\xe9.npy"))
        .exists());
    assert!(out
        .join(std::ffi::OsStr::from_bytes(b"caf\xe9.jpg"))
        .exists());
}

#[test]
fn images_of_different_sizes_in_one_folder_work() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir(&input).unwrap();
    for (i, (w, h)) in [(64, 64), (100, 50), (64, 64), (50, 120)]
        .into_iter()
        .enumerate()
    {
        sample(w, h).save(input.join(format!("{i}.png"))).unwrap();
    }
    let (o, out) = predict(&input);
    assert!(o.status.success(), "{}", stderr(&o));
    for (i, (w, h)) in [(64, 64), (100, 50), (64, 64), (50, 120)]
        .into_iter()
        .enumerate()
    {
        let heat: Array2<f32> = ndarray_npy::read_npy(out.join(format!("{i}.npy"))).unwrap();
        assert_eq!(heat.dim(), (h, w), "{i}.png");
    }
}

/// A disk that fills up while predict writes: the first file over 64 KiB (the 300x300
/// heatmap, 360 KB) fails to write midway, as on a full disk. Made with a file size limit
/// (RLIMIT_FSIZE, with SIGXFSZ ignored so that write returns EFBIG), which needs no
/// privileges, instead of a small tmpfs, which needs root.
#[test]
fn full_disk_is_a_clear_error_and_inputs_are_untouched() {
    let (_d, input) = folder_with("a.png", &encode(sample(300, 300), image::ImageFormat::Png));
    let before = std::fs::read(input.join("a.png")).unwrap();
    let out = input.parent().unwrap().join("out");
    let o = predict_with_hook(&input, &out, || unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        let limit = libc::rlimit {
            rlim_cur: 64 << 10,
            rlim_max: 64 << 10,
        };
        if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    })
    .unwrap();
    let line = error_line(&o);
    assert!(
        line.contains("cannot write") && line.contains("a.npy") && line.contains("too large"),
        "{line}"
    );
    assert_eq!(std::fs::read(input.join("a.png")).unwrap(), before);
    let left: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !left
            .iter()
            .any(|n| n.contains(".tmp") || n == "a.npy" || n == "results.csv"),
        "no partial or temporary file, no results: {left:?}"
    );
}

#[test]
fn sidecar_with_another_feature_dimension_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let index = common::train_small(root.path(), 2);
    let side = index.with_extension("faiss.json");
    let text = std::fs::read_to_string(&side).unwrap();
    std::fs::write(
        &side,
        text.replace("\"feature_dim\": 1024", "\"feature_dim\": 512"),
    )
    .unwrap();
    let o = common::predict(&root.path().join("train"), &root.path().join("o"), &index);
    let line = error_line(&o);
    assert!(
        line.contains("index.faiss.json") && line.contains("feature dimension"),
        "{line}"
    );
}

#[test]
fn random_bytes_named_index_faiss_are_never_read_by_faiss() {
    let root = tempfile::tempdir().unwrap();
    let index = common::train_small(root.path(), 2);
    let noise: Vec<u8> = (0..100_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&index, noise).unwrap();
    let o = common::predict(&root.path().join("train"), &root.path().join("o"), &index);
    let line = error_line(&o);
    assert!(line.contains("does not match its sidecar"), "{line}");
}

#[test]
fn oversized_sidecar_is_not_read() {
    let root = tempfile::tempdir().unwrap();
    let index = common::train_small(root.path(), 2);
    let side = index.with_extension("faiss.json");
    let text = std::fs::read_to_string(&side).unwrap();
    // Valid JSON, padded past the 1 MiB any real sidecar stays far below.
    let padded = text.replacen(
        '{',
        &format!("{{\"padding\": \"{}\",", "x".repeat(2 << 20)),
        1,
    );
    std::fs::write(&side, padded).unwrap();
    let o = common::predict(&root.path().join("train"), &root.path().join("o"), &index);
    let line = error_line(&o);
    assert!(
        line.contains("index.faiss.json") && line.contains("larger than"),
        "{line}"
    );
}
