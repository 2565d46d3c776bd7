//! What a `POST /predict` sent: the image bytes, from a raw body or from a
//! `multipart/form-data` form with one file field (`curl -F file=@part.png`, a browser form,
//! Python `requests`' `files=`), read within `--max-body` and the read and request timeouts.

use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use http_body_util::BodyExt;

use super::error;

/// How much of a body, and how slowly, a client may send.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    /// Largest request body in bytes (`--max-body`).
    pub max_body: usize,
    /// Longest wait for the next piece of a body (`--read-timeout`).
    pub read_timeout: Duration,
    /// Longest time to receive a whole body (`--request-timeout`).
    pub request_timeout: Duration,
}

/// How to send an image, for the errors that refuse what was sent.
pub(super) const HOW_TO_SEND: &str =
    "send the image file as the body (curl --data-binary @part.png) or as one form file field \
     (curl -F file=@part.png)";

/// The image bytes of a request: its body, or the file field of its form. Errors are the
/// answers to send (400, 408, 413).
pub(super) async fn image_bytes(request: Request, limits: &Limits) -> Result<Bytes, Response> {
    let (parts, body) = request.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // A declared length over the limit is refused before any of the body is read.
    if declared.is_some_and(|n| n > limits.max_body as u64) {
        return Err(too_large(limits.max_body));
    }
    let raw = read_body(body, limits).await?;
    if !is_form(&parts.headers) {
        return Ok(raw);
    }
    file_field(Request::from_parts(parts, Body::from(raw))).await
}

/// Reads and drops what a refused request's client is still sending (at most `max_body`
/// bytes, for at most `LINGER`), so that it reads the answer: closing a connection with
/// unread bytes makes the kernel reset it, and the client then sees a broken pipe or a
/// reset instead of the answer (as nginx's lingering close). Nothing is kept.
pub(super) async fn discard(request: Request, max_body: usize) {
    let mut body = request.into_body();
    let mut seen = 0usize;
    let _ = tokio::time::timeout(LINGER, async {
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, |d| d.len());
            if seen > max_body {
                break;
            }
        }
    })
    .await;
}

/// How long a refused request's body is read and dropped ([`discard`]).
const LINGER: Duration = Duration::from_secs(1);

/// 413 naming the limit.
pub(super) fn too_large(max_body: usize) -> Response {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the request body is larger than the limit of {max_body} bytes (--max-body)"),
    )
}

fn is_form(headers: &HeaderMap) -> bool {
    content_type(headers).starts_with("multipart/form-data")
}

/// The request's content type, lower-case ("" without one).
pub(super) fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase()
}

/// The body, piece by piece: 408 when a piece takes longer than the read timeout or the
/// whole longer than the request timeout, 413 past the size limit.
async fn read_body(mut body: Body, limits: &Limits) -> Result<Bytes, Response> {
    let deadline = Instant::now() + limits.request_timeout;
    let mut bytes = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (wait, what) = if left < limits.read_timeout {
            (left, request_timed_out(limits.request_timeout))
        } else {
            (limits.read_timeout, read_timed_out(limits.read_timeout))
        };
        let frame = match tokio::time::timeout(wait, body.frame()).await {
            Err(_) => return Err(error(StatusCode::REQUEST_TIMEOUT, what)),
            Ok(None) => return Ok(Bytes::from(bytes)),
            Ok(Some(Err(e))) => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    format!("cannot read the request body: {e}"),
                ))
            }
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            if bytes.len() + data.len() > limits.max_body {
                return Err(too_large(limits.max_body));
            }
            bytes.extend_from_slice(&data);
        }
    }
}

fn read_timed_out(t: Duration) -> String {
    format!(
        "the request body stalled: nothing arrived for {} s (--read-timeout)",
        t.as_secs_f64()
    )
}

fn request_timed_out(t: Duration) -> String {
    format!(
        "the request body took longer than {} s to arrive (--request-timeout)",
        t.as_secs_f64()
    )
}

/// The one file field of a form (or its one field, if none is a file).
async fn file_field(request: Request) -> Result<Bytes, Response> {
    let bad = |why: String| error(StatusCode::BAD_REQUEST, format!("{why}: {HOW_TO_SEND}"));
    let mut form = Multipart::from_request(request, &())
        .await
        .map_err(|e| bad(format!("cannot read the form ({})", e.body_text())))?;
    let (mut files, mut others) = (Vec::new(), Vec::new());
    loop {
        let field = match form.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(e) => return Err(bad(format!("cannot read the form ({})", e.body_text()))),
        };
        let is_file = field.file_name().is_some();
        let data = field
            .bytes()
            .await
            .map_err(|e| bad(format!("cannot read the form ({})", e.body_text())))?;
        if is_file { &mut files } else { &mut others }.push(data);
    }
    match (files.len(), others.len()) {
        (1, _) => Ok(files.pop().expect("one")),
        (0, 1) => Ok(others.pop().expect("one")),
        (0, 0) => Err(bad("the form has no fields".into())),
        (0, n) => Err(bad(format!("the form has {n} fields and no file"))),
        (n, _) => Err(bad(format!("the form has {n} file fields, not one"))),
    }
}
