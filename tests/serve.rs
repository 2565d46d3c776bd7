//! `patchcore serve` over loopback: the same numbers and files as predict for the same
//! images, the error statuses (400 bad image, 413 too large, 503 queue full), /health and
//! /model, and SIGTERM with requests in flight.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use common::*;
use patchcore::synthetic::Defect;
use serde_json::Value;

/// A running `patchcore serve`; killed if the test ends without stopping it.
struct Server {
    child: Child,
    url: String,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Server {
    fn start(index: &Path, extra: &[&str]) -> Server {
        let mut child = bin()
            .args(["serve", "--index", index.to_str().unwrap()])
            .args(["--listen", "127.0.0.1:0"])
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

    // Concurrent requests are batched: the same scores up to the batched arithmetic's rounding.
    drop(server);
    let server = Arc::new(Server::start(&index, &["-b", "4"]));
    let threads: Vec<_> = images
        .iter()
        .cycle()
        .take(12)
        .cloned()
        .map(|path| {
            let server = Arc::clone(&server);
            let json = out.join(path.strip_prefix(&test).unwrap().with_extension("json"));
            std::thread::spawn(move || {
                let (status, _, got) = server.post("", &std::fs::read(&path).unwrap());
                assert_eq!(status, 200, "{got}");
                let want: Value =
                    serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
                let (a, b) = (
                    got["score"].as_f64().unwrap(),
                    want["score"].as_f64().unwrap(),
                );
                assert!((a - b).abs() <= 1e-4 * b.abs(), "{a} vs {b}");
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// An image the model takes a while to score: resized to 96 pixels high it stays 4000 wide,
/// about 40 times a 96x96 image's work.
fn slow_image(root: &Path) -> Vec<u8> {
    let dir = root.join("slow");
    write_images(&dir, 1, 7, (4000, 96), Defect::None);
    std::fs::read(dir.join("000.png")).unwrap()
}

#[test]
fn full_queue_answers_503_and_sigterm_finishes_requests_in_flight() {
    let root = tempfile::tempdir().unwrap();
    let (index, test) = model_and_images(root.path());
    let slow = Arc::new(slow_image(root.path()));
    let small = Arc::new(std::fs::read(&images_in(&test)[0]).unwrap());
    let post = |server: &Arc<Server>, body: &Arc<Vec<u8>>| {
        let (server, body) = (Arc::clone(server), Arc::clone(body));
        std::thread::spawn(move || server.post("", &body))
    };

    // One request scoring, one waiting: a third is turned away with 503 and Retry-After.
    let server = Arc::new(Server::start(&index, &["-b", "1", "--queue", "1"]));
    let a = post(&server, &slow);
    server.wait_for("scoring the slow image", |h| h["scoring"] == 1);
    let b = post(&server, &small);
    server.wait_for("queueing the second", |h| h["queued"] == 1);
    let (status, retry, got) = server.post("", &small);
    assert_eq!(status, 503, "{got}");
    assert_eq!(retry.as_deref(), Some("1"));
    assert!(got["error"].as_str().unwrap().contains("queue is full"));
    for t in [a, b] {
        let (status, _, got) = t.join().unwrap();
        assert_eq!(status, 200, "{got}");
    }
    let server = Arc::into_inner(server).unwrap();
    assert!(server.terminate().success());

    // SIGTERM with three requests in flight: each is answered, then the server exits 0.
    let server = Arc::new(Server::start(&index, &["-b", "1"]));
    let threads = [
        post(&server, &slow),
        post(&server, &small),
        post(&server, &small),
    ];
    server.wait_for("three requests in flight", |h| h["in_flight"] == 3);
    let pid = server.child.id() as i32;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    for t in threads {
        let (status, _, got) = t.join().unwrap();
        assert_eq!(status, 200, "{got}");
    }
    let lines = Arc::clone(&server.stderr);
    let mut server = Arc::into_inner(server).unwrap();
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status}: {:?}", lines.lock().unwrap());
    let log = lines.lock().unwrap().join("\n");
    assert!(log.contains("stopped"), "{log}");
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
}
