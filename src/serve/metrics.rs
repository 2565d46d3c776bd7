//! `GET /metrics`: the server's counters in the Prometheus text exposition format
//! (version 0.0.4, written by the `prometheus` crate).
//!
//! - `patchcore_requests_total{endpoint, status}`: answered requests;
//! - `patchcore_queue_wait_seconds`, `patchcore_scoring_seconds`: a scored request's wait in
//!   the queue, and the time its batch took until its answer;
//! - `patchcore_batch_size`: requests per forward pass; `patchcore_queue_depth`: requests
//!   waiting now;
//! - `patchcore_images_total{verdict}` (`good`, `anomalous`, `none` without a threshold);
//! - `patchcore_image_score` (raw) and `patchcore_image_normalized_score` (score over the
//!   image threshold, 1 = threshold): their drift is what an anomaly-rate alert watches;
//! - `patchcore_reloads_total{result}` (`success`, `failure`);
//! - `patchcore_model_info{checksum, index}` (1 for the model in force) and
//!   `patchcore_model_loaded_timestamp_seconds`.

use std::time::UNIX_EPOCH;

use prometheus::{
    exponential_buckets, Encoder, Gauge, Histogram, HistogramOpts, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use super::model::ModelView;

/// The content type of [`Metrics::render`]'s text.
pub(super) const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Every metric of the server, registered once.
pub(super) struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    queue_wait: Histogram,
    scoring: Histogram,
    batch_size: Histogram,
    queue_depth: IntGauge,
    images: IntCounterVec,
    image_score: Histogram,
    normalized_score: Histogram,
    reloads: IntCounterVec,
    model_info: IntGaugeVec,
    loaded: Gauge,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace("patchcore")
}

fn histogram(name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let o = HistogramOpts::new(name, help)
        .namespace("patchcore")
        .buckets(buckets);
    Histogram::with_opts(o).expect("valid histogram")
}

fn seconds_buckets() -> Vec<f64> {
    exponential_buckets(0.001, 2.0, 16).expect("valid buckets")
}

impl Metrics {
    pub fn new() -> Metrics {
        let counters = |name, help, label| {
            IntCounterVec::new(opts(name, help), &[label]).expect("valid counter")
        };
        let m = Metrics {
            registry: Registry::new(),
            requests: IntCounterVec::new(
                opts(
                    "requests_total",
                    "Requests answered, by endpoint and HTTP status",
                ),
                &["endpoint", "status"],
            )
            .expect("valid counter"),
            queue_wait: histogram(
                "queue_wait_seconds",
                "Seconds a scored request waited in the queue",
                seconds_buckets(),
            ),
            scoring: histogram(
                "scoring_seconds",
                "Seconds from a batch's start to a request's scored image",
                seconds_buckets(),
            ),
            batch_size: histogram(
                "batch_size",
                "Requests per forward pass",
                exponential_buckets(1.0, 2.0, 8).expect("valid buckets"),
            ),
            queue_depth: IntGauge::with_opts(opts(
                "queue_depth",
                "Requests waiting for the scoring thread",
            ))
            .expect("valid gauge"),
            images: counters(
                "images_total",
                "Images scored, by verdict (none: no threshold)",
                "verdict",
            ),
            image_score: histogram(
                "image_score",
                "Image scores (largest patch distance)",
                exponential_buckets(0.01, 2.0, 16).expect("valid buckets"),
            ),
            normalized_score: histogram(
                "image_normalized_score",
                "Image score over the image threshold (above 1: anomalous)",
                vec![0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0],
            ),
            reloads: counters(
                "reloads_total",
                "Model reloads (SIGHUP), by result",
                "result",
            ),
            model_info: IntGaugeVec::new(
                opts("model_info", "The model in force (1), with its checksum"),
                &["checksum", "index"],
            )
            .expect("valid gauge"),
            loaded: Gauge::with_opts(opts(
                "model_loaded_timestamp_seconds",
                "When the model in force was loaded (Unix time)",
            ))
            .expect("valid gauge"),
        };
        let collectors: [Box<dyn prometheus::core::Collector>; 11] = [
            Box::new(m.requests.clone()),
            Box::new(m.queue_wait.clone()),
            Box::new(m.scoring.clone()),
            Box::new(m.batch_size.clone()),
            Box::new(m.queue_depth.clone()),
            Box::new(m.images.clone()),
            Box::new(m.image_score.clone()),
            Box::new(m.normalized_score.clone()),
            Box::new(m.reloads.clone()),
            Box::new(m.model_info.clone()),
            Box::new(m.loaded.clone()),
        ];
        for c in collectors {
            m.registry.register(c).expect("names are unique");
        }
        // Both results show from the start, at 0.
        for result in ["success", "failure"] {
            m.reloads.with_label_values(&[result]);
        }
        m
    }

    pub fn request(&self, endpoint: &str, status: u16) {
        self.requests
            .with_label_values(&[endpoint, &status.to_string()])
            .inc();
    }

    /// A batch of `size` requests started.
    pub fn batch(&self, size: usize) {
        self.batch_size.observe(size as f64);
    }

    pub fn scored(&self, queue_s: f64, scoring_s: f64) {
        self.queue_wait.observe(queue_s);
        self.scoring.observe(scoring_s);
    }

    pub fn image(&self, verdict: Option<&str>, score: f32, normalized: Option<f32>) {
        self.images
            .with_label_values(&[verdict.unwrap_or("none")])
            .inc();
        self.image_score.observe(score as f64);
        if let Some(n) = normalized {
            self.normalized_score.observe(n as f64);
        }
    }

    pub fn reload(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.reloads.with_label_values(&[result]).inc();
    }

    /// `view` of the model at `index` is now in force.
    pub fn model(&self, index: &str, view: &ModelView) {
        self.model_info.reset();
        self.model_info
            .with_label_values(&[view.checksum.as_str(), index])
            .set(1);
        let since = view.loaded_since.duration_since(UNIX_EPOCH);
        self.loaded.set(since.map_or(0.0, |d| d.as_secs_f64()));
    }

    /// The exposition, with the queue's depth `queued` now.
    pub fn render(&self, queued: usize) -> String {
        self.queue_depth.set(queued as i64);
        let mut text = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut text)
            .expect("writing to memory cannot fail");
        String::from_utf8(text).expect("the text format is UTF-8")
    }
}
