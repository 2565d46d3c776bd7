//! scripts/slurm/submit_sharded.sh on a real single-node Slurm: the shards' array job and
//! the merge queued after it give the same model as the same shards and merge run by hand.
//! Slurm is installed from Debian when missing (as root); munged, slurmctld and slurmd are
//! started on localhost in a temporary folder and stopped at the end, failure included.
//! Without root or packages the test is skipped (a failure under CI=true).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{s, skip, stderr, write_images};
use patchcore::model::bank;
use patchcore::util::synthetic::Defect;

const PROGRAMS: [&str; 6] = [
    "sbatch",
    "scontrol",
    "sinfo",
    "slurmctld",
    "slurmd",
    "munged",
];

fn found(program: &str) -> bool {
    ["/usr/bin", "/usr/sbin", "/bin", "/sbin"]
        .iter()
        .any(|d| Path::new(d).join(program).exists())
}

fn sh(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", cmd])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether Slurm and munge can be run here, installing them (as root) when missing.
fn slurm_available() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip("starting slurmctld/slurmd/munged on localhost needs root");
        return false;
    }
    if PROGRAMS.iter().all(|p| found(p)) {
        return true;
    }
    let install = "DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
                   slurm-wlm munge";
    let installed = sh(install) || (sh("apt-get update") && sh(install));
    if !installed {
        skip("Slurm is not installed and `apt-get install slurm-wlm munge` failed");
        return false;
    }
    if !PROGRAMS.iter().all(|p| found(p)) {
        skip("slurm-wlm / munge installed but their programs are missing");
        return false;
    }
    true
}

/// The daemons this test started, stopped when dropped (also when the test fails).
struct Daemons {
    pid_files: Vec<PathBuf>,
}

impl Drop for Daemons {
    fn drop(&mut self) {
        for f in self.pid_files.iter().rev() {
            if let Some(pid) = std::fs::read_to_string(f)
                .ok()
                .and_then(|t| t.trim().parse::<i32>().ok())
            {
                // SAFETY: signals a process this test started (its pid file).
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
    }
}

/// A port nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts munged (unless one answers already), slurmctld and slurmd with a configuration in
/// `dir`; returns the guard and the configuration's path once the node is idle.
fn start_slurm(dir: &Path) -> (Daemons, PathBuf) {
    let mut daemons = Daemons {
        pid_files: Vec::new(),
    };
    if !sh("munge -n | unmunge") {
        assert!(
            sh("mkdir -p /run/munge && chown munge:munge /run/munge && \
                su -s /bin/sh munge -c /usr/sbin/munged"),
            "cannot start munged"
        );
        daemons.pid_files.push("/run/munge/munged.pid".into());
        assert!(sh("munge -n | unmunge"), "munged does not answer");
    }
    let host = String::from_utf8(Command::new("hostname").output().unwrap().stdout).unwrap();
    let host = host.trim();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let d = dir.display();
    for sub in ["state", "spool"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    let conf = dir.join("slurm.conf");
    std::fs::write(
        &conf,
        format!(
            "ClusterName=local\nSlurmctldHost={host}\nSlurmctldPort={}\nSlurmdPort={}\n\
             SlurmUser=root\nSlurmdUser=root\nStateSaveLocation={d}/state\n\
             SlurmdSpoolDir={d}/spool\nSlurmctldPidFile={d}/slurmctld.pid\n\
             SlurmdPidFile={d}/slurmd.pid\nSlurmctldLogFile={d}/ctld.log\n\
             SlurmdLogFile={d}/d.log\nProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n\
             JobAcctGatherType=jobacct_gather/none\nSelectType=select/cons_tres\n\
             SelectTypeParameters=CR_Core\nReturnToService=2\n\
             NodeName={host} CPUs={cpus} State=UNKNOWN\n\
             PartitionName=main Nodes={host} Default=YES MaxTime=INFINITE State=UP\n",
            free_port(),
            free_port()
        ),
    )
    .unwrap();
    for daemon in ["slurmctld", "slurmd"] {
        daemons.pid_files.push(dir.join(format!("{daemon}.pid")));
        let ok = Command::new(daemon)
            .args(["-f", s(&conf)])
            .status()
            .is_ok_and(|st| st.success());
        assert!(ok, "{daemon} did not start (logs in {d})");
    }
    let t = Instant::now();
    loop {
        let out = Command::new("sinfo")
            .args(["-h", "-o", "%T"])
            .env("SLURM_CONF", &conf)
            .output()
            .unwrap();
        if String::from_utf8_lossy(&out.stdout).trim() == "idle" {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the node is not idle after 60 s: {}",
            std::fs::read_to_string(dir.join("d.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    (daemons, conf)
}

/// The state of job `id` (COMPLETED, FAILED, PENDING ...) and its reason.
fn job_state(conf: &Path, id: &str) -> String {
    let out = Command::new("scontrol")
        .args(["show", "job", id, "-o"])
        .env("SLURM_CONF", conf)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        text.split_whitespace()
            .find_map(|f| f.strip_prefix(name))
            .unwrap_or("?")
            .to_string()
    };
    format!("{} {}", field("JobState="), field("Reason="))
}

/// The sidecar's fields, without the timings (which differ from run to run).
fn sidecar(index: &Path) -> serde_json::Value {
    let mut v = common::json(&bank::sidecar_path(index));
    v.as_object_mut().unwrap().remove("timings");
    v
}

#[test]
fn sharded_training_on_slurm_equals_the_shards_run_by_hand() {
    if !slurm_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (_daemons, conf) = start_slurm(&tmp.path().join("slurm"));
    let input = tmp.path().join("train");
    write_images(&input, 12, 0, (64, 64), Defect::None);
    let opts: Vec<&str> = [common::RESNET18_64, &["-s", "0.25", "-q", "--threads", "1"]].concat();
    let cache = std::env::temp_dir().join("patchcore-test-cache");
    let bin = env!("CARGO_BIN_EXE_patchcore");

    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/slurm");
    let model = tmp.path().join("slurm.faiss");
    let out = Command::new(scripts.join("submit_sharded.sh"))
        .args([s(&input), s(&model), "3"])
        .args(&opts)
        .current_dir(tmp.path())
        .env("SLURM_CONF", &conf)
        .env("PATCHCORE", bin)
        .env("PATCHCORE_CACHE", &cache)
        .output()
        .unwrap();
    assert!(out.status.success(), "submit: {}", stderr(&out));
    let ids = String::from_utf8(out.stdout).unwrap();
    let merge_job = ids
        .split_whitespace()
        .nth(1)
        .expect("two job ids")
        .to_string();
    let t = Instant::now();
    let logs = || {
        let mut all = String::new();
        for e in std::fs::read_dir(tmp.path()).unwrap().flatten() {
            if e.file_name().to_string_lossy().ends_with(".log") {
                all += &std::fs::read_to_string(e.path()).unwrap_or_default();
            }
        }
        all
    };
    loop {
        let state = job_state(&conf, &merge_job);
        if state.starts_with("COMPLETED") {
            break;
        }
        assert!(
            ![
                "FAILED",
                "CANCELLED",
                "TIMEOUT",
                "NODE_FAIL",
                "OUT_OF_MEMORY"
            ]
            .iter()
            .any(|f| state.starts_with(f))
                && !state.contains("DependencyNeverSatisfied"),
            "merge job {merge_job}: {state}; logs: {}",
            logs()
        );
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "merge job {merge_job} not done after 600 s ({state}); logs: {}",
            logs()
        );
        std::thread::sleep(Duration::from_secs(1));
    }

    // The same shards and merge by hand.
    let mut parts = Vec::new();
    for i in 0..3 {
        let part = tmp.path().join(format!("hand-{i}.faiss"));
        let shard = format!("{i}/3");
        let args: Vec<&str> = [&["--shard", shard.as_str()], opts.as_slice()].concat();
        common::train_ok(&input, &part, &args);
        parts.push(part);
    }
    let by_hand = tmp.path().join("hand.faiss");
    // Default threads, as the merge job runs.
    let mut args = vec!["merge", "-q", "-o", s(&by_hand)];
    args.extend(parts.iter().map(|p| s(p)));
    let o = common::run(&args);
    assert!(o.status.success(), "merge: {}", stderr(&o));

    assert_eq!(
        std::fs::read(&model).unwrap(),
        std::fs::read(&by_hand).unwrap(),
        "index bytes"
    );
    assert_eq!(sidecar(&model), sidecar(&by_hand));
}
