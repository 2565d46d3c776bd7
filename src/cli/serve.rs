//! `patchcore serve`'s options, converted into [`ServeOptions`].

use std::time::Duration;

use anyhow::Result;
use clap::Args;

use super::{Outcome, Runtime, ScoringArgs};
use crate::serve::{self, ServeOptions};

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ScoringArgs,
    /// Address to listen on, HOST:PORT (a host name such as localhost is resolved); loopback
    /// unless told otherwise (port 0: any free port, printed).
    #[arg(long, default_value = "127.0.0.1:8080", value_parser = parse_listen)]
    pub listen: String,
    /// Requests that may wait (being received, decoded or queued) besides the batch being
    /// scored; beyond, 503 with Retry-After. Memory for images is bounded by (queue +
    /// batch size) x (max body + 11 bytes x max pixels).
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// Largest request body (bytes, or with KiB / MiB / GiB); larger gets 413.
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    pub max_body: usize,
    /// Seconds a request body may pause (a stalled upload); then 408.
    #[arg(long, default_value_t = 10.0, value_parser = parse_seconds)]
    pub read_timeout: f64,
    /// Seconds a whole request body may take to arrive; then 408.
    #[arg(long, default_value_t = 60.0, value_parser = parse_seconds)]
    pub request_timeout: f64,
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
            listen: self.listen.clone(),
            weights: self.model.weights_spec()?,
            threshold: self.model.threshold,
            pixel_threshold: self.model.pixel_threshold,
            contour: self.model.contour,
            nprobe: self.model.nprobe,
            queue: self.queue,
            max_body: self.max_body,
            max_pixels: self.model.max_pixels,
            read_timeout: Duration::from_secs_f64(self.read_timeout),
            request_timeout: Duration::from_secs_f64(self.request_timeout),
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

/// `HOST:PORT`: an IP address or a host name, and a port.
fn parse_listen(text: &str) -> Result<String, String> {
    let bad = || format!("{text}: expected HOST:PORT, such as 127.0.0.1:8080 or localhost:8080");
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(bad());
    }
    Ok(text.to_string())
}

/// A positive number of seconds.
fn parse_seconds(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(s) if s > 0.0 && s.is_finite() && s < 1e9 => Ok(s),
        _ => Err(format!("{text}: expected a positive number of seconds")),
    }
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

    #[test]
    fn listen_takes_host_names_and_addresses() {
        assert!(parse_listen("localhost:8080").is_ok());
        assert!(parse_listen("127.0.0.1:0").is_ok());
        assert!(parse_listen("[::1]:8080").is_ok());
        assert!(parse_listen("localhost").is_err());
        assert!(parse_listen(":8080").is_err());
        assert!(parse_listen("localhost:99999").is_err());
    }
}
