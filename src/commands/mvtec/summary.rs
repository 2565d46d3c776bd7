//! `patchcore mvtec summarize`: the `result.json` files of `runall` as tables (Markdown and
//! CSV, per category and the mean), grouped bar charts (SVG, one per metric, a bar per
//! backbone), like the figures of the original project, and per category the image ROC,
//! pixel ROC and PRO curves of every backbone overlaid (`curves/CATEGORY/*.svg`, from each
//! run's `curves.json`).

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

use super::{RunCurves, RunResult, CURVE_KINDS};
use crate::outputs::files;
use crate::outputs::plots::{self, CurveSeries};
use crate::util::fsutil::AtomicFile;
use crate::util::log;

/// The metrics tabulated and plotted: (file stem, title, accessor).
type Metric = (&'static str, &'static str, fn(&RunResult) -> Option<f64>);

const METRICS: [Metric; 4] = [
    ("image_auroc", "Image AUROC", |r| r.metrics.image_auroc),
    ("pixel_auroc", "Pixel AUROC", |r| r.metrics.pixel_auroc),
    ("aupro", "AUPRO (FPR <= 0.3)", |r| r.metrics.aupro),
    ("best_f1", "Best image F1", |r| {
        r.metrics.best_f1.as_ref().map(|f| f.f1)
    }),
];

/// Reads every `RUNS/<label>/<category>/result.json`.
pub fn read_results(runs: &Path) -> Result<Vec<RunResult>> {
    let mut found = Vec::new();
    let backbones = std::fs::read_dir(runs)
        .map_err(|e| anyhow!("cannot read runs folder {}: {e}", runs.display()))?;
    for b in backbones
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
    {
        for c in std::fs::read_dir(b.path())?.filter_map(|e| e.ok()) {
            let path = c.path().join("result.json");
            if !path.is_file() {
                continue;
            }
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let r: RunResult = serde_json::from_str(&text)
                .map_err(|e| anyhow!("result {} is damaged: {e}", path.display()))?;
            found.push(r);
        }
    }
    if found.is_empty() {
        bail!(
            "no result.json under {} (run `patchcore mvtec runall` first)",
            runs.display()
        );
    }
    found.sort_by_key(|r| (r.config.label(), r.config.category.clone()));
    Ok(found)
}

/// Writes `summary.md`, `summary.csv`, one SVG per metric, the curves per category and a
/// copy of every result under `out`; returns the files written.
pub fn summarize(runs: &Path, out: &Path) -> Result<Vec<PathBuf>> {
    let results = read_results(runs)?;
    std::fs::create_dir_all(out)
        .with_context(|| format!("cannot create output folder {}", out.display()))?;
    let table = Table::new(&results);
    let mut written = Vec::new();

    let figures = table.curves(runs, &results, out)?;
    let md = out.join("summary.md");
    let mut f = AtomicFile::create(&md)?;
    f.write_all(table.markdown(&results).as_bytes())?;
    if !figures.is_empty() {
        let mut s = String::from(
            "\n## Curves\n\nImage ROC, pixel ROC and PRO (FPR <= 0.3) of every run, per category; \
             the legends give the areas.\n\n",
        );
        for (category, files) in &figures {
            let links: Vec<String> = files
                .iter()
                .map(|p| {
                    let rel = p.strip_prefix(out).unwrap_or(p).display().to_string();
                    let name = p
                        .file_stem()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into_owned();
                    format!("[{name}]({rel})")
                })
                .collect();
            s += &format!("- {category}: {}\n", links.join(", "));
        }
        f.write_all(s.as_bytes())?;
    }
    f.commit()?;
    written.push(md);
    written.extend(figures.into_iter().flat_map(|(_, files)| files));

    let csv = out.join("summary.csv");
    let mut f = AtomicFile::create(&csv)?;
    f.write_all(&table.csv(&results)?)?;
    f.commit()?;
    written.push(csv);

    for (stem, title, get) in METRICS {
        let svg = out.join(format!("{stem}.svg"));
        plots::write_svg(&svg, &table.plot(&results, title, get)?)?;
        written.push(svg);
    }
    for r in &results {
        let p = out
            .join("results")
            .join(r.config.label())
            .join(format!("{}.json", r.config.category));
        std::fs::create_dir_all(p.parent().expect("has a parent"))?;
        files::write_json(&p, r, true)?;
        written.push(p);
    }
    Ok(written)
}

/// Runs (backbone and weights: `RunConfig::label`) and categories present, in a stable order.
struct Table {
    backbones: Vec<String>,
    categories: Vec<String>,
}

impl Table {
    fn new(results: &[RunResult]) -> Self {
        let backbones: BTreeSet<String> = results.iter().map(|r| r.config.label()).collect();
        let categories: BTreeSet<String> =
            results.iter().map(|r| r.config.category.clone()).collect();
        Table {
            backbones: backbones.into_iter().collect(),
            categories: categories.into_iter().collect(),
        }
    }

    fn find<'a>(results: &'a [RunResult], b: &str, c: &str) -> Option<&'a RunResult> {
        results
            .iter()
            .find(|r| r.config.label() == b && r.config.category == c)
    }

    /// The metric of backbone `b` per category, then the mean over the categories that have
    /// it (`None` if none has).
    fn column(
        &self,
        results: &[RunResult],
        b: &str,
        get: fn(&RunResult) -> Option<f64>,
    ) -> Vec<Option<f64>> {
        let mut col: Vec<Option<f64>> = self
            .categories
            .iter()
            .map(|c| Self::find(results, b, c).and_then(get))
            .collect();
        let have: Vec<f64> = col.iter().flatten().copied().collect();
        col.push((!have.is_empty()).then(|| have.iter().sum::<f64>() / have.len() as f64));
        col
    }

    fn markdown(&self, results: &[RunResult]) -> String {
        let pct = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{:.1}", 100.0 * v));
        let mut s = String::from("# MVTec AD results\n\n");
        let weights: BTreeSet<&str> = results.iter().map(|r| r.config.weights.as_str()).collect();
        let first = &results[0].config;
        s += &format!(
            "{} runs; weights: {}; resize {} / crop {}; coreset {}; k = {}; seed {}.\n\
             Written by `patchcore mvtec summarize` from the runs' result.json files.\n",
            results.len(),
            weights.into_iter().collect::<Vec<_>>().join(", "),
            first.preprocess.resize,
            first
                .preprocess
                .crop
                .map_or("none".to_string(), |c| c.to_string()),
            first.sampling_ratio,
            first.n_neighbors,
            first.seed,
        );
        for (_, title, get) in METRICS {
            s += &format!("\n## {title} (%)\n\n| category |");
            for b in &self.backbones {
                s += &format!(" {b} |");
            }
            s += "\n|---|";
            s += &"---:|".repeat(self.backbones.len());
            s += "\n";
            let cols: Vec<Vec<Option<f64>>> = self
                .backbones
                .iter()
                .map(|b| self.column(results, b, get))
                .collect();
            for (i, c) in self
                .categories
                .iter()
                .chain(["mean".to_string()].iter())
                .enumerate()
            {
                let name = if i == self.categories.len() {
                    "**mean**".to_string()
                } else {
                    c.clone()
                };
                s += &format!("| {name} |");
                for col in &cols {
                    s += &format!(" {} |", pct(col[i]));
                }
                s += "\n";
            }
        }
        s += "\n## Time and memory\n\n| run | category | train images | bank | features s | coreset s | train s | predict s/image | peak RSS GiB |\n|---|---|---:|---:|---:|---:|---:|---:|---:|\n";
        for r in results {
            let t = &r.timings;
            s += &format!(
                "| {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.3} | {} |\n",
                r.config.label(),
                r.config.category,
                r.counts.train_images,
                r.counts.bank_size,
                t.train.feature_extraction_s,
                t.train.coreset_s,
                t.train.total_s,
                t.predict_per_image_s,
                r.peak_rss_bytes.map_or("n/a".to_string(), |b| format!(
                    "{:.2}",
                    b as f64 / (1u64 << 30) as f64
                )),
            );
        }
        s
    }

    /// The CSV table (RFC 4180 quoting: a category or weights path may hold a comma).
    fn csv(&self, results: &[RunResult]) -> Result<Vec<u8>> {
        let num = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.6}"));
        let mut w = csv::Writer::from_writer(Vec::new());
        w.write_record([
            "run",
            "backbone",
            "category",
            "weights",
            "image_auroc",
            "pixel_auroc",
            "aupro",
            "best_f1",
            "best_f1_threshold",
            "train_images",
            "test_images",
            "bank_size",
            "features_s",
            "coreset_s",
            "train_s",
            "predict_s_per_image",
            "peak_rss_mib",
        ])?;
        for r in results {
            let m = &r.metrics;
            let t = &r.timings;
            w.write_record([
                r.config.label(),
                r.config.backbone.clone(),
                r.config.category.clone(),
                r.config.weights.clone(),
                num(m.image_auroc),
                num(m.pixel_auroc),
                num(m.aupro),
                num(m.best_f1.as_ref().map(|f| f.f1)),
                m.best_f1
                    .as_ref()
                    .map_or(String::new(), |f| f.threshold.to_string()),
                r.counts.train_images.to_string(),
                r.counts.test_images.to_string(),
                r.counts.bank_size.to_string(),
                format!("{:.3}", t.train.feature_extraction_s),
                format!("{:.3}", t.train.coreset_s),
                format!("{:.3}", t.train.total_s),
                format!("{:.4}", t.predict_per_image_s),
                r.peak_rss_bytes
                    .map_or(String::new(), |b| (b >> 20).to_string()),
            ])?;
        }
        for b in &self.backbones {
            let mut row = vec![b.clone(), String::new(), "mean".into(), String::new()];
            row.extend(
                METRICS.iter().map(|(_, _, get)| {
                    num(*self.column(results, b, *get).last().expect("has mean"))
                }),
            );
            row.resize(17, String::new());
            w.write_record(&row)?;
        }
        w.into_inner().map_err(|e| anyhow!("{}", e.error()))
    }

    /// A grouped bar chart: categories and the mean along x, one bar per backbone, 0-100 %.
    fn plot(
        &self,
        results: &[RunResult],
        title: &str,
        get: fn(&RunResult) -> Option<f64>,
    ) -> Result<String> {
        let groups: Vec<String> = self
            .categories
            .iter()
            .cloned()
            .chain(["mean".to_string()])
            .collect();
        let series: Vec<(String, Vec<Option<f64>>)> = self
            .backbones
            .iter()
            .map(|b| (b.clone(), self.column(results, b, get)))
            .collect();
        plots::bar_chart(title, &groups, &series)
    }

    /// Per category, the curves of every backbone overlaid (`curves/CATEGORY/KIND.svg`), from
    /// the runs' `curves.json` files; a backbone keeps its colour of the bar charts. Runs
    /// without curves (made by an older version) are left out, saying so. Returns the files
    /// written per category.
    fn curves(
        &self,
        runs: &Path,
        results: &[RunResult],
        out: &Path,
    ) -> Result<Vec<(String, Vec<PathBuf>)>> {
        let mut missing = Vec::new();
        let curves: Vec<Option<RunCurves>> = results
            .iter()
            .map(|r| {
                let dir = runs.join(r.config.label()).join(&r.config.category);
                let c = RunCurves::read(&dir).filter(|c| c.config == r.config);
                if c.is_none() {
                    missing.push(dir.display().to_string());
                }
                c
            })
            .collect();
        if !missing.is_empty() {
            log::info(&format!(
                "no curves.json (or one of another configuration) in {}: runs made by an older \
                 version; `mvtec runall --force` recomputes them",
                missing.join(", ")
            ));
        }
        let mut figures = Vec::new();
        for category in &self.categories {
            let mut files = Vec::new();
            for kind in CURVE_KINDS {
                let series: Vec<CurveSeries> = self
                    .backbones
                    .iter()
                    .enumerate()
                    .filter_map(|(k, b)| {
                        let i = results.iter().position(|r| {
                            r.config.label() == *b && r.config.category == *category
                        })?;
                        Some(CurveSeries {
                            label: b.clone(),
                            color: k,
                            curve: curves[i].as_ref()?.get(kind)?,
                        })
                    })
                    .collect();
                if series.is_empty() {
                    continue;
                }
                let dir = out.join("curves").join(category);
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("cannot create output folder {}", dir.display()))?;
                let path = dir.join(format!("{}.svg", kind.stem()));
                let title = format!("{category}: {}", kind.title());
                plots::write_svg(&path, &plots::curves_svg(&title, kind, &series)?)?;
                files.push(path);
            }
            if !files.is_empty() {
                figures.push((category.clone(), files));
            }
        }
        Ok(figures)
    }
}
