//! `patchcore serve`: a trained model behind HTTP (axum on tokio).
//!
//! - `POST /predict` with an image as the body, or as the one file field of a
//!   `multipart/form-data` form (`curl -F file=@part.png`), answers what `NAME.json` holds
//!   (size, score, normalized score, verdict, regions) as JSON; `?heatmap=png` adds the heatmap
//!   as a 16-bit grayscale PNG (`heatmap_png`, base64; pixel value v stands for `v / 65535 *
//!   heatmap_png_max`), `?heatmap=npy` as the float32 `NAME.npy` bytes (`heatmap_npy`), and
//!   `?overlay=jpg` the `NAME.jpg` overlay (`overlay_jpg`).
//! - `GET /health`: status, the requests queued and in flight, the model's checksum and since
//!   when it is loaded; `GET /model`: backbone, preprocessing, bank size, thresholds in force,
//!   calibration and training summary, checksum; `GET /metrics`: Prometheus metrics
//!   ([`metrics`]); `GET /openapi.json`: the OpenAPI document of all of these ([`openapi`]).
//!   Every error answer is JSON `{"error": "one line"}`, 404 and 405 included.
//!
//! The model loads onto the scoring thread that owns it (libtorch and FAISS stay on one
//! thread). A request takes one of `--queue` + `--batch-size` places before its body is read
//! (none free: 503 with `Retry-After`, once the body still coming was read and dropped for
//! at most a second, so the client reads the answer), and keeps it until answered, so at most that many
//! bodies (each at most `--max-body`) and decoded images (each at most `--max-pixels`, read
//! from the header before decoding) are held at once: that is the memory bound. The body
//! must arrive within `--request-timeout`, with no pause over `--read-timeout` (408). It is
//! decoded and preprocessed on tokio's blocking pool (a bad image gets 400 with predict's
//! error line, naming "request body"), then waits in the queue. The scoring thread takes
//! every queued request up to `--batch-size` and scores them in one forward pass and one kNN
//! search, with predict's scoring step (`scoring::ImageScorer`) and verdict
//! (`verdict::assess`): a request scored alone gets predict's numbers exactly (predict `-b
//! 1`); batched with others, the same to float rounding of the batched arithmetic.
//!
//! SIGHUP reloads the model from its path (index, sidecar, thresholds) on the other, idle
//! scoring thread (there are two, taking turns: [`scoring::Scorers`]) while the current one
//! goes on scoring; once loaded, a handover mark is queued: the current thread scores every
//! request queued before it, then hands the queue over, drops its model and idles, so each
//! request is scored and answered by one model, and none fails. A model that fails to
//! load is logged and the old one stays. SIGTERM or Ctrl-C stops accepting, answers the
//! requests in flight and exits 0. One log line per request ([`access`]).

mod access;
mod metrics;
mod model;
mod openapi;
mod scoring;

pub use scoring::SCORING_GATE;
use scoring::{request_file, Scorers};
mod upload;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use image::RgbImage;
use ndarray::Array2;
use ndarray_npy::WriteNpyExt;
use serde::{Deserialize, Serialize};
use tch::Device;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::features::extractor::{self, Prepared};
use crate::features::images;
use crate::features::weights::WeightsSpec;
use crate::model::scoring::ScoredImage;
use crate::model::verdict;
use crate::model::{Model, Sidecar};
use crate::outputs::files::{self as outputs, Thresholds};
use crate::outputs::regions::Region;
use crate::util::log::{self, Level};
use access::Outcome;
use metrics::Metrics;
use model::ModelView;
use upload::Limits;

/// What errors call a request's image.
pub const REQUEST_NAME: &str = "request body";

/// What `patchcore serve` runs with.
pub struct ServeOptions {
    /// Model index written by `patchcore train` (its sidecar beside it).
    pub index: PathBuf,
    /// `HOST:PORT` to listen on; a host name is resolved (`localhost:8080`).
    pub listen: String,
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
    /// Largest image in pixels, read from its header.
    pub max_pixels: u64,
    /// Longest pause while a request body arrives.
    pub read_timeout: Duration,
    /// Longest time for a whole request body to arrive.
    pub request_timeout: Duration,
    /// How long a stop waits for the requests in flight.
    pub shutdown_timeout: Duration,
    /// Most requests (and network inputs) per forward pass.
    pub batch_size: usize,
    pub device: Device,
    pub quiet: bool,
}

/// What loading the model needs, at start and at each reload.
#[derive(Clone)]
struct ModelOptions {
    index: PathBuf,
    weights: Option<WeightsSpec>,
    nprobe: Option<u32>,
    threshold: Option<f32>,
    pixel_threshold: Option<f32>,
    contour: bool,
    device: Device,
    quiet: bool,
}

/// Reads and loads the model at its path (index, sidecar, thresholds) on the calling thread,
/// the one that will score with it: at start and on each SIGHUP.
fn load_model(o: &ModelOptions) -> Result<(Model, ModelView)> {
    let sidecar = Sidecar::read(&o.index, o.weights.is_some())?;
    sidecar.check_scorable(&o.index)?;
    // Refused before the (slow) load: thresholds that cannot be, --contour without any.
    served_thresholds(o, &sidecar)?;
    let model = sidecar.load(&o.index, o.weights.as_ref(), o.nprobe, o.device, o.quiet)?;
    // The sidecar loaded: another run may have replaced the model since it was first read.
    let sidecar = model.sidecar();
    let thresholds = served_thresholds(o, &sidecar)?;
    let view = ModelView::new(&o.index, &sidecar, thresholds);
    Ok((model, view))
}

/// The thresholds in force with `sidecar`, the command line's first.
fn served_thresholds(o: &ModelOptions, sidecar: &Sidecar) -> Result<Option<Thresholds>> {
    let thresholds =
        verdict::thresholds_from(sidecar.stored_thresholds(), o.threshold, o.pixel_threshold)?;
    if o.contour && thresholds.is_none() {
        bail!(
            "--contour needs a threshold: model {} has no calibration, pass --threshold",
            o.index.display()
        );
    }
    Ok(thresholds)
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

/// What the scoring thread reads from the queue.
enum Work {
    Score(Job),
    /// A reloaded model is ready: the thread scoring now scores what was queued before this
    /// mark, then sends the queue here and ends.
    Handover(std::sync::mpsc::Sender<mpsc::Receiver<Work>>),
}

/// A request waiting for the scoring thread: its image, its network inputs and where the
/// scored image goes.
struct Job {
    image: Arc<RgbImage>,
    /// The preprocessing `inputs` were made with (a reload may change it).
    prepared_for: (images::Preprocess, Option<u32>),
    inputs: Vec<Prepared>,
    queued_at: Instant,
    reply: oneshot::Sender<Result<Scored, String>>,
}

/// A scored request: the image, the model that scored it, and the time it took.
struct Scored {
    image: ScoredImage,
    view: Arc<ModelView>,
    queue_s: f64,
    scoring_s: f64,
}

/// What the scoring threads share with the handlers.
struct Stats {
    /// Requests the scoring thread is scoring now.
    scoring: AtomicUsize,
    metrics: Metrics,
}

/// What the handlers share.
struct AppState {
    queue: mpsc::Sender<Work>,
    queue_capacity: usize,
    /// One place per request being read, decoded, queued or scored: `--queue` +
    /// `--batch-size` places.
    places: Arc<Semaphore>,
    /// Requests received and not yet answered (decoding, queued, scoring or encoding).
    in_flight: AtomicUsize,
    /// Requests received, for their ids.
    requests: AtomicU64,
    stats: Arc<Stats>,
    /// The model new requests go to.
    current: RwLock<Arc<ModelView>>,
    /// The scoring threads (taken when the server stops).
    scorers: Mutex<Option<Scorers>>,
    model: ModelOptions,
    max_pixels: u64,
    limits: Limits,
    quiet: bool,
}

impl AppState {
    fn view(&self) -> Arc<ModelView> {
        Arc::clone(&self.current.read().expect("not poisoned"))
    }

    fn queued(&self) -> usize {
        self.queue.max_capacity() - self.queue.capacity()
    }
}

/// A server set up: listening, its model loaded, its signals watched.
struct Setup {
    runtime: tokio::runtime::Runtime,
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    term: std::io::Result<Signal>,
    hangup: std::io::Result<Signal>,
}

/// Serves the model until SIGTERM or Ctrl-C; returns once the requests in flight are answered.
pub fn run(args: &ServeOptions) -> Result<()> {
    let Setup {
        runtime,
        listener,
        state,
        term,
        hangup,
    } = set_up(args)?;
    // With port 0 the address is news even to a quiet caller: it cannot connect without it.
    let announce = !args.quiet || args.listen.rsplit(':').next() == Some("0");
    let signals = (term, hangup);
    let served = serve(
        listener,
        Arc::clone(&state),
        signals,
        args.shutdown_timeout,
        announce,
    );
    let finished = runtime.block_on(served)?;
    shut_down(runtime, state, finished, args)
}

/// Binds the address (first, so a busy port fails before the model loads), loads the model
/// on its scoring thread and watches SIGTERM and SIGHUP.
fn set_up(args: &ServeOptions) -> Result<Setup> {
    if args.queue == 0 {
        bail!("--queue must be at least 1");
    }
    let model = ModelOptions {
        index: args.index.clone(),
        weights: args.weights.clone(),
        nprobe: args.nprobe,
        threshold: args.threshold,
        pixel_threshold: args.pixel_threshold,
        contour: args.contour,
        device: args.device,
        quiet: args.quiet,
    };
    // Checked before anything starts, as the load checks them again.
    let sidecar = Sidecar::read(&model.index, model.weights.is_some())?;
    sidecar.check_scorable(&model.index)?;
    served_thresholds(&model, &sidecar)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the HTTP runtime")?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(args.listen.as_str()))
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let places = args.queue + args.batch_size;
    let (queue, jobs) = mpsc::channel::<Work>(places + 1);
    let stats = Arc::new(Stats {
        scoring: AtomicUsize::new(0),
        metrics: Metrics::new(),
    });
    // From here SIGTERM no longer kills the process: one arriving while the model loads
    // stops the server as soon as it starts, with nothing in flight (exit 0). SIGHUP then
    // reloads.
    let (term, hangup) = {
        let _in_runtime = runtime.enter();
        (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        )
    };
    let (scorers, view) = start_scoring(&model, jobs, args.batch_size, &stats)?;
    stats
        .metrics
        .model(&model.index.display().to_string(), &view);
    let state = Arc::new(AppState {
        queue,
        queue_capacity: args.queue,
        places: Arc::new(Semaphore::new(places)),
        in_flight: AtomicUsize::new(0),
        requests: AtomicU64::new(0),
        stats,
        current: RwLock::new(view),
        scorers: Mutex::new(Some(scorers)),
        model,
        max_pixels: args.max_pixels,
        limits: Limits {
            max_body: args.max_body,
            read_timeout: args.read_timeout,
            request_timeout: args.request_timeout,
        },
        quiet: args.quiet,
    });
    Ok(Setup {
        runtime,
        listener,
        state,
        term,
        hangup,
    })
}

/// Starts the scoring threads, the model loaded on one; returns once it is loaded.
fn start_scoring(
    model: &ModelOptions,
    jobs: mpsc::Receiver<Work>,
    batch_size: usize,
    stats: &Arc<Stats>,
) -> Result<(Scorers, Arc<ModelView>)> {
    let mut scorers =
        Scorers::start(model, stats, batch_size).context("cannot start the scoring threads")?;
    let (queue_tx, queue) = std::sync::mpsc::channel();
    let _ = queue_tx.send(jobs);
    let (n, loaded) = scorers.load_on_idle(queue);
    let view = loaded
        .blocking_recv()
        .context("the scoring thread ended while loading the model")??;
    scorers.handed_to(n);
    Ok((scorers, view))
}

/// The router of every endpoint, with JSON 404 and 405 answers and the request log.
fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/predict", post(predict))
        .route("/health", get(health))
        .route("/model", get(model_summary))
        .route("/metrics", get(metrics_text))
        .route("/openapi.json", get(openapi::document))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // The body is read by `upload`, within --max-body.
        .layer(DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            access::log_request,
        ))
        .with_state(state)
}

/// Serves until a stop signal; false when requests were still in flight past the grace time.
async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    (term, hangup): (std::io::Result<Signal>, std::io::Result<Signal>),
    grace: Duration,
    announce: bool,
) -> Result<bool> {
    let address = listener.local_addr()?;
    let index = state.model.index.display().to_string();
    if announce {
        log::emit(
            Level::Info,
            &format!(
                "serving {index} on http://{address} (POST /predict, GET /health, GET /model, \
                 GET /metrics, GET /openapi.json)"
            ),
            serde_json::json!({"event": "listening", "address": address.to_string()}),
        );
    }
    let reloads = tokio::spawn(reload_on_hangup(hangup, Arc::clone(&state)));
    let stop = Arc::new(tokio::sync::Notify::new());
    let stopping = Arc::clone(&stop);
    let app = router(state);
    let serving = axum::serve(listener, app).with_graceful_shutdown(async move {
        stop_requested(term).await;
        stopping.notify_one();
    });
    let finished = tokio::select! {
        served = serving => served.map(|()| true),
        () = async { stop.notified().await; tokio::time::sleep(grace).await } => Ok(false),
    };
    reloads.abort();
    let _ = reloads.await;
    Ok(finished?)
}

/// After the server stopped: waits for the scoring thread (every request was answered) or,
/// when the grace time ran out, says so and leaves.
fn shut_down(
    runtime: tokio::runtime::Runtime,
    state: Arc<AppState>,
    finished: bool,
    args: &ServeOptions,
) -> Result<()> {
    if !finished {
        log::warn(&format!(
            "requests still in flight {} s after the stop signal: exiting without them",
            args.shutdown_timeout.as_secs()
        ));
        return Ok(());
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
    let scorers = state.scorers.lock().expect("not poisoned").take();
    // The router, the reload task and so the queue's senders are gone: the scoring threads
    // finish and end.
    drop(state);
    if let Some(scorers) = scorers {
        scorers.join()?;
    }
    if !args.quiet {
        log::emit(
            Level::Info,
            "stopped: every request in flight was answered",
            serde_json::json!({"event": "stopped"}),
        );
    }
    Ok(())
}

/// Reloads the model on each SIGHUP, one reload at a time.
async fn reload_on_hangup(hangup: std::io::Result<Signal>, state: Arc<AppState>) {
    let mut hangup = match hangup {
        Ok(s) => s,
        Err(e) => {
            log::warn(&format!("cannot watch SIGHUP (no reloads): {e}"));
            return;
        }
    };
    while hangup.recv().await.is_some() {
        reload(&state).await;
    }
}

/// Loads the model again on the idle scoring thread; once loaded, hands the queue over to it
/// (see the module doc). A model that fails to load is logged; the old one stays.
async fn reload(state: &Arc<AppState>) {
    let index = state.model.index.display().to_string();
    let (handover, queue) = std::sync::mpsc::channel::<mpsc::Receiver<Work>>();
    let (n, loaded) = match state.scorers.lock().expect("not poisoned").as_ref() {
        Some(scorers) => scorers.load_on_idle(queue),
        None => return, // stopping
    };
    let view = match loaded.await {
        Ok(Ok(view)) => view,
        Ok(Err(e)) => return reload_failed(state, &index, &format!("{e:#}")),
        Err(_) => return reload_failed(state, &index, "the scoring thread ended"),
    };
    if state.queue.send(Work::Handover(handover)).await.is_err() {
        return; // stopping
    }
    *state.current.write().expect("not poisoned") = Arc::clone(&view);
    if let Some(scorers) = state.scorers.lock().expect("not poisoned").as_mut() {
        scorers.handed_to(n);
    }
    state.stats.metrics.reload(true);
    state.stats.metrics.model(&index, &view);
    log::emit(
        Level::Info,
        &format!(
            "reloaded {index}: model {} since {}",
            &view.checksum[..16],
            view.since()
        ),
        serde_json::json!({"event": "reloaded", "checksum": view.checksum, "loaded_since": view.since()}),
    );
}

fn reload_failed(state: &AppState, index: &str, why: &str) {
    state.stats.metrics.reload(false);
    let old = state.view();
    let line = why.lines().next().unwrap_or(why);
    log::emit(
        Level::Warning,
        &format!(
            "reload of {index} failed, still serving model {} loaded at {}: {line}",
            &old.checksum[..16],
            old.since()
        ),
        serde_json::json!({"event": "reload_failed", "reason": line, "checksum": old.checksum}),
    );
}

/// Resolves on SIGTERM or Ctrl-C (the latter seen through `interrupt`, whose handler owns
/// SIGINT).
async fn stop_requested(term: std::io::Result<Signal>) {
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

/// A JSON error answer: `{"error": "one line"}`.
fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    let text = message.to_string();
    let line = text.lines().next().unwrap_or("").to_string();
    let mut response = (status, Json(serde_json::json!({ "error": line }))).into_response();
    response.extensions_mut().insert(Outcome::failed(line));
    response
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

/// 503 with `Retry-After`.
fn unavailable(why: &str) -> Response {
    let mut response = error(StatusCode::SERVICE_UNAVAILABLE, why);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    response
}

async fn predict(
    State(state): State<Arc<AppState>>,
    extras: Result<Query<Extras>, QueryRejection>,
    request: Request,
) -> Response {
    let _counted = InFlight::new(&state.in_flight);
    // Held until answered: the bound on bodies and images held at once.
    let Ok(_place) = Arc::clone(&state.places).try_acquire_owned() else {
        upload::discard(request, state.limits.max_body).await;
        return unavailable("the queue is full: try again shortly");
    };
    let form = upload::content_type(request.headers());
    let body = match upload::image_bytes(request, &state.limits).await {
        Ok(body) => body,
        Err(refused) => return refused,
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
    let job = match prepare(&state, body, &form).await {
        Ok(job) => job,
        Err(refused) => return refused,
    };
    let scored = match score(&state, job).await {
        Ok(scored) => scored,
        Err(refused) => return refused,
    };
    respond(&state, scored, extras).await
}

/// Decodes and preprocesses a request's image for the current model (413 over
/// `--max-pixels`, 400 when it is no image, saying what to send).
async fn prepare(
    state: &AppState,
    body: axum::body::Bytes,
    content_type: &str,
) -> Result<(Job, oneshot::Receiver<Result<Scored, String>>), Response> {
    if body.is_empty() {
        return Err(error(
            StatusCode::BAD_REQUEST,
            format!("the request body is empty: {}", upload::HOW_TO_SEND),
        ));
    }
    if let Err(e) = images::check_pixels(&body, REQUEST_NAME, state.max_pixels) {
        return Err(error(StatusCode::PAYLOAD_TOO_LARGE, e));
    }
    let view = state.view();
    let prepared_for = (view.preprocess, view.tile);
    let prepared = tokio::task::spawn_blocking(move || -> Result<_> {
        let image = Arc::new(images::decode_rgb(&body, REQUEST_NAME)?);
        let inputs = extractor::prepare_decoded(
            &request_file(),
            Arc::clone(&image),
            prepared_for.0,
            prepared_for.1,
        )?;
        Ok((image, inputs))
    })
    .await;
    let (image, inputs) = match prepared {
        Ok(Ok(prepared)) => prepared,
        Ok(Err(e)) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                not_an_image(&e, content_type),
            ))
        }
        Err(e) => return Err(error(StatusCode::INTERNAL_SERVER_ERROR, e)),
    };
    let (reply, answer) = oneshot::channel();
    let job = Job {
        image,
        prepared_for,
        inputs,
        queued_at: Instant::now(),
        reply,
    };
    Ok((job, answer))
}

/// A decoding error's line, with what to send instead when the body is no image at all.
fn not_an_image(e: &anyhow::Error, content_type: &str) -> String {
    let line = format!("{e:#}");
    if !line.contains("unknown image format") {
        return line;
    }
    if content_type.starts_with("application/x-www-form-urlencoded") {
        return format!(
            "{line}: the body was sent as a URL-encoded form (curl --data, which also drops \
             line breaks): {}",
            upload::HOW_TO_SEND
        );
    }
    format!("{line}: {}", upload::HOW_TO_SEND)
}

/// Queues a prepared request and waits for it to be scored.
async fn score(
    state: &AppState,
    (mut job, answer): (Job, oneshot::Receiver<Result<Scored, String>>),
) -> Result<Scored, Response> {
    job.queued_at = Instant::now();
    if let Err(e) = state.queue.try_send(Work::Score(job)) {
        return Err(unavailable(match e {
            mpsc::error::TrySendError::Full(_) => "the queue is full: try again shortly",
            mpsc::error::TrySendError::Closed(_) => "the server is stopping",
        }));
    }
    match answer.await {
        Ok(Ok(scored)) => Ok(scored),
        Ok(Err(line)) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, line)),
        Err(_) => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the scoring thread ended",
        )),
    }
}

/// The answer to a scored request, with the thresholds of the model that scored it.
async fn respond(state: &AppState, scored: Scored, extras: Extras) -> Response {
    let (thresholds, contour) = (scored.view.thresholds, state.model.contour);
    let image = scored.image;
    let answered =
        tokio::task::spawn_blocking(move || answer_for(&image, thresholds, contour, &extras)).await;
    let p = match answered {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    state
        .stats
        .metrics
        .image(p.verdict, p.score, p.normalized_score);
    let outcome = Outcome {
        queue_s: Some(scored.queue_s),
        scoring_s: Some(scored.scoring_s),
        score: Some(p.score),
        verdict: p.verdict,
        checksum: Some(scored.view.checksum.clone()),
        error: None,
    };
    let mut response = Json(p).into_response();
    response.extensions_mut().insert(outcome);
    response
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
    let view = state.view();
    Json(serde_json::json!({
        "status": "ok",
        "queued": state.queued(),
        "queue_capacity": state.queue_capacity,
        "in_flight": state.in_flight.load(Ordering::SeqCst),
        "scoring": state.stats.scoring.load(Ordering::SeqCst),
        "model_checksum": view.checksum,
        "model_loaded_since": view.since(),
    }))
    .into_response()
}

async fn model_summary(State(state): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        state.view().summary.clone(),
    )
        .into_response()
}

async fn metrics_text(State(state): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        state.stats.metrics.render(state.queued()),
    )
        .into_response()
}

async fn not_found(request: Request) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!(
            "no endpoint {}: POST /predict, GET /health, GET /model, GET /metrics, \
             GET /openapi.json",
            request.uri().path()
        ),
    )
}

async fn method_not_allowed(request: Request) -> Response {
    let path = request.uri().path();
    let allowed = if path == "/predict" { "POST" } else { "GET" };
    let mut response = error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "{} is not allowed on {path}: use {allowed}",
            request.method()
        ),
    );
    response
        .headers_mut()
        .insert(header::ALLOW, header::HeaderValue::from_static(allowed));
    response
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
