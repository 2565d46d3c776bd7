//! `patchcore mvtec summarize`: the `result.json` files of `runall` as tables (Markdown and
//! CSV, per category and the mean) and grouped bar charts (SVG, one per metric, a bar per
//! backbone), like the figures of the original project.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::RunResult;
use crate::outputs::{self, AtomicFile};

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

/// Writes `summary.md`, `summary.csv`, one SVG per metric and a copy of every result under
/// `out`; returns the files written.
pub fn summarize(runs: &Path, out: &Path) -> Result<Vec<PathBuf>> {
    let results = read_results(runs)?;
    std::fs::create_dir_all(out)
        .with_context(|| format!("cannot create output folder {}", out.display()))?;
    let table = Table::new(&results);
    let mut written = Vec::new();

    let md = out.join("summary.md");
    let mut f = AtomicFile::create(&md)?;
    f.write_all(table.markdown(&results).as_bytes())?;
    f.commit()?;
    written.push(md);

    let csv = out.join("summary.csv");
    let mut f = AtomicFile::create(&csv)?;
    f.write_all(&table.csv(&results)?)?;
    f.commit()?;
    written.push(csv);

    for (stem, title, get) in METRICS {
        let svg = out.join(format!("{stem}.svg"));
        table.plot(&results, title, get, &svg)?;
        written.push(svg);
    }
    for r in &results {
        let p = out
            .join("results")
            .join(r.config.label())
            .join(format!("{}.json", r.config.category));
        std::fs::create_dir_all(p.parent().expect("has a parent"))?;
        outputs::write_json(&p, r, true)?;
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
        path: &Path,
    ) -> Result<()> {
        let groups: Vec<String> = self
            .categories
            .iter()
            .cloned()
            .chain(["mean".to_string()])
            .collect();
        let width = (160 + 90 * groups.len() as u32 * self.backbones.len().max(1) as u32).max(640);
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (width, 420)).into_drawing_area();
            root.fill(&WHITE).map_err(plot_err)?;
            let mut chart = ChartBuilder::on(&root)
                .caption(format!("{title}, %"), ("sans-serif", 22))
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(48)
                .build_cartesian_2d(0f64..groups.len() as f64, 0f64..100f64)
                .map_err(plot_err)?;
            chart
                .configure_mesh()
                .disable_x_mesh()
                .max_light_lines(0)
                .x_labels(groups.len() * 2 + 1)
                .x_label_formatter(&|x| {
                    let i = x.floor() as usize;
                    if (x - i as f64 - 0.5).abs() < 1e-6 && i < groups.len() {
                        groups[i].clone()
                    } else {
                        String::new()
                    }
                })
                .y_desc("%")
                .draw()
                .map_err(plot_err)?;
            let n = self.backbones.len() as f64;
            let bar = 0.8 / n;
            for (k, b) in self.backbones.iter().enumerate() {
                let color = Palette99::pick(k).to_rgba();
                let col = self.column(results, b, get);
                let bars = col.iter().enumerate().filter_map(|(i, v)| {
                    let v = (*v)? * 100.0;
                    let x0 = i as f64 + 0.1 + k as f64 * bar;
                    Some(Rectangle::new(
                        [(x0, 0.0), (x0 + bar * 0.92, v)],
                        color.filled(),
                    ))
                });
                chart
                    .draw_series(bars)
                    .map_err(plot_err)?
                    .label(b.as_str())
                    .legend(move |(x, y)| {
                        Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
                    });
                let labels = col.iter().enumerate().filter_map(|(i, v)| {
                    let v = (*v)? * 100.0;
                    let x = i as f64 + 0.1 + (k as f64 + 0.5) * bar;
                    Some(Text::new(
                        format!("{v:.1}"),
                        (x, (v + 1.5).min(97.0)),
                        ("sans-serif", 12)
                            .into_font()
                            .color(&BLACK)
                            .pos(Pos::new(HPos::Center, VPos::Bottom)),
                    ))
                });
                chart.draw_series(labels).map_err(plot_err)?;
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperRight)
                .draw()
                .map_err(plot_err)?;
            root.present().map_err(plot_err)?;
        }
        let mut f = AtomicFile::create(path)?;
        f.write_all(svg.as_bytes())?;
        f.commit()
    }
}

fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("cannot draw the plot: {e:?}")
}
