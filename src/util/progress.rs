//! Progress bars on stderr (stdout stays clean for scripts). Hidden with `--quiet`,
//! `--json-logs`, and when stderr is not a terminal.

use std::time::Duration;

use indicatif::{HumanDuration, ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};

/// A bar counting items (images, selection steps).
pub fn items(len: u64, message: &str, quiet: bool) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(len), target(quiet));
    bar.set_style(
        ProgressStyle::with_template("{msg:24} [{bar:30}] {pos}/{len} {rate_eta}")
            .expect("valid template")
            .with_key(
                "rate_eta",
                |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = w.write_str(&rate_eta(s.pos(), s.elapsed(), s.per_sec(), s.eta()));
                },
            )
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
    if quiet || crate::util::log::json() {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr()
    }
}

/// The rate and time left of an item bar: nothing before the first item is done (no
/// "0/s eta 0s"), then the rate with 3 significant digits at most (`2035/s`, `41.2/s`,
/// `1.5 s each` below one a second) and the time left.
fn rate_eta(pos: u64, elapsed: Duration, per_sec: f64, eta: Duration) -> String {
    if pos == 0 || elapsed.is_zero() || !per_sec.is_finite() || per_sec <= 0.0 {
        return String::new();
    }
    let rate = if per_sec >= 100.0 {
        format!("{per_sec:.0}/s")
    } else if per_sec >= 10.0 {
        format!("{per_sec:.1}/s")
    } else if per_sec >= 1.0 {
        format!("{per_sec:.2}/s")
    } else {
        format!("{:.1} s each", 1.0 / per_sec)
    };
    format!("{rate}, {} left", HumanDuration(eta))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_start_empty_and_keep_three_digits() {
        let s = Duration::from_secs;
        assert_eq!(rate_eta(0, s(0), 0.0, s(0)), "");
        assert_eq!(rate_eta(0, s(3), 0.0, s(0)), "");
        assert_eq!(
            rate_eta(10, s(1), 2034.7101, s(3)),
            "2035/s, 3 seconds left"
        );
        assert_eq!(rate_eta(10, s(1), 41.234, s(90)), "41.2/s, 2 minutes left");
        assert_eq!(rate_eta(3, s(1), 3.25678, s(5)), "3.26/s, 5 seconds left");
        assert_eq!(rate_eta(1, s(2), 0.5, s(8)), "2.0 s each, 8 seconds left");
    }
}
