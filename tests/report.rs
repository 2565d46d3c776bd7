//! The HTML report: content built through the library (order, counts, escaping, nothing
//! The HTML report: content built through the library (order, counts, escaping, nothing
//! external, the score histogram), then rendered in headless Chromium (screenshot, and the
//! verdict filter driven by the URL and by a click through chromedriver); the other SVG
//! figures (calibration, ROC/PRO curves) rendered there too. The Chromium parts skip, saying
//! so, when Chromium is not installed (scripts/setup.sh installs it), and fail when CI=true.

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use image::{Rgb, RgbImage};
use patchcore::outputs::report::{Report, ReportEntry, ReportMeta};
use rayon::prelude::*;

const WEIRD: &str = r#"weird/<b>&"x".png"#;
const THRESHOLD: f32 = 2.0;

/// The model's held-out calibration scores, all below the threshold.
fn held_out() -> Vec<f32> {
    (0..10).map(|i| 1.0 + 0.09 * i as f32).collect()
}

/// (name, score, regions), in no particular order.
fn cases() -> Vec<(String, f32, usize)> {
    vec![
        ("good/000.png".into(), 1.1, 0),
        ("scratch/001.png".into(), 3.5, 2),
        (WEIRD.into(), 2.4, 1),
        ("good/002.png".into(), 0.7, 0),
        (
            String::from_utf8_lossy(b"odd/na\xffme.png").into_owned(),
            5.0,
            3,
        ),
        ("good/003.png".into(), 1.9, 0),
    ]
}

/// An image whose colours depend on `seed`, with a bright square for "defects".
fn picture(seed: usize, w: u32, h: u32, defect: bool) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let inside = defect && (w / 3..w / 2).contains(&x) && (h / 3..h / 2).contains(&y);
        if inside {
            Rgb([250, 30, 30])
        } else {
            Rgb([
                (x * 255 / w) as u8,
                (y * 255 / h) as u8,
                (seed * 40 % 256) as u8,
            ])
        }
    })
}

/// Builds a report in `dir` (images added from several threads); returns index.html's path.
fn build(dir: &Path, threshold: Option<f32>) -> PathBuf {
    let report = Report::new(dir).unwrap();
    cases()
        .into_par_iter()
        .enumerate()
        .for_each(|(i, (name, score, regions))| {
            let normalized = threshold.map(|t| score / t);
            let anomalous = normalized.map(|n| n > 1.0);
            let original = picture(i, 300 + 40 * i as u32, 200, false);
            let overlay = picture(i + 7, 300 + 40 * i as u32, 200, anomalous == Some(true));
            let entry = ReportEntry {
                overlay_file: Some(format!("{name}.jpg")),
                name,
                score,
                normalized,
                anomalous,
                regions,
            };
            report.add(entry, &original, &overlay).unwrap();
        });
    assert_eq!(report.len(), cases().len());
    let meta = ReportMeta {
        title: "Inspection <line 3>".into(),
        model: "/models/screw & nut/index.faiss".into(),
        input: "/data/test".into(),
        threshold,
        calibration_scores: held_out(),
        calibration_images: vec![("b <1>.png".into(), 23.6), ("a.png".into(), 6.0)],
        calibration_folder: None,
        extra: vec![("Backbone".into(), "wide_resnet50_2".into())],
    };
    let path = dir.join("index.html");
    report.finish(&meta, &path).unwrap();
    path
}

/// The value of attribute `name` in the tag text `tag`.
fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let key = format!(" {name}=\"");
    let start = tag.find(&key)? + key.len();
    Some(&tag[start..start + tag[start..].find('"')?])
}

/// The opening tags of the report's rows, in document order.
fn row_tags(html: &str) -> Vec<&str> {
    html.match_indices("<div class=\"row\"")
        .map(|(i, _)| &html[i..i + html[i..].find('>').unwrap()])
        .collect()
}

fn html_escaped(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

#[test]
fn report_html_is_sorted_escaped_and_self_contained() {
    let dir = tempfile::tempdir().unwrap();
    let path = build(dir.path(), Some(THRESHOLD));
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["index.html"], "spool or temp file left behind");
    let html = std::fs::read_to_string(&path).unwrap();

    // The calibration images by name, highest first, escaped.
    let listed = html
        .find("id=\"calibration-images\"")
        .expect("the calibration images are listed");
    let list = &html[listed..listed + html[listed..].find("</details>").unwrap()];
    let (b, a) = (
        list.find("b &lt;1&gt;.png <b>23.6").expect(list),
        list.find("a.png <b>6").expect(list),
    );
    assert!(b < a, "{list}");

    // Both thumbnails link the full-size overlay, its name percent-encoded.
    assert_eq!(
        html.matches("<a class=\"full\" href=\"scratch/001.png.jpg\"")
            .count(),
        2
    );
    assert!(html.contains("href=\"weird/%3Cb%3E%26%22x%22.png.jpg\""));

    // Worst first.
    let mut expected = cases();
    expected.sort_by(|a, b| b.1.total_cmp(&a.1));
    let rows = row_tags(&html);
    assert_eq!(rows.len(), expected.len());
    for (i, (tag, (name, score, _))) in rows.iter().zip(&expected).enumerate() {
        assert_eq!(attr(tag, "data-rank"), Some((i + 1).to_string().as_str()));
        assert_eq!(attr(tag, "data-name"), Some(html_escaped(name).as_str()));
        let s: f32 = attr(tag, "data-score").unwrap().parse().unwrap();
        assert_eq!(s, *score);
        let n: f32 = attr(tag, "data-normalized").unwrap().parse().unwrap();
        assert_eq!(n, score / THRESHOLD);
        let verdict = if score / THRESHOLD > 1.0 {
            "anomalous"
        } else {
            "good"
        };
        assert_eq!(attr(tag, "data-verdict"), Some(verdict), "{tag}");
    }

    // Header: counts, model, threshold.
    assert!(
        html.contains("data-count=\"total\"><b>6</b>"),
        "{html:.3000}"
    );
    assert!(html.contains("data-count=\"anomalous\"><b>3</b>"));
    assert!(html.contains("data-count=\"good\"><b>3</b>"));
    assert!(html.contains("/models/screw &amp; nut/index.faiss"));
    assert!(html.contains("<title>Inspection &lt;line 3&gt;</title>"));
    assert!(html.contains("<dt>Threshold</dt><dd>2 "));
    assert!(html.contains("wide_resnet50_2"));
    assert!(html.contains("<nav id=\"filter\" hidden>"));

    // Names are escaped everywhere; the non-UTF-8 one is shown with a replacement character.
    assert!(html.contains("&lt;b&gt;&amp;&quot;x&quot;.png"));
    assert!(!html.contains("<b>&\""), "raw name in the page");
    assert!(html.contains("odd/na\u{fffd}me.png"));

    // The score histogram opens the page, before the rows: the run by verdict, the held-out
    // scores, the threshold, each named in a legend; bars drawn for each.
    let fig = html
        .find("<figure class=\"plot\" id=\"score-plot\"><svg")
        .expect("plot");
    assert!(fig < html.find("<div class=\"rows\">").unwrap());
    let svg = &html[fig..fig + html[fig..].find("</svg>").unwrap()];
    for legend in [
        "good (3)",
        "anomalous (3)",
        "held-out good (10)",
        "threshold 2.000",
        "This run: 6 images, by verdict",
    ] {
        assert!(svg.contains(legend), "plot lacks {legend:?}");
    }
    for colour in ["#2E7D32", "#C62828", "#1565C0"] {
        let bars = svg.matches(&format!("fill=\"{colour}\"")).count();
        assert!(bars >= 2, "{bars} shapes of {colour}: {svg:.3000}");
    }

    // Self-contained: no remote reference; every image is an embedded JPEG thumbnail.
    assert!(!html.contains("http://") && !html.contains("https://"));
    assert!(!html.contains("<link") && !html.contains("url("));
    let srcs: Vec<&str> = html
        .match_indices(" src=\"")
        .map(|(i, m)| {
            let s = &html[i + m.len()..];
            &s[..s.find('"').unwrap()]
        })
        .collect();
    assert_eq!(srcs.len(), 2 * expected.len());
    for src in srcs {
        let data = src
            .strip_prefix("data:image/jpeg;base64,")
            .unwrap_or_else(|| panic!("not a data URI: {:.80}", src));
        let jpeg = base64::engine::general_purpose::STANDARD
            .decode(data)
            .unwrap();
        let img = image::load_from_memory(&jpeg).unwrap();
        assert!(img.width().max(img.height()) <= 256);
        assert!(img.width() >= 255, "thumbnail of a wide image is 256 wide");
    }
    // Links stay in the page, or go to the full-size overlays beside it (relative, .jpg).
    for (i, _) in html.match_indices(" href=\"") {
        let target = &html[i + 7..i + 7 + html[i + 7..].find('"').unwrap()];
        assert!(
            target.starts_with('#')
                || (target.ends_with(".jpg")
                    && !target.contains(':')
                    && !target.starts_with('/')
                    && !target.split('/').any(|c| c == "..")),
            "link out of the page: {target}"
        );
    }
}

#[test]
fn report_without_threshold_sorts_by_score_and_has_no_filter() {
    let dir = tempfile::tempdir().unwrap();
    let html = std::fs::read_to_string(build(dir.path(), None)).unwrap();
    let rows = row_tags(&html);
    let scores: Vec<f32> = rows
        .iter()
        .map(|t| attr(t, "data-score").unwrap().parse().unwrap())
        .collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    assert!(rows
        .iter()
        .all(|t| attr(t, "data-verdict") == Some("none") && attr(t, "data-normalized").is_none()));
    assert!(!html.contains("<nav id=\"filter\""));
    assert!(html.contains("data-count=\"total\"><b>6</b>"));
}

#[test]
fn empty_report_is_still_a_page() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("index.html");
    Report::new(dir.path())
        .unwrap()
        .finish(&ReportMeta::default(), &path)
        .unwrap();
    let html = std::fs::read_to_string(path).unwrap();
    assert!(html.contains("No images were scored."));
    assert!(html.trim_end().ends_with("</html>"));
}

// ---------------------------------------------------------------------------------------------
// Headless Chromium.

fn find_program(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    names.iter().find_map(|n| {
        std::env::split_paths(&path)
            .map(|d| d.join(n))
            .find(|p| p.is_file())
    })
}

fn chromium() -> Option<PathBuf> {
    let found = find_program(&["chromium", "chromium-browser", "google-chrome"]);
    if found.is_none() {
        common::skip("chromium not found (scripts/setup.sh installs it)");
    }
    found
}

/// Flags for a headless Chromium that works as root in a container, with its own profile.
fn chromium_flags(profile: &Path) -> Vec<String> {
    vec![
        "--headless".into(),
        "--no-sandbox".into(),
        "--disable-gpu".into(),
        "--disable-dev-shm-usage".into(),
        "--no-first-run".into(),
        "--disable-crash-reporter".into(),
        "--disable-breakpad".into(),
        "--hide-scrollbars".into(),
        format!("--user-data-dir={}", profile.display()),
    ]
}

fn file_url(p: &Path) -> String {
    format!("file://{}", p.canonicalize().unwrap().display())
}

/// Runs Chromium with `args` and a time limit; returns stdout. Chromium runs in its own
/// process group, all of which is killed if it overruns.
fn run_chromium(chromium: &Path, profile: &Path, args: &[String]) -> String {
    let stdout = profile.with_extension("stdout");
    let stderr = profile.with_extension("stderr");
    let mut child = Command::new(chromium)
        .args(chromium_flags(profile))
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout).unwrap())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .process_group(0)
        .spawn()
        .expect("chromium starts");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > Duration::from_secs(120) {
            kill_group(&mut child);
            panic!("chromium {args:?} did not finish within 120 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "chromium {args:?} failed: {}",
        std::fs::read_to_string(&stderr).unwrap_or_default()
    );
    String::from_utf8_lossy(&std::fs::read(&stdout).unwrap()).into_owned()
}

/// Kills `child`'s process group (it was started as the leader of its own).
fn kill_group(child: &mut Child) {
    // SAFETY: plain syscall on the group this test created.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
    let _ = child.wait();
}

#[test]
fn report_renders_in_chromium() {
    let Some(chromium) = chromium() else { return };
    let dir = tempfile::tempdir().unwrap();
    let page = build(dir.path(), Some(THRESHOLD));
    let profile = dir.path().join("profile");

    // A screenshot: a real page with pictures, not a blank or single-colour one (tall
    // enough to show rows below the score histogram).
    let shot = dir.path().join("shot.png");
    run_chromium(
        &chromium,
        &profile,
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1280,1600".into(),
            file_url(&page),
        ],
    );
    let img = image::open(&shot).expect("screenshot decodes").to_rgb8();
    assert_eq!(img.dimensions(), (1280, 1600));
    let mut colours: Vec<[u8; 3]> = img.pixels().map(|p| p.0).collect();
    colours.sort_unstable();
    colours.dedup();
    assert!(
        colours.len() > 500,
        "screenshot has only {} colours",
        colours.len()
    );
    // The thumbnails' bright-red defect squares are on screen (the worst rows come first).
    let red = img
        .pixels()
        .filter(|p| p[0] > 200 && p[1] < 80 && p[2] < 80)
        .count();
    assert!(
        red > 1000,
        "no defect visible in the screenshot ({red} red pixels)"
    );
    let keep = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("report-screenshot.png");
    std::fs::copy(&shot, &keep).unwrap();
    eprintln!("screenshot: {}", keep.display());

    // The filter, chosen by the URL: good rows are hidden, anomalous ones shown.
    let dom = run_chromium(
        &chromium,
        &profile,
        &[
            "--dump-dom".into(),
            format!("{}#anomalous", file_url(&page)),
        ],
    );
    let rows = row_tags(&dom);
    assert_eq!(rows.len(), cases().len(), "{dom:.2000}");
    for tag in &rows {
        let hidden = attr(tag, "hidden").is_some();
        assert_eq!(
            hidden,
            attr(tag, "data-verdict") == Some("good"),
            "#anomalous: {tag}"
        );
    }
    assert!(dom.contains("3 of 6 shown"));
    assert!(dom.contains("<body data-filter=\"anomalous\">"));
    assert!(
        !dom.contains("<nav id=\"filter\" hidden"),
        "JS shows the filter"
    );
}

/// Pixels of `img` within 12 of `colour` in every channel.
fn pixels_near(img: &image::RgbImage, colour: [u8; 3]) -> usize {
    img.pixels()
        .filter(|p| (0..3).all(|c| p[c].abs_diff(colour[c]) <= 12))
        .count()
}

/// Rows of `img` holding at least one pixel near `colour`: (first, last).
fn rows_with(img: &image::RgbImage, colour: [u8; 3]) -> Option<(u32, u32)> {
    let near = |p: &image::Rgb<u8>| (0..3).all(|c| p[c].abs_diff(colour[c]) <= 12);
    let rows: Vec<u32> = (0..img.height())
        .filter(|&y| (0..img.width()).any(|x| near(img.get_pixel(x, y))))
        .collect();
    Some((*rows.first()?, *rows.last()?))
}

/// Screenshot of `url` at `w` x `h`, kept in the target folder as `keep` for a look.
fn screenshot(
    chromium: &Path,
    dir: &Path,
    url: &str,
    (w, h): (u32, u32),
    keep: &str,
) -> image::RgbImage {
    let shot = dir.join(keep);
    run_chromium(
        chromium,
        &dir.join("profile"),
        &[
            format!("--screenshot={}", shot.display()),
            format!("--window-size={w},{h}"),
            url.to_string(),
        ],
    );
    let img = image::open(&shot).expect("screenshot decodes").to_rgb8();
    assert_eq!(img.dimensions(), (w, h));
    let kept = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(keep);
    std::fs::copy(&shot, &kept).unwrap();
    eprintln!("screenshot: {}", kept.display());
    img
}

const GREEN: [u8; 3] = [0x2e, 0x7d, 0x32];
const RED: [u8; 3] = [0xc6, 0x28, 0x28];
const BLUE: [u8; 3] = [0x15, 0x65, 0xc0];

/// Headless Chromium (1280x1000) under chromedriver with a new WebDriver session: the driver
/// and the session id; None, skipped, when either program is missing.
fn webdriver_session(profile: &Path) -> Option<(Driver, String)> {
    let chromium = chromium()?;
    let Some(chromedriver) = find_program(&["chromedriver"]) else {
        common::skip("chromedriver not found (scripts/setup.sh installs chromium-driver)");
        return None;
    };
    let driver = Driver::start(&chromedriver);
    let args: Vec<String> = chromium_flags(profile)
        .into_iter()
        .chain(["--window-size=1280,1000".to_string()])
        .collect();
    let session = driver.call(
        "POST",
        "/session",
        serde_json::json!({"capabilities": {"alwaysMatch": {"goog:chromeOptions": {
            "binary": chromium.to_str().unwrap(), "args": args}}}}),
    );
    let sid = session["sessionId"].as_str().unwrap().to_string();
    Some((driver, sid))
}

/// Pictures of the score histogram `#score-plot` of `page`, taken by Chromium through
/// chromedriver (the element alone: the rows' badges share the plot's colours).
fn plot_screenshots(pages: &[&Path]) -> Option<Vec<image::RgbImage>> {
    let profile = tempfile::tempdir().unwrap();
    let (driver, sid) = webdriver_session(&profile.path().join("profile"))?;
    let s = |p: &str| format!("/session/{sid}{p}");
    let mut shots = Vec::new();
    for (k, page) in pages.iter().enumerate() {
        driver.call(
            "POST",
            &s("/url"),
            serde_json::json!({"url": file_url(page)}),
        );
        let svg = driver.call(
            "POST",
            &s("/element"),
            serde_json::json!({"using": "css selector", "value": "#score-plot svg"}),
        );
        let id = element_id(&svg);
        let rect = driver.call(
            "GET",
            &s(&format!("/element/{id}/rect")),
            serde_json::Value::Null,
        );
        let (y, w, h) = (
            rect["y"].as_f64().unwrap(),
            rect["width"].as_f64().unwrap(),
            rect["height"].as_f64().unwrap(),
        );
        assert!(w >= 600.0 && h >= 250.0, "plot is {w}x{h}");
        assert!(y < 400.0, "the page opens with the plot: it starts at {y}");
        let png = driver.call(
            "GET",
            &s(&format!("/element/{id}/screenshot")),
            serde_json::Value::Null,
        );
        let png = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap();
        let img = image::load_from_memory(&png).unwrap().to_rgb8();
        let keep = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("report-plot-{k}.png"));
        img.save(&keep).unwrap();
        eprintln!("plot screenshot: {}", keep.display());
        shots.push(img);
    }
    driver.call(
        "DELETE",
        &format!("/session/{sid}"),
        serde_json::Value::Null,
    );
    Some(shots)
}

#[test]
fn report_score_histogram_renders_in_chromium() {
    let dir = tempfile::tempdir().unwrap();
    let page = build(dir.path(), Some(THRESHOLD));

    // 2001 images, one anomalous: the plot keeps its size and the one image stays visible
    // (the count axis turns logarithmic).
    let big_dir = dir.path().join("big");
    std::fs::create_dir(&big_dir).unwrap();
    let report = Report::new(&big_dir).unwrap();
    let tiny = RgbImage::new(4, 4);
    for i in 0..2_000 {
        let score = 1.0 + (i % 10) as f32 / 50.0;
        let entry = ReportEntry {
            name: format!("good/{i:05}.png"),
            score,
            normalized: Some(score / THRESHOLD),
            anomalous: Some(false),
            regions: 0,
            overlay_file: None,
        };
        report.add(entry, &tiny, &tiny).unwrap();
    }
    let entry = ReportEntry {
        name: "bad.png".into(),
        score: 4.0,
        normalized: Some(2.0),
        anomalous: Some(true),
        regions: 1,
        overlay_file: None,
    };
    report.add(entry, &tiny, &tiny).unwrap();
    let meta = ReportMeta {
        threshold: Some(THRESHOLD),
        ..ReportMeta::default()
    };
    let big = big_dir.join("index.html");
    report.finish(&meta, &big).unwrap();
    let html = std::fs::read_to_string(&big).unwrap();
    let fig = html.find("<figure").unwrap();
    let plot = &html[fig..fig + html[fig..].find("</figure>").unwrap()];
    assert!(
        plot.len() < 40_000,
        "plot of 2001 images is {} bytes",
        plot.len()
    );
    assert!(plot.contains("no held-out calibration scores") && plot.contains("images (log)"));

    let Some(shots) = plot_screenshots(&[&page, &big]) else {
        return;
    };

    // Bars of the three colours, each far more than its legend swatch (12 x 10 pixels); the
    // held-out ones in the lower panel, under the run's.
    let img = &shots[0];
    for (name, colour) in [("good", GREEN), ("anomalous", RED), ("held-out", BLUE)] {
        let n = pixels_near(img, colour);
        assert!(n > 400, "{name} bars: {n} pixels of {colour:?}");
    }
    let (_, green_bottom) = rows_with(img, GREEN).unwrap();
    let (_, blue_bottom) = rows_with(img, BLUE).unwrap();
    assert!(
        blue_bottom > green_bottom + 100,
        "held-out panel below the run's"
    );

    // The one anomalous image's bar stands on the baseline of the good ones (the legend's red
    // swatch is near the top), several pixels tall.
    let img = &shots[1];
    assert!(pixels_near(img, GREEN) > 3_000);
    let (_, baseline) = rows_with(img, GREEN).unwrap();
    let near_base = (baseline.saturating_sub(30)..=baseline)
        .flat_map(|y| (0..img.width()).map(move |x| (x, y)))
        .filter(|&(x, y)| (0..3).all(|c| img.get_pixel(x, y)[c].abs_diff(RED[c]) <= 12))
        .count();
    assert!(
        near_base > 40,
        "anomalous bar: {near_base} red pixels near the baseline"
    );
}

#[test]
fn figures_render_in_chromium() {
    use patchcore::commands::mvtec::metrics::{roc_curve, PixelMetrics};
    use patchcore::outputs::plots::{self, CurveKind, CurveSeries};
    let Some(chromium) = chromium() else { return };
    let dir = tempfile::tempdir().unwrap();

    // The calibration figure train writes: held-out bars and the threshold line.
    let cal = patchcore::util::records::Calibration::from_scores(
        patchcore::training::calibration::Scores {
            image_scores: (0..32).map(|i| 1.0 + (i * 7 % 32) as f32 / 40.0).collect(),
            heatmap_maxima: vec![1.0; 32],
            sizes: vec![(64, 64); 32],
            names: Vec::new(),
        },
        patchcore::util::records::Rule::Quantile,
    );
    let index = dir.path().join("index.faiss");
    let written = plots::write_calibration_svg(&index, Some(&cal))
        .unwrap()
        .unwrap();
    assert_eq!(written, dir.path().join("index.faiss.calibration.svg"));
    let svg = std::fs::read_to_string(&written).unwrap();
    let bound = format!("at most {:.1}% of the time", 100.0 * cal.false_alarm_bound);
    assert!(
        svg.contains("held-out good (32)") && svg.contains(&bound),
        "{svg:.2000}"
    );
    let img = screenshot(
        &chromium,
        dir.path(),
        &file_url(&written),
        (900, 500),
        "calibration-svg.png",
    );
    assert!(pixels_near(&img, BLUE) > 2_000, "held-out bars");
    assert!(
        pixels_near(&img, [0, 0, 0]) > 300,
        "threshold line and text"
    );

    // ROC curves of two "backbones" overlaid, with their AUROC in the legend.
    let labels: Vec<bool> = (0..200).map(|i| i % 3 == 0).collect();
    let a: Vec<f32> = (0..200)
        .map(|i| (i % 3 == 0) as u8 as f32 + (i * 37 % 101) as f32 / 80.0)
        .collect();
    let b: Vec<f32> = (0..200).map(|i| (i * 53 % 97) as f32).collect();
    let (ca, cb) = (
        roc_curve(&a, &labels).unwrap(),
        roc_curve(&b, &labels).unwrap(),
    );
    let series = [
        CurveSeries {
            label: "resnet18".into(),
            color: 0,
            curve: &ca,
        },
        CurveSeries {
            label: "wide_resnet50_2".into(),
            color: 1,
            curve: &cb,
        },
    ];
    let svg = plots::curves_svg("widget: image ROC", CurveKind::ImageRoc, &series).unwrap();
    let auroc = patchcore::commands::mvtec::metrics::auroc(&a, &labels).unwrap();
    assert!(
        svg.contains(&format!("resnet18: AUROC {:.2}%", 100.0 * auroc)),
        "{svg:.3000}"
    );
    let path = dir.path().join("image_roc.svg");
    plots::write_svg(&path, &svg).unwrap();
    let img = screenshot(
        &chromium,
        dir.path(),
        &file_url(&path),
        (600, 560),
        "image-roc-svg.png",
    );
    for k in 0..2 {
        use plotters::style::{Color, Palette, Palette99};
        let c = Palette99::pick(k).to_rgba();
        let n = pixels_near(&img, [c.0, c.1, c.2]);
        assert!(n > 300, "curve {k}: {n} pixels");
    }

    // A PRO curve ends at FPR 0.3, its AUPRO in the legend.
    let mut m = PixelMetrics::new();
    let scores = ndarray::Array2::from_shape_fn((40, 40), |(y, x)| {
        ((x * 7 + y * 13) % 50) as f32 + if x < 10 { 30.0 } else { 0.0 }
    });
    let mask = ndarray::Array2::from_shape_fn((40, 40), |(_, x)| x < 10);
    m.add(scores.view(), mask.view()).unwrap();
    let pro = m.pro_curve(0.3).unwrap();
    assert_eq!(pro.points.last().unwrap()[0], 0.3);
    let svg = plots::curves_svg(
        "widget: PRO",
        CurveKind::Pro { max_fpr: 0.3 },
        &[CurveSeries {
            label: "resnet18".into(),
            color: 0,
            curve: &pro,
        }],
    )
    .unwrap();
    assert!(svg.contains(&format!("AUPRO {:.2}%", 100.0 * m.aupro(0.3).unwrap())));
}

/// A chromedriver process, killed on drop.
struct Driver {
    child: Child,
    base: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        kill_group(&mut self.child);
    }
}

impl Driver {
    fn start(program: &Path) -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(program)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("chromedriver starts");
        let driver = Driver {
            child,
            base: format!("http://127.0.0.1:{port}"),
        };
        let start = Instant::now();
        while ureq::get(&format!("{}/status", driver.base))
            .call()
            .is_err()
        {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "chromedriver did not come up"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        driver
    }

    fn call(&self, method: &str, path: &str, body: serde_json::Value) -> serde_json::Value {
        let url = format!("{}{path}", self.base);
        let req = ureq::request(method, &url).timeout(Duration::from_secs(120));
        let res = if body.is_null() {
            req.call()
        } else {
            req.set("Content-Type", "application/json")
                .send_string(&body.to_string())
        };
        let text = match res {
            Ok(r) => r.into_string().unwrap(),
            Err(ureq::Error::Status(code, r)) => {
                panic!("{method} {path}: {code} {}", r.into_string().unwrap())
            }
            Err(e) => panic!("{method} {path}: {e}"),
        };
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["value"].clone()
    }
}

fn element_id(v: &serde_json::Value) -> String {
    v["element-6066-11e4-a52e-4f735466cecf"]
        .as_str()
        .unwrap_or_else(|| panic!("not an element reference: {v}"))
        .to_string()
}

#[test]
fn report_filter_works_by_click_through_webdriver() {
    let dir = tempfile::tempdir().unwrap();
    let page = build(dir.path(), Some(THRESHOLD));
    let Some((driver, sid)) = webdriver_session(&dir.path().join("profile")) else {
        return;
    };
    let s = |p: &str| format!("/session/{sid}{p}");
    driver.call(
        "POST",
        &s("/url"),
        serde_json::json!({"url": file_url(&page)}),
    );

    // Which rows are displayed, as (verdict, displayed).
    let displayed = || -> Vec<(String, bool)> {
        let rows = driver.call(
            "POST",
            &s("/elements"),
            serde_json::json!({"using": "css selector", "value": ".rows > .row"}),
        );
        rows.as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let id = element_id(r);
                let verdict = driver.call(
                    "GET",
                    &s(&format!("/element/{id}/attribute/data-verdict")),
                    serde_json::Value::Null,
                );
                let shown = driver.call(
                    "GET",
                    &s(&format!("/element/{id}/displayed")),
                    serde_json::Value::Null,
                );
                (
                    verdict.as_str().unwrap().to_string(),
                    shown.as_bool().unwrap(),
                )
            })
            .collect()
    };
    let click = |filter: &str| {
        let link = driver.call(
            "POST",
            &s("/element"),
            serde_json::json!({"using": "css selector", "value": format!("nav#filter a[href='#{filter}']")}),
        );
        driver.call(
            "POST",
            &s(&format!("/element/{}/click", element_id(&link))),
            serde_json::json!({}),
        );
    };

    let all = displayed();
    assert_eq!(all.len(), cases().len());
    assert!(all.iter().all(|(_, shown)| *shown), "{all:?}");

    click("good");
    let good = displayed();
    assert!(
        good.iter().all(|(v, shown)| *shown == (v == "good")),
        "after clicking Good: {good:?}"
    );
    assert_eq!(good.iter().filter(|(_, s)| *s).count(), 3);

    click("anomalous");
    let bad = displayed();
    assert!(
        bad.iter().all(|(v, shown)| *shown == (v == "anomalous")),
        "after clicking Anomalous: {bad:?}"
    );

    click("all");
    assert!(displayed().iter().all(|(_, shown)| *shown));
    driver.call(
        "DELETE",
        &format!("/session/{sid}"),
        serde_json::Value::Null,
    );
}
