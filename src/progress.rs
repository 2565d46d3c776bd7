//! Progress bars on stderr (stdout stays clean for scripts). Hidden with `--quiet`,
//! `--json-logs`, and when stderr is not a terminal.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar counting items (images, selection steps).
pub fn items(len: u64, message: &str, quiet: bool) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(len), target(quiet));
    bar.set_style(
        ProgressStyle::with_template("{msg:24} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(message.to_string());
    bar
}

/// A bar counting bytes (downloads); without a known length it just counts.
pub fn bytes(len: Option<u64>, message: &str, quiet: bool) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(len, target(quiet));
    let template = if len.is_some() {
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
    } else {
        "{msg} {bytes} {bytes_per_sec}"
    };
    bar.set_style(
        ProgressStyle::with_template(template)
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(message.to_string());
    bar
}

fn target(quiet: bool) -> ProgressDrawTarget {
    if quiet || crate::log::json() {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr()
    }
}
