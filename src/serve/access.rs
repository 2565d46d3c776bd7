//! One log line per request (text, or JSON with `--json-logs`): its id (also sent back as
//! `X-Request-Id`), endpoint, status, request bytes and seconds; for a scored image its queue
//! and scoring seconds, score, verdict and the model's checksum; for an error its reason.
//! Every request is also counted in `patchcore_requests_total`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;

use super::AppState;
use crate::util::log::{self, Level};

/// What a handler tells the request log, as an extension of its response.
#[derive(Debug, Clone, Default)]
pub(super) struct Outcome {
    pub queue_s: Option<f64>,
    pub scoring_s: Option<f64>,
    pub score: Option<f32>,
    pub verdict: Option<&'static str>,
    pub checksum: Option<String>,
    /// Why the request was refused or failed.
    pub error: Option<String>,
}

impl Outcome {
    pub fn failed(reason: String) -> Outcome {
        Outcome {
            error: Some(reason),
            ..Outcome::default()
        }
    }
}

/// The endpoints, as counted (anything else: "other", so that no client can grow the
/// metrics without bound).
const ENDPOINTS: &[&str] = &["/predict", "/health", "/model", "/metrics", "/openapi.json"];

/// The middleware: numbers the request, runs it, logs it and counts it.
pub(super) async fn log_request(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let id = state.requests.fetch_add(1, Ordering::SeqCst) + 1;
    let started = Instant::now();
    let method = request.method().to_string();
    let path = request.uri().path();
    let endpoint = ENDPOINTS
        .iter()
        .find(|e| **e == path)
        .copied()
        .unwrap_or("other");
    let bytes = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let mut response = next.run(request).await;
    let status = response.status().as_u16();
    state.stats.metrics.request(endpoint, status);
    response
        .headers_mut()
        .insert("x-request-id", HeaderValue::from(id));
    let outcome = response
        .extensions()
        .get::<Outcome>()
        .cloned()
        .unwrap_or_default();
    if state.quiet && outcome.error.is_none() {
        return response;
    }
    let seconds = started.elapsed().as_secs_f64();
    let line = Line {
        id,
        method: &method,
        endpoint,
        status,
        bytes,
        seconds,
        outcome: &outcome,
    };
    let level = match status {
        500.. => Level::Error,
        400.. => Level::Warning,
        _ => Level::Info,
    };
    log::emit(level, &line.text(), line.fields());
    response
}

struct Line<'a> {
    id: u64,
    method: &'a str,
    endpoint: &'a str,
    status: u16,
    bytes: u64,
    seconds: f64,
    outcome: &'a Outcome,
}

impl Line<'_> {
    fn text(&self) -> String {
        let o = self.outcome;
        let mut text = format!(
            "request {} {} {} {} bytes={} seconds={:.4}",
            self.id, self.method, self.endpoint, self.status, self.bytes, self.seconds
        );
        if let (Some(q), Some(s)) = (o.queue_s, o.scoring_s) {
            text += &format!(" queue={q:.4} scoring={s:.4}");
        }
        if let Some(score) = o.score {
            text += &format!(" score={score}");
        }
        if let Some(verdict) = o.verdict {
            text += &format!(" verdict={verdict}");
        }
        if let Some(checksum) = &o.checksum {
            text += &format!(" model={}", &checksum[..16.min(checksum.len())]);
        }
        if let Some(error) = &o.error {
            text += &format!(" error: {error}");
        }
        text
    }

    fn fields(&self) -> serde_json::Value {
        let o = self.outcome;
        serde_json::json!({
            "event": "request",
            "id": self.id,
            "method": self.method,
            "endpoint": self.endpoint,
            "status": self.status,
            "bytes": self.bytes,
            "seconds": self.seconds,
            "queue_seconds": o.queue_s,
            "scoring_seconds": o.scoring_s,
            "score": o.score,
            "verdict": o.verdict,
            "model_checksum": o.checksum,
            "error": o.error,
        })
    }
}
