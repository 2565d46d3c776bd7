//! `--max-memory` is a hard limit (issue 32): train and merge run inside a memory cgroup of
//! the limit plus a small margin (v1 `memory.limit_in_bytes` with swap included where
//! `/sys/fs/cgroup/memory` is writable, v2 `memory.max` where that is mounted and writable;
//! else the child's peak RSS is checked against the limit), and a run that cannot fit is
//! refused in one line before it extracts anything.
//!
//! About 300,000 patches: 330 synthetic 256x256 images (resnet18, random weights, layer2+3:
//! 32 x 32 patches an image; 33 held out to calibrate), 2% kept to keep the coreset short.

mod common;

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use patchcore::util::synthetic::Defect;

const MIB: u64 = 1 << 20;
/// The cgroup's room above `--max-memory`: the page cache of the spilled features and the
/// index being written is charged to the cgroup too (and reclaimed under its limit).
const MARGIN: u64 = 64 * MIB;

/// The training images, written once for every test of this file.
fn images() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        common::write_images(&dir.path().join("train"), 330, 0, (256, 256), Defect::None);
        dir
    })
    .path()
    .join("train")
    .leak()
}

/// The binary under test: this build's, or `PATCHCORE_TEST_BIN` (to show the test fails on
/// an older build: experiments/training-memory/README.md).
fn bin() -> Command {
    let mut c = common::bin();
    if let Some(other) = std::env::var_os("PATCHCORE_TEST_BIN") {
        let mut o = Command::new(other);
        o.envs(c.get_envs().filter_map(|(k, v)| Some((k, v?))));
        c = o;
    }
    c
}

/// Options of every training here: resnet18 at 256 px, 2% of the patches.
const OPTIONS: &[&str] = &[
    "--backbone",
    "resnet18",
    "--weights",
    "random:0",
    "--resize",
    "256",
    "-s",
    "0.02",
    "-q",
];

/// How a limited run went.
struct Limited {
    ok: bool,
    stderr: String,
    /// The child's peak resident set (getrusage of the child).
    peak_rss: u64,
    /// Where it ran: "cgroup v1 ...", "cgroup v2 ...", or "no cgroup".
    how: String,
    /// Killed by the kernel's OOM killer (SIGKILL, or the cgroup's oom_kill count).
    oom_killed: bool,
    wall: Duration,
}

/// A memory cgroup of `limit` bytes for one child, v1 or v2, where this process may make one.
struct Cgroup {
    dir: PathBuf,
    v2: bool,
}

impl Cgroup {
    fn new(limit: u64) -> Option<Cgroup> {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let name = format!(
            "patchcore-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let v1 = Path::new("/sys/fs/cgroup/memory");
        if v1.join("memory.limit_in_bytes").exists() {
            let dir = v1.join(&name);
            if std::fs::create_dir(&dir).is_ok() {
                let cg = Cgroup { dir, v2: false };
                let set = std::fs::write(cg.dir.join("memory.limit_in_bytes"), limit.to_string());
                // With swap in the limit where the kernel accounts it, so swap cannot hide
                // the overrun.
                let _ = std::fs::write(
                    cg.dir.join("memory.memsw.limit_in_bytes"),
                    limit.to_string(),
                );
                if set.is_ok() {
                    return Some(cg);
                }
            }
        }
        let v2 = Path::new("/sys/fs/cgroup");
        if v2.join("cgroup.controllers").exists() {
            let dir = v2.join(&name);
            if std::fs::create_dir(&dir).is_ok() {
                let cg = Cgroup { dir, v2: true };
                let set = std::fs::write(cg.dir.join("memory.max"), limit.to_string());
                let _ = std::fs::write(cg.dir.join("memory.swap.max"), "0");
                if set.is_ok() {
                    return Some(cg);
                }
            }
        }
        None
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.join(file)).unwrap_or_default()
    }

    /// The OOM kills counted in the cgroup.
    fn oom_kills(&self) -> u64 {
        let file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        self.read(file)
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Peak usage (page cache included), where the kernel tells.
    fn peak(&self) -> String {
        let file = if self.v2 {
            "memory.peak"
        } else {
            "memory.max_usage_in_bytes"
        };
        match self.read(file).trim().parse::<u64>() {
            Ok(b) => format!("{} MiB", b / MIB),
            Err(_) => "unknown".into(),
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Runs `patchcore ARGS` inside a memory cgroup of `limit` bytes where one can be made.
fn run_limited(args: &[&str], limit: u64) -> Limited {
    let cgroup = Cgroup::new(limit);
    let mut c = bin();
    c.args(args).stdout(Stdio::null()).stderr(Stdio::piped());
    if let Some(cg) = &cgroup {
        let procs = cg.dir.join("cgroup.procs");
        // SAFETY: only async-signal-safe work between fork and exec: open, write, close.
        unsafe {
            c.pre_exec(move || {
                let pid = libc::getpid().to_string();
                std::fs::write(&procs, pid)
            });
        }
    }
    run_measured(c, cgroup, limit)
}

// The child is reaped by `wait4` (for its rusage), not `Child::wait`.
#[allow(clippy::zombie_processes)]
fn run_measured(mut c: Command, cgroup: Option<Cgroup>, limit: u64) -> Limited {
    let t = Instant::now();
    let mut child = c.spawn().expect("binary runs");
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let (mut status, mut usage) = (0, unsafe { std::mem::zeroed::<libc::rusage>() });
    // SAFETY: waits for our own child, whose pid std has not reaped.
    let waited = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(waited, child.id() as i32, "wait4");
    let killed = libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL;
    let how = match &cgroup {
        Some(cg) => format!(
            "cgroup {} limit {} MiB, peak usage {}",
            if cg.v2 { "v2" } else { "v1" },
            limit / MIB,
            cg.peak()
        ),
        None => "no cgroup".into(),
    };
    let oom_killed = killed || cgroup.as_ref().is_some_and(|cg| cg.oom_kills() > 0);
    Limited {
        ok: libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        stderr,
        peak_rss: usage.ru_maxrss as u64 * 1024,
        how,
        oom_killed,
        wall: t.elapsed(),
    }
}

/// Asserts the run finished within `budget`: not OOM-killed in its cgroup, and its peak RSS
/// (getrusage) at most the budget. Where no cgroup can be made, only the RSS is checked, and
/// in CI that is said loudly.
fn assert_within(run: &Limited, budget: u64, what: &str) {
    eprintln!(
        "{what}: {} MiB peak RSS under --max-memory {} MiB ({}), {:.1} s",
        run.peak_rss / MIB,
        budget / MIB,
        run.how,
        run.wall.as_secs_f64()
    );
    if run.how == "no cgroup" {
        eprintln!("{what}: no memory cgroup could be made: checked by peak RSS only");
    }
    assert!(
        !run.oom_killed,
        "{what} was OOM-killed ({}): {}",
        run.how, run.stderr
    );
    assert!(run.ok, "{what} failed ({}): {}", run.how, run.stderr);
    assert!(
        run.peak_rss <= budget,
        "{what}: peak RSS {} MiB over --max-memory {} MiB",
        run.peak_rss / MIB,
        budget / MIB
    );
}

#[test]
fn train_holds_300k_patches_within_600m() {
    let out = tempfile::tempdir().unwrap();
    let index = out.path().join("model.faiss");
    let budget = 600 * MIB;
    let mut args = vec![
        "train",
        "-i",
        common::s(images()),
        "-o",
        common::s(&index),
        "--max-memory",
        "600M",
    ];
    args.extend_from_slice(OPTIONS);
    let run = run_limited(&args, budget + MARGIN);
    assert_within(&run, budget, "train of 297 images (304,128 patches)");
    let info = common::json(&out.path().join("model.faiss.json"));
    assert_eq!(info["training"]["patches"], 304_128);
    assert!(info["calibration"].is_object(), "calibrated: {info}");
}

#[test]
fn refuses_up_front_in_one_line_what_cannot_fit() {
    let out = tempfile::tempdir().unwrap();
    let index = out.path().join("model.faiss");
    let mut args = vec![
        "train",
        "-i",
        common::s(images()),
        "-o",
        common::s(&index),
        "--max-memory",
        "400M",
        "--batch-size",
        "1",
    ];
    args.extend_from_slice(OPTIONS);
    // The test hook appends a line for every batch of features kept: none may be.
    let batches = out.path().with_extension("batches");
    let t = Instant::now();
    let o = bin()
        .env(patchcore::commands::train::PAUSE_FOR_TESTS, &batches)
        .args(&args)
        .output()
        .unwrap();
    let took = t.elapsed();
    // The projections of 304,128 patches (149 MiB) twice during the coreset, beside the
    // runtime (about 155 MiB): more than 400M. (One image's activations, 26 MiB, are not
    // what fails.)
    let line = common::assert_fails_naming(
        &o,
        &[
            "--max-memory 400M cannot hold the 128-d projections of 304,128 patches",
            "during the coreset selection",
            "at least --max-memory",
            "or train on at most",
        ],
    );
    assert!(!line.contains('\n'), "one line: {line}");
    // Before any extraction: the backbone loads and runs on one blank image, nothing more.
    // Not one batch was kept; and it took seconds (about 3 s on 2 quiet cores; the bound
    // leaves room for cores shared with a whole test suite, where it took 32 s).
    assert!(
        !batches.exists(),
        "a batch was extracted before the refusal"
    );
    assert!(took < Duration::from_secs(90), "refused after {took:?}");
    let left: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "nothing written: {left:?}");
}

#[test]
fn merge_of_4_shards_holds_below_the_sum_of_their_parts() {
    let out = tempfile::tempdir().unwrap();
    let mut parts = Vec::new();
    for i in 0..4 {
        let part = out.path().join(format!("part{i}.faiss"));
        let shard = format!("{i}/4");
        let mut args = vec!["--shard", shard.as_str()];
        args.extend_from_slice(OPTIONS);
        let o = bin()
            .args(["train", "-i", common::s(images()), "-o", common::s(&part)])
            .args(&args)
            .output()
            .unwrap();
        assert!(o.status.success(), "shard {shard}: {}", common::stderr(&o));
        parts.push(part);
    }
    let sum: u64 = std::fs::read_dir(out.path())
        .unwrap()
        .flatten()
        .map(|e| e.metadata().unwrap().len())
        .sum();
    let budget = 600 * MIB;
    assert!(
        sum > budget + MARGIN,
        "the parts ({} MiB) are larger than the limit",
        sum / MIB
    );
    let index = out.path().join("merged.faiss");
    let mut args = vec![
        "merge",
        "-q",
        "--max-memory",
        "600M",
        "-o",
        common::s(&index),
    ];
    args.extend(parts.iter().map(|p| common::s(p)));
    let run = run_limited(&args, budget + MARGIN);
    assert_within(
        &run,
        budget,
        &format!("merge of 4 shards ({} MiB on disk)", sum / MIB),
    );
    let info = common::json(&out.path().join("merged.faiss.json"));
    assert_eq!(info["training"]["patches"], 304_128);
    assert_eq!(info["bank_size"], 6_082);

    // calibrate on 20 new good images: within 600M in the cgroup, refused before scoring
    // under 100M (below the runtime alone).
    let good = out.path().join("good");
    common::write_images(&good, 20, 900, (256, 256), Defect::None);
    let calibrate = |budget: &str| {
        vec![
            "calibrate".to_string(),
            "-q".into(),
            "--dry-run".into(),
            "--max-memory".into(),
            budget.into(),
            "-i".into(),
            common::s(&good).into(),
            "--index".into(),
            common::s(&index).into(),
        ]
    };
    let args = calibrate("600M");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = run_limited(&args, budget + MARGIN);
    assert_within(&run, budget, "calibrate of the merged model");
    let args = calibrate("100M");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = bin().args(&args).output().unwrap();
    let line = common::assert_fails_naming(&o, &["--max-memory 100M cannot hold", "at least"]);
    assert!(!line.contains('\n'), "one line: {line}");
}
