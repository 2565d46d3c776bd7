//! The scoring threads: two long-lived threads that take turns. The one scoring takes the
//! queued requests in batches, scores each batch with its model and answers each request; a
//! reload loads the model on the other, idle one, and the scoring one hands the queue over
//! to it at the reload's mark, drops its model and idles until the next reload.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use image::RgbImage;
use tokio::sync::{mpsc, oneshot};

use super::model::ModelView;
use super::{load_model, Job, ModelOptions, Scored, Stats, Work, REQUEST_NAME};
use crate::features::extractor::{self, Prepared};
use crate::features::images::{self, ImageFile};
use crate::model::Model;
use crate::util::log;

use anyhow::Result;

/// What a scoring thread is asked to do: load the model, say on `loaded` how that went, then
/// score the queue it is handed on `queue` (none: the server stopped first).
struct Load {
    loaded: oneshot::Sender<Result<Arc<ModelView>>>,
    queue: std::sync::mpsc::Receiver<mpsc::Receiver<Work>>,
}

/// The two scoring threads, started with the server and ended with it. They take turns: a
/// reload loads on the idle one, so a reload starts no thread. A new thread per reload (as
/// before) loaded each model into another malloc arena, and each arena kept the heap of the
/// loads it had seen, freed but not returned: over 11 reloads of a small model
/// (experiments/serve-load) glibc's heap grew from 148 to 192 MB while its bytes in use
/// stayed at 71-73 MB, and the peak RSS grew by 38%. Each of these threads loads into its
/// own arena, which reuses its last model's memory.
pub(super) struct Scorers {
    loads: [std::sync::mpsc::Sender<Load>; 2],
    threads: [std::thread::JoinHandle<()>; 2],
    /// The thread the queue was last handed to; the other idles (or still scores the
    /// requests queued before that handover, then takes its next load).
    current: usize,
}

impl Scorers {
    /// Starts both threads, idle.
    pub fn start(model: &ModelOptions, stats: &Arc<Stats>, batch_size: usize) -> Result<Scorers> {
        let spawn = || -> std::io::Result<_> {
            let (load, loads) = std::sync::mpsc::channel::<Load>();
            let (model, stats) = (model.clone(), Arc::clone(stats));
            let thread = std::thread::Builder::new()
                .name("scoring".into())
                .spawn(move || take_turns(&model, &stats, batch_size, loads))?;
            Ok((load, thread))
        };
        let ((a, one), (b, other)) = (spawn()?, spawn()?);
        Ok(Scorers {
            loads: [a, b],
            threads: [one, other],
            current: 1,
        })
    }

    /// Asks the idle thread to load the model and, once loaded, to score the queue sent on
    /// `queue`: the thread's number and how its load went (an error, or the sender dropped
    /// where the thread ended).
    pub fn load_on_idle(
        &self,
        queue: std::sync::mpsc::Receiver<mpsc::Receiver<Work>>,
    ) -> (usize, oneshot::Receiver<Result<Arc<ModelView>>>) {
        let idle = 1 - self.current;
        let (loaded, said) = oneshot::channel();
        let _ = self.loads[idle].send(Load { loaded, queue });
        (idle, said)
    }

    /// Thread `n` has the queue now.
    pub fn handed_to(&mut self, n: usize) {
        self.current = n;
    }

    /// Once the queue's senders are gone: waits for both threads to finish and end.
    pub fn join(self) -> Result<()> {
        drop(self.loads);
        for thread in self.threads {
            thread
                .join()
                .map_err(|_| anyhow::anyhow!("a scoring thread failed"))?;
        }
        Ok(())
    }
}

/// A scoring thread: for each load it is asked, loads the model, says how that went and
/// scores the queue it is handed until it hands it over; then drops the model (freed into
/// this thread's arena, which its next load reuses) and waits for the next load. Ends once
/// the server has stopped (a load in progress then finishes first).
fn take_turns(
    model: &ModelOptions,
    stats: &Stats,
    batch_size: usize,
    loads: std::sync::mpsc::Receiver<Load>,
) {
    for Load { loaded, queue } in loads {
        match load_model(model) {
            Ok((scorer, view)) => {
                let view = Arc::new(view);
                let _ = loaded.send(Ok(Arc::clone(&view)));
                if let Ok(jobs) = queue.recv() {
                    score_jobs(&model.index, scorer, view, jobs, batch_size, stats);
                }
            }
            Err(e) => {
                let _ = loaded.send(Err(e));
            }
        }
        // The old model (or a failed load) is freed: the heap's free memory goes back to the
        // system. In the soak (experiments/serve-load), with the two threads but no trim the
        // peak RSS still grew by 13% over 11 reloads (each arena keeps its largest load's
        // heap, 48-63 MB for 4-14 MB in use); with it, by 3%.
        crate::training::memory::trim();
    }
}

/// Scores the queue: waits for a request, takes every other queued one up to `batch_size`,
/// scores them together and answers each; returns when the server has stopped, or once it
/// handed the queue over to a reloaded model's thread at its mark (dropping `model`).
fn score_jobs(
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
            // The new model's thread takes the queue; this one drops its model and idles.
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
