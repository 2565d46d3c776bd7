//! `patchcore serve` over loopback: the same numbers and files as predict for the same
//! images, the error statuses (400 bad image, 413 too large, 503 queue full), /health and
//! /model, and SIGTERM with requests in flight; form uploads, limits and timeouts, SIGHUP
//! reloads, /metrics (promtool, a real Prometheus), the request log and /openapi.json
//! (schemathesis).

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use common::*;
use ndarray_npy::ReadNpyExt;
use patchcore::util::synthetic::Defect;
use serde_json::Value;

/// A running `patchcore serve`; killed if the test ends without stopping it.
struct Server {
    child: Child,
    url: String,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Server {
    fn start(index: &Path, extra: &[&str]) -> Server {
        Server::start_gated(index, extra, None)
    }

    /// A server whose scoring thread waits at the gate file `gate` (the test-only hook
    /// `serve::SCORING_GATE`; see `Gate`).
    fn start_gated(index: &Path, extra: &[&str], gate: Option<&Gate>) -> Server {
        Server::start_at(index, "127.0.0.1:0", extra, gate)
    }

    /// A server listening on `listen` (`HOST:PORT`).
    fn start_at(index: &Path, listen: &str, extra: &[&str], gate: Option<&Gate>) -> Server {
        let mut cmd = bin();
        if let Some(g) = gate {
            cmd.env(patchcore::serve::SCORING_GATE, &g.0);
        }
        let mut child = cmd
            .args(["serve", "--index", index.to_str().unwrap()])
            .args(["--listen", listen])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("serve starts");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let err = child.stderr.take().unwrap();
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("on http://").nth(1) {
                    let _ = tx.send(rest.split_whitespace().next().unwrap().to_string());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let address = rx
            .recv_timeout(Duration::from_secs(300))
            .unwrap_or_else(|_| panic!("serve did not start: {:?}", lines.lock().unwrap()));
        Server {
            child,
            url: format!("http://{address}"),
            stderr: lines,
        }
    }

    fn address(&self) -> &str {
        self.url.trim_start_matches("http://")
    }

    /// `POST /predict{query}` with `body`: the status, the Retry-After header and the JSON.
    fn post(&self, query: &str, body: &[u8]) -> (u16, Option<String>, Value) {
        answer(ureq::post(&format!("{}/predict{query}", self.url)).send_bytes(body))
    }

    fn get(&self, path: &str) -> Value {
        let (status, _, v) = answer(ureq::get(&format!("{}{path}", self.url)).call());
        assert_eq!(status, 200, "{v}");
        v
    }

    fn health(&self) -> Value {
        self.get("/health")
    }

    /// Polls /health until `ready` holds (at most a minute).
    fn wait_for(&self, what: &str, ready: impl Fn(&Value) -> bool) {
        let t = Instant::now();
        loop {
            let h = self.health();
            if ready(&h) {
                return;
            }
            assert!(t.elapsed() < Duration::from_secs(60), "never {what}: {h}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends SIGTERM; returns the exit status.
    fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id() as i32;
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let t = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "serve did not stop: {:?}",
                self.stderr.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The gate file of `serve::SCORING_GATE`: the scoring thread scores a batch only once the
/// file is gone or holds a number above the batches it has already scored.
struct Gate(PathBuf);

impl Gate {
    /// A closed gate at `path`.
    fn new(path: PathBuf) -> Gate {
        std::fs::write(&path, "0").unwrap();
        Gate(path)
    }

    /// Lets `n` batches in all through (the first `n` the server forms).
    fn allow(&self, n: usize) {
        let tmp = self.0.with_extension("tmp");
        std::fs::write(&tmp, n.to_string()).unwrap();
        std::fs::rename(tmp, &self.0).unwrap();
    }

    /// Opens the gate for good.
    fn open(&self) {
        std::fs::remove_file(&self.0).unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn answer(r: Result<ureq::Response, ureq::Error>) -> (u16, Option<String>, Value) {
    let resp = match r {
        Ok(resp) => resp,
        Err(ureq::Error::Status(_, resp)) => resp,
        Err(e) => panic!("request failed: {e}"),
    };
    let status = resp.status();
    let retry = resp.header("Retry-After").map(str::to_string);
    let text = resp.into_string().unwrap();
    let json = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    (status, retry, json)
}

/// The fields of a served answer that NAME.json holds, equal to predict's (`rel`: the image).
fn assert_answers_as_predict_wrote(got: &Value, json: &Value, rel: &Path) {
    for field in [
        "width",
        "height",
        "score",
        "normalized_score",
        "verdict",
        "regions",
    ] {
        assert_eq!(got[field], json[field], "{field} of {}", rel.display());
    }
}

fn b64(v: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(v.as_str().expect("a base64 string"))
        .unwrap()
}

/// A small model (random weights, 96-pixel images, calibrated) and test images: good ones
/// and defects.
fn model_and_images(root: &Path) -> (PathBuf, PathBuf) {
    let index = train_small(root, 12);
    let test = root.join("test");
    write_images(&test.join("good"), 2, 100, (96, 96), Defect::None);
    write_images(&test.join("scratch"), 2, 200, (96, 96), Defect::Scratch);
    write_images(&test.join("spot"), 1, 300, (120, 96), Defect::Spot);
    (index, test)
}

fn images_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = walkdir::WalkDir::new(dir)
        .into_iter()
        .map(|e| e.unwrap().into_path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    files.sort();
    files
}

#[test]
fn answers_what_predict_writes() {
    let root = tempfile::tempdir().unwrap();
    let (index, test) = model_and_images(root.path());
    let out = root.path().join("predicted");
    let o = predict_with(&test, &out, &index, &["-q", "-b", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));

    let server = Server::start(&index, &["-b", "1", "--max-body", "64KiB"]);
    let images = images_in(&test);
    let mut anomalous = 0;
    for path in &images {
        let rel = path.strip_prefix(&test).unwrap();
        let written = |ext: &str| out.join(rel.with_extension(ext));
        let json: Value =
            serde_json::from_str(&std::fs::read_to_string(written("json")).unwrap()).unwrap();
        let (status, _, got) =
            server.post("?heatmap=npy&overlay=jpg", &std::fs::read(path).unwrap());
        assert_eq!(status, 200, "{got}");
        // Scored alone, as predict -b 1 scores it: the same numbers, exactly.
        assert_answers_as_predict_wrote(&got, &json, rel);
        assert!(json["verdict"].is_string(), "the model is calibrated");
        anomalous += (json["verdict"] == "anomalous") as usize;
        assert_eq!(
            b64(&got["heatmap_npy"]),
            std::fs::read(written("npy")).unwrap()
        );
        assert_eq!(
            b64(&got["overlay_jpg"]),
            std::fs::read(written("jpg")).unwrap()
        );
    }
    assert!(anomalous > 0, "the defects are found");

    // The PNG heatmap: 16-bit levels from 0 to the heatmap's maximum.
    let (status, _, got) = server.post("?heatmap=png", &std::fs::read(&images[0]).unwrap());
    assert_eq!(status, 200);
    let png = image::load_from_memory(&b64(&got["heatmap_png"]))
        .unwrap()
        .into_luma16();
    assert_eq!(png.dimensions(), (96, 96));
    assert_eq!(png.iter().copied().max(), Some(65535));
    assert!(got["heatmap_png_max"].as_f64().unwrap() > 0.0);
    assert!(got.get("overlay_jpg").is_none(), "only what was asked for");

    // A bad image: 400 and predict's error line, naming the request instead of the file.
    let bad = root.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    let junk = b"\x89PNG\r\n\x1a\n truncated";
    std::fs::write(bad.join("000.png"), junk).unwrap();
    let line = error_line(&predict(&bad, &root.path().join("bad-out"), &index));
    let (status, _, got) = server.post("", junk);
    assert_eq!(status, 400, "{got}");
    let message = got["error"].as_str().unwrap();
    let file = bad.join("000.png").display().to_string();
    assert_eq!(
        line.trim_start_matches("error: "),
        message.replace("request body", &file),
        "{message}"
    );
    let (status, _, got) = server.post("?heatmap=tiff", &std::fs::read(&images[0]).unwrap());
    assert_eq!((status, got["error"].is_string()), (400, true), "{got}");

    // Larger than --max-body: 413 from the declared length, before any of it is read.
    let mut tcp = std::net::TcpStream::connect(server.address()).unwrap();
    write!(
        tcp,
        "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        100 << 10
    )
    .unwrap();
    let mut reply = String::new();
    let _ = tcp.read_to_string(&mut reply);
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert!(reply.contains("--max-body"), "{reply}");
    // A chunked body, with no declared length, 413 once it outgrows --max-body.
    let mut tcp = std::net::TcpStream::connect(server.address()).unwrap();
    write!(
        tcp,
        "POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let chunk = vec![b'x'; 16 << 10];
    for _ in 0..5 {
        // The server may answer and close before the last chunks: a failed write is fine.
        let _ = write!(tcp, "{:x}\r\n", chunk.len())
            .and_then(|()| tcp.write_all(&chunk))
            .and_then(|()| tcp.write_all(b"\r\n"));
    }
    let _ = tcp.write_all(b"0\r\n\r\n");
    let mut reply = String::new();
    let _ = tcp.read_to_string(&mut reply);
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert!(reply.contains("--max-body"), "{reply}");

    // /health and /model.
    let h = server.health();
    assert_eq!(h["status"], "ok");
    assert_eq!(h["queued"], 0);
    let sidecar: Value =
        serde_json::from_str(&std::fs::read_to_string(index.with_extension("faiss.json")).unwrap())
            .unwrap();
    let m = server.get("/model");
    for field in ["backbone", "bank_size", "layers", "training", "preprocess"] {
        assert_eq!(m[field], sidecar[field], "{field}");
    }
    assert_eq!(
        m["thresholds"]["image"],
        sidecar["calibration"]["image_threshold"]
    );
    assert_eq!(m["calibration"]["images"], sidecar["calibration"]["images"]);

    // Concurrent requests are batched (shown by a batch of 4 held at the gate): the same
    // verdicts and regions as predict, scores and heatmaps up to the batched arithmetic's
    // rounding.
    drop(server);
    let gate = Gate::new(root.path().join("gate"));
    let server = Arc::new(Server::start_gated(
        &index,
        &["-b", "4", "--queue", "16"],
        Some(&gate),
    ));
    let send = |path: PathBuf| {
        let server = Arc::clone(&server);
        std::thread::spawn(move || {
            let (status, _, got) = server.post("?heatmap=npy", &std::fs::read(&path).unwrap());
            assert_eq!(status, 200, "{got}");
            (path, got)
        })
    };
    let mut threads = vec![send(images[0].clone())];
    server.wait_for("scoring the first alone", |h| h["scoring"] == 1);
    threads.extend(images.iter().cycle().skip(1).take(11).cloned().map(send));
    server.wait_for("eleven queued", |h| h["queued"] == 11);
    gate.allow(1);
    server.wait_for("a batch of four", |h| h["scoring"] == 4 && h["queued"] == 7);
    gate.open();
    for t in threads {
        let (path, got) = t.join().unwrap();
        let rel = path.strip_prefix(&test).unwrap();
        assert_close_to_predict(&got, &out.join(rel), &rel.display().to_string());
    }
}

/// A served answer (with `heatmap_npy`) against predict's files `written` (without
/// extension): the same size, verdict and regions, the score within 1e-4 and the heatmap
/// within 1e-4 of its maximum (batched arithmetic rounds differently).
fn assert_close_to_predict(got: &Value, written: &Path, name: &str) {
    let want: Value =
        serde_json::from_str(&std::fs::read_to_string(written.with_extension("json")).unwrap())
            .unwrap();
    for field in ["width", "height", "verdict", "regions"] {
        assert_eq!(got[field], want[field], "{field} of {name}");
    }
    let (a, b) = (
        got["score"].as_f64().unwrap(),
        want["score"].as_f64().unwrap(),
    );
    assert!((a - b).abs() <= 1e-4 * b.abs(), "{name}: {a} vs {b}");
    let heat = |bytes: Vec<u8>| -> ndarray::Array2<f32> {
        ndarray::Array2::<f32>::read_npy(std::io::Cursor::new(bytes)).unwrap()
    };
    let (h, w) = (
        heat(b64(&got["heatmap_npy"])),
        heat(std::fs::read(written.with_extension("npy")).unwrap()),
    );
    assert_eq!(h.dim(), w.dim(), "{name}");
    let top = w.iter().copied().fold(0f32, f32::max);
    let worst = h
        .iter()
        .zip(&w)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(
        worst <= 1e-4 * top,
        "{name}: heatmaps differ by {worst} (max {top})"
    );
}

/// `POST /predict` with `body` on a connection of its own, from a thread.
fn post_from_thread(
    server: &Arc<Server>,
    body: &Arc<Vec<u8>>,
) -> std::thread::JoinHandle<(u16, Option<String>, Value)> {
    let (server, body) = (Arc::clone(server), Arc::clone(body));
    std::thread::spawn(move || server.post("", &body))
}

#[test]
fn full_queue_answers_503_and_sigterm_finishes_requests_in_flight() {
    let root = tempfile::tempdir().unwrap();
    let (index, test) = model_and_images(root.path());
    let small = Arc::new(std::fs::read(&images_in(&test)[0]).unwrap());
    let gate = Gate::new(root.path().join("gate"));

    // One request scoring (held at the gate), one waiting: a third is turned away with 503
    // and Retry-After.
    let server = Arc::new(Server::start_gated(
        &index,
        &["-b", "1", "--queue", "1"],
        Some(&gate),
    ));
    let a = post_from_thread(&server, &small);
    server.wait_for("scoring the first", |h| h["scoring"] == 1);
    let b = post_from_thread(&server, &small);
    server.wait_for("queueing the second", |h| h["queued"] == 1);
    let (status, retry, got) = server.post("", &small);
    assert_eq!(status, 503, "{got}");
    assert_eq!(retry.as_deref(), Some("1"));
    assert!(got["error"].as_str().unwrap().contains("queue is full"));
    gate.open();
    for t in [a, b] {
        let (status, _, got) = t.join().unwrap();
        assert_eq!(status, 200, "{got}");
    }
    let server = Arc::into_inner(server).unwrap();
    assert!(server.terminate().success());

    // SIGTERM with three requests in flight (held at the gate): the server stops accepting
    // connections, then answers each, then exits 0.
    let gate = Gate::new(root.path().join("gate"));
    let server = Arc::new(Server::start_gated(&index, &["-b", "1"], Some(&gate)));
    let threads = [
        post_from_thread(&server, &small),
        post_from_thread(&server, &small),
        post_from_thread(&server, &small),
    ];
    server.wait_for("three requests in flight", |h| {
        h["in_flight"] == 3 && h["scoring"] == 1 && h["queued"] == 2
    });
    let pid = server.child.id() as i32;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    wait_until_refused(server.address());
    gate.open();
    for t in threads {
        let (status, _, got) = t.join().unwrap();
        assert_eq!(status, 200, "{got}");
    }
    let lines = Arc::clone(&server.stderr);
    let mut server = Arc::into_inner(server).unwrap();
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status}: {:?}", lines.lock().unwrap());
    let log = lines.lock().unwrap().join("\n");
    assert!(
        log.contains("stopped: every request in flight was answered"),
        "{log}"
    );
}

/// Waits (at most a minute) until connections to `address` are refused: a stopping server no
/// longer accepts (it answers no 503 then: there is no connection to answer on).
fn wait_until_refused(address: &str) {
    let t = Instant::now();
    while std::net::TcpStream::connect(address).is_ok() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the server still accepts connections"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// SIGTERM with a request that never finishes (held at the gate for good): the server exits
/// after `--shutdown-timeout`, saying so, without answering it.
#[test]
fn shutdown_timeout_ends_a_stop_that_waits_too_long() {
    let root = tempfile::tempdir().unwrap();
    let (index, test) = model_and_images(root.path());
    let small = Arc::new(std::fs::read(&images_in(&test)[0]).unwrap());
    let gate = Gate::new(root.path().join("gate"));
    let server = Server::start_gated(&index, &["-b", "1", "--shutdown-timeout", "1"], Some(&gate));
    let url = format!("{}/predict", server.url);
    let held = std::thread::spawn(move || ureq::post(&url).send_bytes(&small).is_ok());
    server.wait_for("the request held", |h| h["scoring"] == 1);
    let lines = Arc::clone(&server.stderr);
    let t = Instant::now();
    let status = server.terminate();
    let waited = t.elapsed();
    assert!(status.success(), "{status}: {:?}", lines.lock().unwrap());
    let log = lines.lock().unwrap().join("\n");
    assert!(
        log.contains("requests still in flight 1 s after the stop signal: exiting without them"),
        "{log}"
    );
    assert!(
        !log.contains("every request in flight was answered"),
        "{log}"
    );
    assert!(waited >= Duration::from_secs(1), "exited after {waited:?}");
    assert!(!held.join().unwrap(), "the held request got no answer");
}

/// An ensemble (`train --backbone A --backbone B`) is served as predict scores it: the mean of
/// each backbone's score over its threshold, the same heatmap; `GET /model` lists both.
#[test]
fn serves_an_ensemble_as_predict_scores_it() {
    let root = tempfile::tempdir().unwrap();
    let train_dir = root.path().join("train");
    write_images(&train_dir, 12, 0, (64, 64), Defect::None);
    let test = root.path().join("test");
    write_images(&test.join("good"), 1, 100, (64, 64), Defect::None);
    write_images(&test.join("scratch"), 1, 200, (64, 64), Defect::Scratch);
    let index = root.path().join("model/ens.faiss");
    train_ok(
        &train_dir,
        &index,
        &[
            "--backbone",
            "resnet18",
            "--backbone",
            "resnet34",
            "--weights",
            "random:0",
            "--resize",
            "64",
            "--calibration-ratio",
            "0.3",
            "-q",
        ],
    );
    let out = root.path().join("predicted");
    let o = predict_with(&test, &out, &index, &["-q", "-b", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));

    let server = Server::start(&index, &["-b", "1"]);
    let model = server.get("/model");
    assert_eq!(model["thresholds"]["image"], 1.0);
    assert_eq!(model["ensemble"]["members"].as_array().unwrap().len(), 2);
    for path in images_in(&test) {
        let rel = path.strip_prefix(&test).unwrap();
        let written = |ext: &str| out.join(rel.with_extension(ext));
        let json: Value =
            serde_json::from_str(&std::fs::read_to_string(written("json")).unwrap()).unwrap();
        let (status, _, got) = server.post("?heatmap=npy", &std::fs::read(&path).unwrap());
        assert_eq!(status, 200, "{got}");
        for field in ["score", "normalized_score", "verdict", "regions"] {
            assert_eq!(got[field], json[field], "{field} of {}", rel.display());
        }
        assert_eq!(
            b64(&got["heatmap_npy"]),
            std::fs::read(written("npy")).unwrap()
        );
    }
    assert!(server.terminate().success());

    // Batched (-b 2, a batch of two shown at the gate): each image as predict scores it, to
    // the batched arithmetic's rounding.
    let gate = Gate::new(root.path().join("gate"));
    let server = Arc::new(Server::start_gated(&index, &["-b", "2"], Some(&gate)));
    let send = |path: PathBuf| {
        let server = Arc::clone(&server);
        std::thread::spawn(move || {
            let (status, _, got) = server.post("?heatmap=npy", &std::fs::read(&path).unwrap());
            assert_eq!(status, 200, "{got}");
            (path, got)
        })
    };
    let images = images_in(&test);
    let mut threads = vec![send(images[0].clone())];
    server.wait_for("scoring the first alone", |h| h["scoring"] == 1);
    threads.extend([send(images[1].clone()), send(images[0].clone())]);
    server.wait_for("two queued", |h| h["queued"] == 2);
    gate.allow(1);
    server.wait_for("a batch of two", |h| h["scoring"] == 2);
    gate.open();
    for t in threads {
        let (path, got) = t.join().unwrap();
        let rel = path.strip_prefix(&test).unwrap();
        assert_close_to_predict(&got, &out.join(rel), &rel.display().to_string());
    }
}

/// A tiled model (`train --tile`) is served as predict scores it, tile by tile.
#[test]
fn serves_a_tiled_model_as_predict_scores_it() {
    let root = tempfile::tempdir().unwrap();
    let index = train_small_with(root.path(), 6, &["--tile", "64"]);
    let test = root.path().join("test");
    write_images(&test.join("good"), 1, 100, (96, 96), Defect::None);
    write_images(&test.join("spot"), 1, 300, (120, 96), Defect::Spot);
    let out = root.path().join("predicted");
    let o = predict_with(&test, &out, &index, &["-q", "-b", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let server = Server::start(&index, &["-b", "1"]);
    assert_eq!(server.get("/model")["tile"], 64);
    assert_serves_as_predicted(&server, &test, &out, "?heatmap=npy");
    assert!(server.terminate().success());
}

/// Every image of `test` posted with `query`: the answer is what predict wrote into `out`,
/// exactly (size, scores, verdict, regions, and the heatmap and overlay when asked for).
fn assert_serves_as_predicted(server: &Server, test: &Path, out: &Path, query: &str) {
    for path in images_in(test) {
        let rel = path.strip_prefix(test).unwrap();
        let written = |ext: &str| out.join(rel.with_extension(ext));
        let json: Value =
            serde_json::from_str(&std::fs::read_to_string(written("json")).unwrap()).unwrap();
        let (status, _, got) = server.post(query, &std::fs::read(&path).unwrap());
        assert_eq!(status, 200, "{got}");
        assert_answers_as_predict_wrote(&got, &json, rel);
        if query.contains("heatmap=npy") {
            let npy = b64(&got["heatmap_npy"]);
            assert_eq!(
                npy,
                std::fs::read(written("npy")).unwrap(),
                "{}",
                rel.display()
            );
        }
        if query.contains("overlay=jpg") {
            let jpg = b64(&got["overlay_jpg"]);
            assert_eq!(
                jpg,
                std::fs::read(written("jpg")).unwrap(),
                "{}",
                rel.display()
            );
        }
    }
}

/// serve's --nprobe, --threshold and --contour apply as predict's do: each changes the
/// answers (checked against predict without them), and serve answers what predict writes
/// with them.
#[test]
fn serve_overrides_apply_as_in_predict() {
    let root = tempfile::tempdir().unwrap();
    let index = train_small_with(
        root.path(),
        12,
        &["--bank-index", "ivf", "--nlist", "4", "--nprobe", "1"],
    );
    let test = root.path().join("test");
    write_images(&test.join("good"), 2, 100, (96, 96), Defect::None);
    write_images(&test.join("spot"), 2, 300, (96, 96), Defect::Spot);
    let plain = root.path().join("plain");
    let o = predict_with(&test, &plain, &index, &["-q", "-b", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let plain_json = |rel: &Path| -> Value {
        serde_json::from_str(
            &std::fs::read_to_string(plain.join(rel.with_extension("json"))).unwrap(),
        )
        .unwrap()
    };
    // A threshold below every image's score: all anomalous.
    let images = images_in(&test);
    let lowest = images
        .iter()
        .map(|p| {
            plain_json(p.strip_prefix(&test).unwrap())["score"]
                .as_f64()
                .unwrap()
        })
        .fold(f64::INFINITY, f64::min);
    let threshold = format!("{}", lowest * 0.9);
    let overrides = ["--nprobe", "4", "--threshold", &threshold, "--contour"];
    let out = root.path().join("overridden");
    let o = predict_with(
        &test,
        &out,
        &index,
        &[&["-q", "-b", "1"][..], &overrides].concat(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let (mut rescored, mut flipped, mut redrawn) = (0, 0, 0);
    for p in &images {
        let rel = p.strip_prefix(&test).unwrap();
        let (a, b) = (plain_json(rel), json(&out.join(rel.with_extension("json"))));
        rescored += (a["score"] != b["score"]) as usize;
        flipped += (a["verdict"] != b["verdict"]) as usize;
        let jpg = |dir: &Path| std::fs::read(dir.join(rel.with_extension("jpg"))).unwrap();
        redrawn += (jpg(&plain) != jpg(&out)) as usize;
        assert_eq!(b["verdict"], "anomalous", "{}", rel.display());
    }
    assert!(rescored > 0, "--nprobe 4 of 4 lists changes no score");
    assert!(flipped > 0, "--threshold changes no verdict");
    assert_eq!(redrawn, images.len(), "overlays with contours");

    let server = Server::start(&index, &[&["-b", "1"][..], &overrides].concat());
    assert_eq!(
        server.get("/model")["thresholds"]["image"]
            .as_f64()
            .unwrap() as f32,
        threshold.parse::<f32>().unwrap()
    );
    assert_serves_as_predicted(&server, &test, &out, "?heatmap=npy&overlay=jpg");
    assert!(server.terminate().success());
}

/// A free loopback port (bound and released: another process could take it, rarely).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `name` on PATH (or in `also`), or None after `skip` (a failure in CI).
fn tool(name: &str, also: &[PathBuf]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = also
        .iter()
        .cloned()
        .chain(std::env::split_paths(&path).map(|d| d.join(name)))
        .find(|p| p.is_file());
    if found.is_none() {
        skip(&format!(
            "{name} is not installed (scripts/setup.sh installs it)"
        ));
    }
    found
}

/// The server's peak resident memory (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

/// A PNG declaring `w`x`h` RGB pixels with a few bytes of pixel data.
fn png_declaring(w: u32, h: u32) -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        let body = [kind, data].concat();
        png.extend_from_slice(&(data.len() as u32).to_be_bytes());
        png.extend_from_slice(&body);
        png.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
    };
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00]);
    chunk(b"IEND", &[]);
    png
}

/// `curl ARGS URL`: the status and the JSON body.
fn curl(args: &[&str], url: &str) -> (u16, Value) {
    let o = std::process::Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}"])
        .args(args)
        .arg(url)
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap();
    let json = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    (status.parse().unwrap(), json)
}

/// The bar, on `--listen localhost:PORT`: a `curl -F` upload scores as the raw body
/// does; /metrics passes `promtool check metrics`; a PNG declaring 20000x20000 pixels is
/// refused (413, naming the limit) within 5 s with the server's peak RSS under 2 GiB. Also
/// the answers that say what to send: `curl --data`, an empty body, a form without a file,
/// 404 and 405, all JSON.
#[test]
fn bar_uploads_metrics_and_an_oversized_png_on_localhost() {
    let root = tempfile::tempdir().unwrap();
    let index = train_resnet18_small(root.path(), &[]);
    write_images(&root.path().join("test"), 1, 500, (64, 64), Defect::Scratch);
    let image = root.path().join("test/000.png");
    let port = free_port();
    let server = Server::start_at(&index, &format!("localhost:{port}"), &["-b", "1"], None);
    let url = format!("http://localhost:{port}/predict");
    let file = format!("file=@{}", image.display());
    let raw = format!("@{}", image.display());
    let (status, form) = curl(&["-F", &file], &url);
    assert_eq!(status, 200, "{form}");
    let (status, body) = curl(&["--data-binary", &raw], &url);
    assert_eq!(status, 200, "{body}");
    assert_eq!(form, body);
    assert!(body["score"].as_f64().unwrap() > 0.0, "{body}");

    let (status, got) = curl(&["--data", &raw], &url);
    assert_eq!(status, 400, "{got}");
    let says = |v: &Value, what: &str| {
        let e = v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error: {v}"));
        assert!(e.contains(what), "{e:?} does not say {what:?}");
    };
    says(&got, "--data-binary @part.png");
    let (status, got) = curl(&["-X", "POST"], &url);
    assert_eq!(status, 400, "{got}");
    says(&got, "the request body is empty");
    let (status, got) = curl(&["-F", "name=value", "-F", "other=x"], &url);
    assert_eq!(status, 400, "{got}");
    says(&got, "-F file=@part.png");
    let (status, got) = curl(&[], &format!("http://localhost:{port}/nowhere"));
    assert_eq!(status, 404, "{got}");
    says(&got, "POST /predict");
    let (status, got) = curl(&[], &url);
    assert_eq!(status, 405, "{got}");
    says(&got, "use POST");

    if let Some(promtool) = tool("promtool", &[]) {
        let metrics = ureq::get(&format!("{}/metrics", server.url))
            .call()
            .unwrap()
            .into_string()
            .unwrap();
        for family in [
            "patchcore_requests_total{endpoint=\"/predict\",status=\"200\"} 2",
            "patchcore_queue_wait_seconds_bucket",
            "patchcore_scoring_seconds_bucket",
            "patchcore_batch_size_bucket",
            "patchcore_queue_depth 0",
            "patchcore_images_total{verdict=",
            "patchcore_image_score_bucket",
            "patchcore_reloads_total{result=\"success\"} 0",
            "patchcore_model_info{checksum=",
        ] {
            assert!(metrics.contains(family), "no {family} in {metrics}");
        }
        let mut check = std::process::Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        check
            .stdin
            .take()
            .unwrap()
            .write_all(metrics.as_bytes())
            .unwrap();
        let o = check.wait_with_output().unwrap();
        assert!(o.status.success(), "promtool: {}{}", stderr(&o), metrics);
    }

    let huge = png_declaring(20_000, 20_000);
    let t = Instant::now();
    let (status, _, got) = server.post("", &huge);
    let took = t.elapsed();
    assert_eq!(status, 413, "{got}");
    says(&got, "20000x20000");
    says(&got, "limit of 40000000 pixels");
    assert!(took < Duration::from_secs(5), "refused after {took:?}");
    let rss = peak_rss(server.child.id());
    assert!(rss < 2 << 30, "peak RSS {rss} bytes");
    assert!(server.terminate().success());
}

/// predict refuses an input file over --max-pixels with one line naming it, before the
/// model loads.
#[test]
fn predict_refuses_a_file_over_max_pixels() {
    let root = tempfile::tempdir().unwrap();
    let index = train_resnet18_small(root.path(), &[]);
    let input = root.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    write_images(&input, 1, 500, (64, 64), Defect::None);
    let big = input.join("big.png");
    std::fs::write(&big, png_declaring(20_000, 20_000)).unwrap();
    let o = predict(&input, &root.path().join("out"), &index);
    assert_fails_naming(&o, &[s(&big), "20000x20000", "--max-pixels"]);
    // Within the limit it is not refused for its size (it has no pixels: damaged).
    let o = predict_with(
        &input,
        &root.path().join("out"),
        &index,
        &["-q", "--max-pixels", "400000000"],
    );
    let line = error_line(&o);
    assert!(!line.contains("--max-pixels"), "{line}");
    // With --on-error skip it is listed as an error naming the limit; the rest is scored.
    let out = root.path().join("skip");
    let o = predict_with(&input, &out, &index, &["-q", "--on-error", "skip"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let rows = common::csv_rows(&out.join("results.csv"));
    let names: Vec<&str> = rows.iter().map(|r| &r[0]).collect();
    assert_eq!(names, ["000.png", "big.png"], "input order");
    let (verdict, error) = (&rows[1][3], rows[1].iter().next_back().unwrap());
    assert_eq!(verdict, "error");
    assert!(
        error.contains("20000x20000") && error.contains("--max-pixels"),
        "{error}"
    );
    assert_ne!(&rows[0][3], "error");
    assert!(out.join("000.npy").exists() && !out.join("big.npy").exists());
}

/// Whether `bytes` hold an HTTP response's head and the body its Content-Length declares.
fn complete(bytes: &[u8]) -> bool {
    let text = String::from_utf8_lossy(bytes);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|v| v.trim().parse::<usize>().ok());
    length.is_some_and(|n| body.len() >= n)
}

/// A stalled upload gets 408 after --read-timeout, naming it; a slow one 408 after
/// --request-timeout. The server goes on answering.
#[test]
fn stalled_and_slow_uploads_get_408() {
    let root = tempfile::tempdir().unwrap();
    let index = train_resnet18_small(root.path(), &[]);
    let server = Server::start(&index, &["--read-timeout", "2", "--request-timeout", "8"]);
    let send = |pieces: usize| {
        let mut tcp = std::net::TcpStream::connect(server.address()).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let head = "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n";
        tcp.write_all(head.as_bytes()).unwrap();
        let t = Instant::now();
        // A byte every half second: never a pause of 2 s, but 1000 bytes take too long.
        for _ in 0..pieces {
            if tcp.write_all(b"x").is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        // Until the whole answer is in (the server may close the connection later).
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        while !complete(&answer) {
            match tcp.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
        (String::from_utf8_lossy(&answer).into_owned(), t.elapsed())
    };
    let (answer, took) = send(1);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("--read-timeout"), "{answer}");
    // Bounds with room for a busy machine, apart enough to tell the two timeouts apart.
    let read = Duration::from_secs(2)..Duration::from_secs(6);
    assert!(read.contains(&took), "{took:?}");
    let (answer, took) = send(30);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("--request-timeout"), "{answer}");
    let request = Duration::from_secs(8)..Duration::from_secs(13);
    assert!(request.contains(&took), "{took:?}");
    assert_eq!(server.health()["status"], "ok");
    assert!(server.terminate().success());
}

/// SIGHUP: a model that fails to load is refused (the old one stays, the log says why);
/// after `patchcore calibrate` writes new thresholds, /model and /health show them and the
/// new checksum, while a client loop through the reload gets 30 of 30 answers. The request
/// log (--json-logs) has a line per request with its fields.
#[test]
fn sighup_reloads_the_model_without_dropping_a_request() {
    let root = tempfile::tempdir().unwrap();
    let index = train_resnet18_small(root.path(), &[]);
    write_images(&root.path().join("good"), 6, 900, (64, 64), Defect::None);
    let image = Arc::new(std::fs::read(root.path().join("train/000.png")).unwrap());
    let server = Server::start(&index, &["-b", "2", "--json-logs"]);
    let pid = server.child.id() as i32;
    let before = server.get("/model");
    let checksum = before["checksum"].as_str().unwrap().to_string();
    assert_eq!(server.health()["model_checksum"], checksum.as_str());

    // A damaged sidecar: the reload fails, the old model serves on.
    let sidecar = PathBuf::from(format!("{}.json", index.display()));
    let good = std::fs::read(&sidecar).unwrap();
    std::fs::write(&sidecar, b"{").unwrap();
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    let logged = |what: &str| {
        let t = Instant::now();
        loop {
            if let Some(l) = server
                .stderr
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(what))
            {
                return l.clone();
            }
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "never logged {what}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let failed = logged("\"reload_failed\"");
    assert!(failed.contains(&checksum), "{failed}");
    std::fs::write(&sidecar, &good).unwrap();
    let (status, _, got) = server.post("", &image);
    assert_eq!(status, 200, "{got}");
    assert_eq!(server.health()["model_checksum"], checksum.as_str());

    // New thresholds, then SIGHUP while a client posts 30 requests one after another.
    let o = run(&[
        "calibrate",
        "-q",
        "-i",
        s(&root.path().join("good")),
        "--index",
        s(&index),
    ]);
    assert!(o.status.success(), "calibrate: {}", stderr(&o));
    // Ten before the signal, ten while the model loads (likely), ten once it is in force.
    let mut answered = 0;
    for i in 0..30 {
        if i == 10 {
            assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
        }
        if i == 20 {
            logged("\"reloaded\"");
        }
        let (status, _, got) = server.post("", &image);
        assert_eq!(status, 200, "request {i}: {got}");
        answered += 1;
    }
    assert_eq!(answered, 30);
    let after = server.get("/model");
    assert_ne!(after["checksum"], before["checksum"]);
    assert_ne!(after["thresholds"], before["thresholds"], "{after}");
    let calibrated = json(&sidecar);
    let want = calibrated["calibration"]["image_threshold"]
        .as_f64()
        .unwrap();
    let got = after["thresholds"]["image"].as_f64().unwrap();
    assert!((got - want).abs() <= 1e-6 * want, "{got} vs {want}");
    assert_eq!(server.health()["model_checksum"], after["checksum"]);
    let metrics = ureq::get(&format!("{}/metrics", server.url))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(
        metrics.contains("patchcore_reloads_total{result=\"success\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("patchcore_reloads_total{result=\"failure\"} 1"),
        "{metrics}"
    );

    // The request log: one JSON line per scored request with its fields (read from the
    // server's stderr by a thread: the last lines may still be on their way).
    let predicts = || -> Vec<Value> {
        let lines = server.stderr.lock().unwrap().clone();
        lines
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["event"] == "request" && v["endpoint"] == "/predict")
            .collect()
    };
    let t = Instant::now();
    while predicts().len() < 31 && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let (requests, lines) = (predicts(), server.stderr.lock().unwrap().clone());
    assert_eq!(requests.len(), 31, "{lines:?}");
    for r in &requests {
        for field in [
            "id",
            "status",
            "bytes",
            "queue_seconds",
            "scoring_seconds",
            "score",
            "verdict",
        ] {
            assert!(!r[field].is_null(), "{field} missing: {r}");
        }
    }
    let last = requests.last().unwrap();
    assert_eq!(requests[0]["model_checksum"], checksum.as_str());
    assert_eq!(last["model_checksum"], after["checksum"]);
    assert!(server.terminate().success());
}

/// Reloads take turns on the server's two long-lived scoring threads: once each has loaded a
/// model, further reloads start no thread. (A new thread per reload left its freed model in a
/// malloc arena of its own each time, and the peak RSS grew with the reloads:
/// experiments/serve-load.)
#[test]
fn reloads_start_no_scoring_thread() {
    let root = tempfile::tempdir().unwrap();
    let index = train_resnet18_small(root.path(), &[]);
    let image = std::fs::read(root.path().join("train/000.png")).unwrap();
    let server = Server::start(&index, &["-b", "2"]);
    let pid = server.child.id();
    // The threads named "scoring" (the scoring threads and the OpenMP workers they start).
    let scoring = || -> BTreeSet<String> {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter_map(Result::ok)
            .filter(|t| {
                std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "scoring")
            })
            .map(|t| t.file_name().to_string_lossy().into_owned())
            .collect()
    };
    let post = || {
        let (status, _, got) = server.post("", &image);
        assert_eq!(status, 200, "{got}");
    };
    let reload = |n: usize| {
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGHUP) }, 0);
        let t = Instant::now();
        let reloaded = || {
            let lines = server.stderr.lock().unwrap();
            lines.iter().filter(|l| l.contains("reloaded ")).count()
        };
        while reloaded() < n {
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "reload {n} not logged"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // Queued after the handover mark: scored on the reloaded model.
        post();
    };
    post();
    reload(1);
    let threads = scoring();
    assert!(!threads.is_empty());
    for n in 2..=4 {
        reload(n);
    }
    assert_eq!(scoring(), threads, "reloads 2-4 started scoring threads");
    assert!(server.terminate().success());
}

/// A real Prometheus, started on loopback with a scrape job for the server, scrapes it and
/// answers a query for the requests it counted.
#[test]
fn prometheus_scrapes_the_server() {
    let Some(prometheus) = tool("prometheus", &[]) else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let index = train_resnet18_small(root.path(), &[]);
    let server = Server::start(&index, &["-q"]);
    let image = std::fs::read(root.path().join("train/000.png")).unwrap();
    assert_eq!(server.post("", &image).0, 200);
    let config = root.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: patchcore\n    \
             static_configs:\n      - targets: ['{}']\n",
            server.address()
        ),
    )
    .unwrap();
    let web = format!("127.0.0.1:{}", free_port());
    let mut child = std::process::Command::new(prometheus)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            root.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let query = format!(
        "http://{web}/api/v1/query?query=patchcore_requests_total%7Bendpoint%3D%22%2Fpredict%22%7D"
    );
    let t = Instant::now();
    let found = loop {
        let got = ureq::get(&query)
            .call()
            .ok()
            .and_then(|r| r.into_string().ok())
            .and_then(|t| serde_json::from_str::<Value>(&t).ok());
        if let Some(v) = got.filter(|v| !v["data"]["result"].as_array().unwrap().is_empty()) {
            break Some(v);
        }
        if t.elapsed() > Duration::from_secs(90) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let _ = child.kill();
    let _ = child.wait();
    let v = found.expect("Prometheus never answered with the server's requests");
    let sample = &v["data"]["result"][0];
    assert_eq!(sample["metric"]["status"], "200", "{v}");
    assert_eq!(sample["value"][1], "1", "{v}");
    assert!(server.terminate().success());
}

/// schemathesis, from /openapi.json, checks every endpoint against the running server: no
/// server error, and every status, content type and body as documented.
#[test]
fn openapi_document_holds_under_schemathesis() {
    let venv = python().parent().unwrap().join("schemathesis");
    let Some(schemathesis) = tool("schemathesis", &[venv]) else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let index = train_resnet18_small(root.path(), &[]);
    let server = Server::start(&index, &["-q"]);
    let doc = server.get("/openapi.json");
    for path in ["/predict", "/health", "/model", "/metrics", "/openapi.json"] {
        assert!(doc["paths"][path].is_object(), "{path} undocumented");
    }
    let o = std::process::Command::new(schemathesis)
        .args(["run", &format!("{}/openapi.json", server.url)])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
            "--max-examples",
            "25",
        ])
        .env("SCHEMATHESIS_HOOKS", "")
        // Its cache (.schemathesis/) goes there, not into the checkout.
        .current_dir(root.path())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "schemathesis: {}{}",
        String::from_utf8_lossy(&o.stdout),
        stderr(&o)
    );
    assert!(server.terminate().success());
}
