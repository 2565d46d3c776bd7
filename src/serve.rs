//! `patchcore serve`: a trained model behind HTTP (axum on tokio).
//!
//! - `POST /predict` with an image as the body answers what `NAME.json` holds (size, score,
//!   normalized score, verdict, regions) as JSON; `?heatmap=png` adds the heatmap as a 16-bit
//!   grayscale PNG (`heatmap_png`, base64; pixel value v stands for `v / 65535 *
//!   heatmap_png_max`), `?heatmap=npy` as the float32 `NAME.npy` bytes (`heatmap_npy`), and
//!   `?overlay=jpg` the `NAME.jpg` overlay (`overlay_jpg`).
//! - `GET /health`: status and the requests queued and in flight; `GET /model`: backbone,
//!   preprocessing, bank size, thresholds in force, calibration and training summary.
//!
//! The model loads once, onto one scoring thread that owns it (libtorch and FAISS stay on one
//! thread). Requests are decoded and preprocessed on tokio's blocking pool (a bad image gets 400
//! with predict's error line, naming "request body"), then wait in a bounded queue
//! (`--queue`; full: 503 with `Retry-After`). The scoring thread takes every queued request up
//! to `--batch-size` and scores them in one forward pass and one kNN search, with predict's
//! scoring step (`scoring::ImageScorer`) and verdict (`verdict::assess`): a request scored
//! alone gets predict's numbers exactly (predict `-b 1`); batched with others, the same to
//! float rounding of the batched arithmetic. SIGTERM or Ctrl-C stops accepting, answers the
//! requests in flight and exits 0.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use ndarray::Array2;
use ndarray_npy::WriteNpyExt;
use serde::{Deserialize, Serialize};
use tch::Device;
use tokio::sync::{mpsc, oneshot};

use crate::features::extractor::{self, Prepared};
use crate::features::images::{self, ImageFile};
use crate::features::weights::WeightsSpec;
use crate::model::bank::{self, ModelInfo};
use crate::model::ensemble::EnsembleInfo;
use crate::model::scoring::ScoredImage;
use crate::model::verdict;
use crate::model::{Model, Sidecar};
use crate::outputs::files::{self as outputs, Thresholds};
use crate::outputs::regions::Region;
use crate::util::log::{self, Level};

/// What errors call a request's image.
pub const REQUEST_NAME: &str = "request body";

/// What `patchcore serve` runs with.
pub struct ServeOptions {
    /// Model index written by `patchcore train` (its sidecar beside it).
    pub index: PathBuf,
    pub listen: SocketAddr,
    /// Where the backbone weights are, if not where the model recorded them.
    pub weights: Option<WeightsSpec>,
    /// IVF lists searched per query instead of the model's.
    pub nprobe: Option<u32>,
    /// Image threshold overriding the model's calibrated one.
    pub threshold: Option<f32>,
    /// Pixel threshold overriding the model's (default: scaled with `threshold`).
    pub pixel_threshold: Option<f32>,
    /// Region outlines instead of the heatmap on the overlay.
    pub contour: bool,
    /// Requests that may wait for the scoring thread.
    pub queue: usize,
    /// Largest request body in bytes.
    pub max_body: usize,
    /// How long a stop waits for the requests in flight.
    pub shutdown_timeout: Duration,
    /// Most requests (and network inputs) per forward pass.
    pub batch_size: usize,
    pub device: Device,
    pub quiet: bool,
}

/// What a request asked for besides the verdict.
#[derive(Debug, Default, Deserialize)]
struct Extras {
    /// `png` or `npy`.
    heatmap: Option<String>,
    /// `jpg`.
    overlay: Option<String>,
}

/// The answer to `POST /predict`: `NAME.json`'s fields (less the output file names), and the
/// images asked for, base64-encoded.
#[derive(Debug, Serialize)]
struct Prediction {
    width: u32,
    height: u32,
    score: f32,
    normalized_score: Option<f32>,
    verdict: Option<&'static str>,
    regions: Vec<Region>,
    #[serde(skip_serializing_if = "Option::is_none")]
    heatmap_png: Option<String>,
    /// The heatmap value PNG level 65535 stands for (the heatmap's maximum).
    #[serde(skip_serializing_if = "Option::is_none")]
    heatmap_png_max: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    heatmap_npy: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    overlay_jpg: Option<String>,
}

/// A request waiting for the scoring thread: its network inputs and where the scored image
/// goes.
struct Job {
    inputs: Vec<Prepared>,
    reply: oneshot::Sender<Result<ScoredImage, String>>,
}

/// What the handlers share.
struct AppState {
    queue: mpsc::Sender<Job>,
    queue_capacity: usize,
    /// Requests received and not yet answered (decoding, queued, scoring or encoding).
    in_flight: AtomicUsize,
    /// Requests the scoring thread is scoring now.
    scoring: Arc<AtomicUsize>,
    preprocess: images::Preprocess,
    tile: Option<u32>,
    thresholds: Option<Thresholds>,
    contour: bool,
    max_body: usize,
    /// The body of `GET /model`.
    model: String,
}

/// Serves the model until SIGTERM or Ctrl-C; returns once the requests in flight are answered.
pub fn run(args: &ServeOptions) -> Result<()> {
    let (device, batch_size, quiet) = (args.device, args.batch_size, args.quiet);
    if args.queue == 0 {
        bail!("--queue must be at least 1");
    }
    let sidecar = Sidecar::read(&args.index, args.weights.is_some())?;
    sidecar.check_scorable(&args.index)?;
    let thresholds = verdict::thresholds_from(
        sidecar.stored_thresholds(),
        args.threshold,
        args.pixel_threshold,
    )?;
    if args.contour && thresholds.is_none() {
        bail!(
            "--contour needs a threshold: model {} has no calibration, pass --threshold",
            args.index.display()
        );
    }
    let (weights, nprobe) = (args.weights.clone(), args.nprobe);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the HTTP runtime")?;
    // Bound first, so a busy port fails before the model loads.
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(args.listen))
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let address = listener.local_addr()?;

    let (queue, jobs) = mpsc::channel::<Job>(args.queue);
    let (loaded_tx, loaded) = std::sync::mpsc::channel::<Result<Sidecar>>();
    let index = args.index.clone();
    let scoring = Arc::new(AtomicUsize::new(0));
    let busy = Arc::clone(&scoring);
    let worker = std::thread::Builder::new()
        .name("scoring".into())
        .spawn(move || {
            let model = sidecar.load(&index, weights.as_ref(), nprobe, device, quiet);
            match model {
                Ok(model) => {
                    let _ = loaded_tx.send(Ok(model.sidecar()));
                    score_jobs(&index, model, jobs, batch_size, &busy);
                }
                Err(e) => {
                    let _ = loaded_tx.send(Err(e));
                }
            }
        })?;
    // From here SIGTERM no longer kills the process: one arriving while the model loads
    // stops the server as soon as it starts, with nothing in flight (exit 0).
    let term = {
        let _in_runtime = runtime.enter();
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    };
    let sidecar = loaded
        .recv()
        .context("the scoring thread ended while loading the model")??;
    // The sidecar loaded: another run may have replaced the model since it was first read.
    let thresholds = verdict::thresholds_from(
        sidecar.stored_thresholds(),
        args.threshold,
        args.pixel_threshold,
    )?;
    let model = match &sidecar {
        Sidecar::Single(info) => describe(&args.index, info, thresholds),
        Sidecar::Ensemble(e) => describe_ensemble(&args.index, e, thresholds),
    };
    let (preprocess, tile) = sidecar.preprocess();

    let state = Arc::new(AppState {
        queue,
        queue_capacity: args.queue,
        in_flight: AtomicUsize::new(0),
        scoring,
        preprocess,
        tile,
        thresholds,
        contour: args.contour,
        max_body: args.max_body,
        model,
    });
    let app = Router::new()
        .route("/predict", post(predict))
        .route("/health", get(health))
        .route("/model", get(model_summary))
        .with_state(state);
    // With port 0 the address is news even to a quiet caller: it cannot connect without it.
    if !quiet || args.listen.port() == 0 {
        log::emit(
            Level::Info,
            &format!(
                "serving {} on http://{address} (POST /predict, GET /health, GET /model)",
                args.index.display()
            ),
            serde_json::json!({"event": "listening", "address": address.to_string()}),
        );
    }
    let grace = args.shutdown_timeout;
    let stop = Arc::new(tokio::sync::Notify::new());
    let finished = runtime.block_on(async {
        let stopping = Arc::clone(&stop);
        let serving = axum::serve(listener, app).with_graceful_shutdown(async move {
            stop_requested(term).await;
            stopping.notify_one();
        });
        tokio::select! {
            served = serving => served.map(|()| true),
            () = async { stop.notified().await; tokio::time::sleep(grace).await } => Ok(false),
        }
    })?;
    if !finished {
        log::warn(&format!(
            "requests still in flight {} s after the stop signal: exiting without them",
            grace.as_secs()
        ));
        return Ok(());
    }
    // The router and its queue sender are gone: the scoring thread finishes and ends.
    worker
        .join()
        .map_err(|_| anyhow::anyhow!("the scoring thread failed"))?;
    if !quiet {
        log::emit(
            Level::Info,
            "stopped: every request in flight was answered",
            serde_json::json!({"event": "stopped"}),
        );
    }
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C (the latter seen through `interrupt`, whose handler owns
/// SIGINT).
async fn stop_requested(term: std::io::Result<tokio::signal::unix::Signal>) {
    let mut term = match term {
        Ok(s) => Some(s),
        Err(e) => {
            log::warn(&format!("cannot watch SIGTERM: {e}"));
            None
        }
    };
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = async { term.as_mut().expect("checked").recv().await }, if term.is_some() => return,
            _ = tick.tick() => {
                if crate::util::interrupt::requested() {
                    return;
                }
            }
        }
    }
}

/// The scoring thread: waits for a request, takes every other queued one up to `batch_size`,
/// scores them together and answers each; ends when the server has stopped.
fn score_jobs(
    index: &Path,
    mut model: Model,
    mut jobs: mpsc::Receiver<Job>,
    batch_size: usize,
    scoring: &AtomicUsize,
) {
    let mut gate = Gate::from_env();
    while let Some(first) = jobs.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < batch_size {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        scoring.store(batch.len(), Ordering::SeqCst);
        gate.wait();
        let mut replies = Vec::with_capacity(batch.len());
        let mut inputs = Vec::new();
        for job in batch {
            inputs.extend(job.inputs);
            replies.push(job.reply);
        }
        let mut replies = replies.into_iter();
        // A client that went away no longer waits for its answer.
        let mut answer = |image| {
            if let Some(reply) = replies.next() {
                let _ = reply.send(Ok(image));
            }
        };
        let scored = model.score_prepared(index, inputs, batch_size, &mut answer);
        if let Err(e) = scored {
            let msg = format!("{e:#}");
            let line = msg.lines().next().unwrap_or(&msg).to_string();
            log::error(&format!("scoring failed: {line}"));
            for reply in replies {
                let _ = reply.send(Err(line.clone()));
            }
        }
        scoring.store(0, Ordering::SeqCst);
    }
}

/// Test-only hook (tests/serve.rs), unset in normal use: the path of a gate file. While the
/// file exists and holds a number (none: 0) no greater than the batches already let through,
/// the scoring thread waits, its next batch formed and counted in /health's `scoring`,
/// before scoring it (at most 5 minutes per batch). The tests so hold requests queued or in
/// flight for as long as they need, and see the batches that form, where they would
/// otherwise race a timing window.
pub const SCORING_GATE: &str = "PATCHCORE_TEST_SCORING_GATE";

/// See [`SCORING_GATE`].
struct Gate {
    path: Option<PathBuf>,
    passed: u64,
}

impl Gate {
    fn from_env() -> Gate {
        Gate {
            path: std::env::var_os(SCORING_GATE).map(PathBuf::from),
            passed: 0,
        }
    }

    fn wait(&mut self) {
        let Some(path) = &self.path else { return };
        let deadline = std::time::Instant::now() + Duration::from_secs(300);
        while std::time::Instant::now() < deadline {
            match std::fs::read_to_string(path) {
                Err(_) => break,
                Ok(text) if text.trim().parse::<u64>().unwrap_or(0) > self.passed => break,
                Ok(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        self.passed += 1;
    }
}

/// A JSON error answer: `{"error": "one line"}`.
fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    let text = message.to_string();
    let line = text.lines().next().unwrap_or("").to_string();
    (status, Json(serde_json::json!({ "error": line }))).into_response()
}

/// Counts a request as in flight while it lives.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn new(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::SeqCst);
        InFlight(n)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn predict(
    State(state): State<Arc<AppState>>,
    extras: Result<Query<Extras>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let _counted = InFlight::new(&state.in_flight);
    // A declared length over the limit is refused before any of the body is read.
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > state.max_body as u64) {
        return too_large();
    }
    let body = match axum::body::to_bytes(body, state.max_body).await {
        Ok(b) => b,
        Err(e) if is_length_limit(&e) => return too_large(),
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("cannot read the request body: {e}"),
            )
        }
    };
    // Checked once the body is read: a client still sending would see a broken pipe.
    let Ok(Query(extras)) = extras else {
        return error(
            StatusCode::BAD_REQUEST,
            "cannot read the query: use heatmap=png|npy and overlay=jpg",
        );
    };
    if !matches!(extras.heatmap.as_deref(), None | Some("png") | Some("npy"))
        || !matches!(extras.overlay.as_deref(), None | Some("jpg"))
    {
        return error(
            StatusCode::BAD_REQUEST,
            "heatmap must be png or npy, overlay must be jpg",
        );
    }
    let (preprocess, tile) = (state.preprocess, state.tile);
    let prepared = tokio::task::spawn_blocking(move || -> Result<Vec<Prepared>> {
        let image = images::decode_rgb(&body, REQUEST_NAME)?;
        let file = ImageFile {
            path: PathBuf::from(REQUEST_NAME),
            relative: PathBuf::from(REQUEST_NAME),
        };
        extractor::prepare_decoded(&file, Arc::new(image), preprocess, tile)
    })
    .await;
    let inputs = match prepared {
        Ok(Ok(inputs)) => inputs,
        Ok(Err(e)) => return error(StatusCode::BAD_REQUEST, format!("{e:#}")),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let (reply, answer) = oneshot::channel();
    if let Err(e) = state.queue.try_send(Job { inputs, reply }) {
        let why = match e {
            mpsc::error::TrySendError::Full(_) => "the queue is full: try again shortly",
            mpsc::error::TrySendError::Closed(_) => "the server is stopping",
        };
        let mut response = error(StatusCode::SERVICE_UNAVAILABLE, why);
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        return response;
    }
    let image = match answer.await {
        Ok(Ok(image)) => image,
        Ok(Err(line)) => return error(StatusCode::INTERNAL_SERVER_ERROR, line),
        Err(_) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the scoring thread ended",
            )
        }
    };
    let (thresholds, contour) = (state.thresholds, state.contour);
    match tokio::task::spawn_blocking(move || answer_for(&image, thresholds, contour, &extras))
        .await
    {
        Ok(Ok(p)) => Json(p).into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

fn too_large() -> Response {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "request body is larger than --max-body",
    )
}

/// Whether reading a body failed on its length limit.
fn is_length_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// predict's verdict on a scored image, with the images asked for.
fn answer_for(
    image: &ScoredImage,
    thresholds: Option<Thresholds>,
    contour: bool,
    extras: &Extras,
) -> Result<Prediction> {
    let Some(heat) = &image.heatmap else {
        bail!("internal error: the image was scored without its heatmap");
    };
    let assessment = verdict::assess(image.score, heat, thresholds);
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let mut p = Prediction {
        width: image.original.width(),
        height: image.original.height(),
        score: assessment.score,
        normalized_score: assessment.normalized_score,
        verdict: assessment.verdict,
        regions: assessment.regions.clone(),
        heatmap_png: None,
        heatmap_png_max: None,
        heatmap_npy: None,
        overlay_jpg: None,
    };
    match extras.heatmap.as_deref() {
        Some("png") => {
            let (png, max) = heatmap_png(heat)?;
            p.heatmap_png = Some(b64(&png));
            p.heatmap_png_max = Some(max);
        }
        Some("npy") => {
            let mut npy = Vec::new();
            heat.write_npy(&mut npy)?;
            p.heatmap_npy = Some(b64(&npy));
        }
        _ => {}
    }
    if extras.overlay.is_some() {
        let overlay = verdict::overlay(&image.original, heat, &assessment, thresholds, contour);
        p.overlay_jpg = Some(b64(&outputs::jpeg_bytes(&overlay)?));
    }
    Ok(p)
}

/// The heatmap as a 16-bit grayscale PNG scaled linearly from 0 to its maximum, and that
/// maximum.
fn heatmap_png(heat: &Array2<f32>) -> Result<(Vec<u8>, f32)> {
    let max = heat.iter().copied().fold(0.0f32, f32::max);
    let scale = if max > 0.0 { 65535.0 / max } else { 0.0 };
    let (h, w) = heat.dim();
    let levels: Vec<u16> = heat
        .iter()
        .map(|&v| (v.max(0.0) * scale).round().min(65535.0) as u16)
        .collect();
    let img = image::ImageBuffer::<image::Luma<u16>, _>::from_raw(w as u32, h as u32, levels)
        .context("heatmap size")?;
    let mut png = Vec::new();
    img.write_with_encoder(image::codecs::png::PngEncoder::new(&mut png))?;
    Ok((png, max))
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    let queued = state.queue_capacity - state.queue.capacity();
    Json(serde_json::json!({
        "status": "ok",
        "queued": queued,
        "queue_capacity": state.queue_capacity,
        "in_flight": state.in_flight.load(Ordering::SeqCst),
        "scoring": state.scoring.load(Ordering::SeqCst),
    }))
    .into_response()
}

async fn model_summary(State(state): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        state.model.clone(),
    )
        .into_response()
}

/// `GET /model`: what the model is and the thresholds in force (typed, so float32 values
/// print as in the sidecar).
#[derive(Serialize)]
struct ModelSummary<'a> {
    index: String,
    program_version: &'a str,
    backbone: &'a str,
    layers: &'a [String],
    weights: &'a crate::util::records::WeightsInfo,
    preprocess: images::Preprocess,
    tile: Option<u32>,
    precision: crate::util::records::Precision,
    n_neighbors: usize,
    score_reweighting: Option<usize>,
    bank_size: usize,
    thresholds: Option<Thresholds>,
    calibration: Option<CalibrationSummary<'a>>,
    training: &'a bank::TrainingSummary,
}

/// The calibration without its lists of scores.
#[derive(Serialize)]
struct CalibrationSummary<'a> {
    images: usize,
    rule: &'a str,
    method: crate::util::records::Rule,
    image_threshold: f32,
    pixel_threshold: f32,
    false_alarm_bound: f64,
    folder: Option<&'a str>,
}

fn describe(index: &Path, info: &ModelInfo, thresholds: Option<Thresholds>) -> String {
    let summary = ModelSummary {
        index: index.display().to_string(),
        program_version: &info.program_version,
        backbone: &info.backbone,
        layers: &info.layers,
        weights: &info.weights,
        preprocess: info.preprocess,
        tile: info.tile,
        precision: info.precision,
        n_neighbors: info.n_neighbors,
        score_reweighting: info.score_reweighting,
        bank_size: info.bank_size,
        thresholds,
        calibration: info.calibration.as_ref().map(|c| CalibrationSummary {
            images: c.images,
            rule: &c.rule,
            method: c.method,
            image_threshold: c.image_threshold,
            pixel_threshold: c.pixel_threshold,
            false_alarm_bound: c.false_alarm_bound,
            folder: c.folder.as_deref(),
        }),
        training: &info.training,
    };
    serde_json::to_string(&summary).expect("plain data serializes")
}

/// `GET /model` of an ensemble: its sidecar (every backbone with its thresholds) and the
/// thresholds in force on the combined score.
fn describe_ensemble(index: &Path, info: &EnsembleInfo, thresholds: Option<Thresholds>) -> String {
    serde_json::to_string(&serde_json::json!({
        "index": index.display().to_string(),
        "thresholds": thresholds,
        "ensemble": info,
    }))
    .expect("plain data serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heatmap_png_spans_zero_to_the_maximum() {
        let heat = Array2::from_shape_vec((1, 3), vec![0.0f32, 1.0, 2.0]).unwrap();
        let (png, max) = heatmap_png(&heat).unwrap();
        assert_eq!(max, 2.0);
        let img = image::load_from_memory(&png).unwrap().into_luma16();
        assert_eq!(img.as_raw(), &vec![0u16, 32768, 65535]);
    }
}
