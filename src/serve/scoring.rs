//! The scoring thread: it takes the queued requests in batches, scores each batch with the
//! loaded model and answers each request; on a reload it hands the queue over to the new
//! model's thread at its mark.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use image::RgbImage;
use tokio::sync::mpsc;

use super::model::ModelView;
use super::{Job, Scored, Stats, Work, REQUEST_NAME};
use crate::features::extractor::{self, Prepared};
use crate::features::images::{self, ImageFile};
use crate::model::Model;
use crate::util::log;

use anyhow::Result;

/// The scoring thread: waits for a request, takes every other queued one up to `batch_size`,
/// scores them together and answers each; ends when the server has stopped, or hands the
/// queue over to a reloaded model's thread at its mark.
pub(super) fn score_jobs(
    index: &Path,
    mut model: Model,
    view: Arc<ModelView>,
    mut jobs: mpsc::Receiver<Work>,
    batch_size: usize,
    stats: &Stats,
) {
    let mut gate = Gate::from_env();
    let mut handover = None;
    while let Some(first) = jobs.blocking_recv() {
        let mut batch = Vec::new();
        for work in std::iter::once(first).chain(std::iter::from_fn(|| {
            (batch_size > 1).then(|| jobs.try_recv().ok()).flatten()
        })) {
            match work {
                Work::Score(job) => batch.push(job),
                Work::Handover(to) => {
                    handover = Some(to);
                    break;
                }
            }
            if batch.len() >= batch_size {
                break;
            }
        }
        if !batch.is_empty() {
            stats.scoring.store(batch.len(), Ordering::SeqCst);
            gate.wait();
            score_batch(index, &mut model, &view, batch, batch_size, stats);
            stats.scoring.store(0, Ordering::SeqCst);
        }
        if let Some(to) = handover.take() {
            // The new model's thread takes the queue; this one ends, dropping its model.
            let _ = to.send(jobs);
            return;
        }
    }
}

/// Scores one batch of requests with `model` and answers each.
fn score_batch(
    index: &Path,
    model: &mut Model,
    view: &Arc<ModelView>,
    batch: Vec<Job>,
    batch_size: usize,
    stats: &Stats,
) {
    let started = Instant::now();
    stats.metrics.batch(batch.len());
    let mut replies = Vec::with_capacity(batch.len());
    let mut inputs = Vec::new();
    for job in batch {
        let queue_s = started.duration_since(job.queued_at).as_secs_f64();
        match inputs_for(job.image, job.prepared_for, job.inputs, view) {
            Ok(more) => {
                inputs.extend(more);
                replies.push((job.reply, queue_s));
            }
            Err(e) => {
                let _ = job.reply.send(Err(format!("{e:#}")));
            }
        }
    }
    let mut replies = replies.into_iter();
    // A client that went away no longer waits for its answer.
    let mut answer = |image| {
        if let Some((reply, queue_s)) = replies.next() {
            let scoring_s = started.elapsed().as_secs_f64();
            stats.metrics.scored(queue_s, scoring_s);
            let view = Arc::clone(view);
            let _ = reply.send(Ok(Scored {
                image,
                view,
                queue_s,
                scoring_s,
            }));
        }
    };
    let scored = model.score_prepared(index, inputs, batch_size, &mut answer);
    if let Err(e) = scored {
        let msg = format!("{e:#}");
        let line = msg.lines().next().unwrap_or(&msg).to_string();
        log::error(&format!("scoring failed: {line}"));
        for (reply, _) in replies {
            let _ = reply.send(Err(line.clone()));
        }
    }
}

/// A request's network inputs for the model of `view`: as prepared, or prepared again when
/// a reload changed the preprocessing after they were made.
fn inputs_for(
    image: Arc<RgbImage>,
    prepared_for: (images::Preprocess, Option<u32>),
    inputs: Vec<Prepared>,
    view: &ModelView,
) -> Result<Vec<Prepared>> {
    if prepared_for == (view.preprocess, view.tile) {
        return Ok(inputs);
    }
    extractor::prepare_decoded(&request_file(), image, view.preprocess, view.tile)
}

pub(super) fn request_file() -> ImageFile {
    ImageFile {
        path: PathBuf::from(REQUEST_NAME),
        relative: PathBuf::from(REQUEST_NAME),
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
