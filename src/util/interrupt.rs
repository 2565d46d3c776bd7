//! Ctrl-C: the first one asks the running command to stop at the next safe point (between
//! batches, between coreset steps), so it can remove its temporary files and leave every
//! output either complete or untouched; a second one ends the process at once.

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Result};

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Installs the handler (once, from main).
pub fn install() {
    let _ = ctrlc::set_handler(|| {
        if REQUESTED.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        let msg = "interrupt: stopping after the current step (Ctrl-C again to quit now)";
        if crate::util::log::json() {
            crate::util::log::warn(msg);
        } else {
            eprintln!("\n{msg}");
        }
    });
}

pub fn requested() -> bool {
    REQUESTED.load(Ordering::Relaxed)
}

/// Errors out if a stop was requested.
pub fn check() -> Result<()> {
    if requested() {
        bail!("interrupted: stopped cleanly, no output was left half-written");
    }
    Ok(())
}
