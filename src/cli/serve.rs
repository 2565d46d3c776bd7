//! `patchcore serve`'s options, converted into [`ServeOptions`].

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use clap::Args;

use super::{Outcome, Runtime, ScoringArgs};
use crate::serve::{self, ServeOptions};

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ScoringArgs,
    /// Address to listen on; loopback unless told otherwise (port 0: any free port, printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Requests that may wait for the scoring thread; beyond, 503 with Retry-After.
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// Largest request body (bytes, or with KiB / MiB / GiB); larger gets 413.
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    pub max_body: usize,
    /// Seconds SIGTERM waits for the requests in flight before the server exits anyway.
    #[arg(long, default_value_t = 60)]
    pub shutdown_timeout: u64,
    #[command(flatten)]
    pub runtime: Runtime,
}

impl ServeArgs {
    /// The options of this server, the backbone on `device`.
    pub fn options(&self, device: tch::Device) -> Result<ServeOptions> {
        Ok(ServeOptions {
            index: self.model.index.clone(),
            listen: self.listen,
            weights: self.model.weights_spec()?,
            threshold: self.model.threshold,
            pixel_threshold: self.model.pixel_threshold,
            contour: self.model.contour,
            nprobe: self.model.nprobe,
            queue: self.queue,
            max_body: self.max_body,
            shutdown_timeout: Duration::from_secs(self.shutdown_timeout),
            batch_size: self.runtime.batch_size,
            device,
            quiet: self.runtime.quiet,
        })
    }
}

/// Serves until SIGTERM or Ctrl-C.
pub fn run(a: &ServeArgs) -> Result<Outcome> {
    serve::run(&a.options(a.runtime.setup()?)?)?;
    Ok(Outcome::Done)
}

/// `64MiB`, `512KiB`, `1GiB` or a plain number of bytes.
fn parse_size(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let (digits, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, ""),
    };
    let scale: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        _ => {
            return Err(format!(
                "{text}: expected bytes, or a number with KiB, MiB or GiB"
            ))
        }
    };
    digits
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("{text}: expected a positive size such as 64MiB"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("512 KiB"), Ok(512 << 10));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("0").is_err());
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("MiB").is_err());
    }
}
