//! Load test of `patchcore serve` (run by scripts/serve_load.sh): CLIENTS threads each POST
//! REQUESTS images (cycling through the images of FOLDER) one after another, and the run
//! reports throughput and latency percentiles. Bounded: at most CLIENTS x REQUESTS requests,
//! and none is started after SECONDS. Any answer other than 200 is an error; the exit status
//! is 1 if there was one.
//!
//! cargo run --release --example serve_load -- URL FOLDER [CLIENTS=4] [REQUESTS=50] [SECONDS=600]

use std::path::PathBuf;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        eprintln!("usage: serve_load URL FOLDER [CLIENTS] [REQUESTS] [SECONDS]");
        std::process::exit(1);
    }
    let url = format!("{}/predict", args[0].trim_end_matches('/'));
    let number = |i: usize, default: u64| args.get(i).map_or(default, |v| v.parse().unwrap());
    let (clients, requests) = (number(2, 4) as usize, number(3, 50) as usize);
    let deadline = Instant::now() + Duration::from_secs(number(4, 600));
    let mut files: Vec<PathBuf> = walkdir::WalkDir::new(&args[1])
        .into_iter()
        .filter_map(Result::ok)
        .map(|e| e.into_path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no png images in {}", args[1]);
    let bodies: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(120))
        .build();

    let t0 = Instant::now();
    let results: Vec<(Vec<f64>, Vec<String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                let (agent, bodies, url) = (agent.clone(), &bodies, &url);
                s.spawn(move || {
                    let (mut latencies, mut errors) = (Vec::new(), Vec::new());
                    for i in 0..requests {
                        if Instant::now() > deadline {
                            errors.push("deadline reached before every request was sent".into());
                            break;
                        }
                        let body = &bodies[(c * requests + i) % bodies.len()];
                        let t = Instant::now();
                        match agent.post(url).send_bytes(body) {
                            Ok(r) if r.status() == 200 => {
                                let _ = r.into_string();
                                latencies.push(t.elapsed().as_secs_f64());
                            }
                            Ok(r) => errors.push(format!("status {}", r.status())),
                            Err(e) => errors.push(e.to_string()),
                        }
                    }
                    (latencies, errors)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let wall = t0.elapsed().as_secs_f64();
    let mut latencies: Vec<f64> = results.iter().flat_map(|r| r.0.clone()).collect();
    let errors: Vec<&String> = results.iter().flat_map(|r| &r.1).collect();
    latencies.sort_by(f64::total_cmp);
    // Nearest-rank percentiles.
    let pct = |p: f64| {
        latencies
            .get(((p * latencies.len() as f64).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or(f64::NAN)
    };
    println!(
        "{{\"clients\": {clients}, \"requests\": {}, \"ok\": {}, \"errors\": {}, \"wall_s\": {wall:.3}, \
         \"throughput_per_s\": {:.3}, \"p50_s\": {:.4}, \"p99_s\": {:.4}, \"max_s\": {:.4}}}",
        clients * requests,
        latencies.len(),
        errors.len(),
        latencies.len() as f64 / wall,
        pct(0.5),
        pct(0.99),
        latencies.last().copied().unwrap_or(f64::NAN)
    );
    for e in errors.iter().take(5) {
        eprintln!("error: {e}");
    }
    if !errors.is_empty() {
        std::process::exit(1);
    }
}
