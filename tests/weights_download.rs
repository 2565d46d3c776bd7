//! The weights download path against a local HTTP server on 127.0.0.1: download with checksum,
//! cache reuse, checksum mismatch, and the offline error.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use patchcore::backbone::{Arch, ResNet};
use patchcore::synthetic::Defect;
use patchcore::weights::sha256_file;
use tch::{nn::VarStore, Device};

/// Serves `file` at `path` (anything else is 404) for at most `max` requests; counts hits.
fn serve(file: PathBuf, path: &'static str, max: usize) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(max) {
            let Ok(mut stream) = stream else { continue };
            let mut line = String::new();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            reader.read_line(&mut line).unwrap();
            // Drain the headers.
            let mut h = String::new();
            while reader.read_line(&mut h).unwrap() > 2 {
                h.clear();
            }
            let requested = line.split_whitespace().nth(1).unwrap_or("").to_string();
            if requested == path {
                counter.fetch_add(1, Ordering::SeqCst);
                let body = std::fs::read(&file).unwrap();
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(&body);
            } else {
                let _ = stream.write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
            }
        }
    });
    (addr, hits)
}

/// ResNet-18 weights (up to layer3) with seeded values, written as safetensors by tch.
fn make_weights(dir: &Path) -> PathBuf {
    tch::manual_seed(3);
    let vs = VarStore::new(Device::Cpu);
    let _net = ResNet::new(&vs.root(), Arch::Resnet18, &[2, 3]).unwrap();
    let file = dir.join("model.safetensors");
    vs.save(&file).unwrap();
    file
}

fn train_with(
    root: &Path,
    cache: &Path,
    weights: &str,
    base: Option<&str>,
) -> std::process::Output {
    let train = root.join("train");
    if !train.exists() {
        common::write_images(&train, 2, 0, (64, 64), Defect::None);
    }
    let mut cmd = common::bin();
    cmd.env("PATCHCORE_CACHE", cache);
    if let Some(b) = base {
        cmd.env("PATCHCORE_WEIGHTS_BASE_URL", b);
    }
    cmd.args([
        "train",
        "-i",
        train.to_str().unwrap(),
        "-o",
        root.join("index.faiss").to_str().unwrap(),
        "--backbone",
        "resnet18",
        "--weights",
        weights,
        "--resize",
        "64",
        "-q",
    ])
    .output()
    .unwrap()
}

#[test]
fn downloads_once_with_checksum_then_uses_the_cache() {
    let root = tempfile::tempdir().unwrap();
    let cache = root.path().join("cache");
    let file = make_weights(root.path());
    let sha = sha256_file(&file).unwrap();
    let (addr, hits) = serve(file, "/w/model.safetensors", 8);
    let spec = format!("{addr}/w/model.safetensors#sha256={sha}");

    let o = train_with(root.path(), &cache, &spec, None);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    let o = train_with(root.path(), &cache, &spec, None);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert_eq!(hits.load(Ordering::SeqCst), 1, "second run uses the cache");

    let side: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.path().join("index.faiss.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(side["weights"]["sha256"], sha.as_str());
}

#[test]
fn checksum_mismatch_is_refused_and_nothing_is_cached() {
    let root = tempfile::tempdir().unwrap();
    let cache = root.path().join("cache");
    let file = make_weights(root.path());
    let (addr, _) = serve(file, "/w/model.safetensors", 4);
    let spec = format!("{addr}/w/model.safetensors#sha256={}", "0".repeat(64));
    let o = train_with(root.path(), &cache, &spec, None);
    let line = common::error_line(&o);
    assert!(
        line.contains("checksum") && line.contains("refusing"),
        "{line}"
    );
    let cached: Vec<_> = walk(&cache);
    assert!(
        cached
            .iter()
            .all(|p| !p.to_string_lossy().ends_with(".safetensors")),
        "{cached:?}"
    );
    assert!(!root.path().join("index.faiss").exists());
}

#[test]
fn default_imagenet_source_downloads_from_the_base_url() {
    let root = tempfile::tempdir().unwrap();
    let cache = root.path().join("cache");
    let file = make_weights(root.path());
    let (addr, hits) = serve(
        file,
        "/timm/resnet18.tv_in1k/resolve/main/model.safetensors",
        4,
    );
    let o = train_with(root.path(), &cache, "imagenet", Some(&addr));
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    // The first download's checksum is recorded; a tampered cache file is then refused.
    let weights: Vec<PathBuf> = walk(&cache)
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".safetensors"))
        .collect();
    assert_eq!(weights.len(), 1);
    let mut bytes = std::fs::read(&weights[0]).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&weights[0], bytes).unwrap();
    let o = train_with(root.path(), &cache, "imagenet", Some(&addr));
    let line = common::error_line(&o);
    assert!(line.contains("checksum"), "{line}");
}

#[test]
fn offline_without_cache_says_how_to_provide_weights() {
    let root = tempfile::tempdir().unwrap();
    // A port nobody listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let o = train_with(
        root.path(),
        &root.path().join("cache"),
        "imagenet",
        Some(&format!("http://127.0.0.1:{port}")),
    );
    let line = common::error_line(&o);
    assert!(line.contains("no ImageNet weights for resnet18"), "{line}");
    assert!(line.contains("--weights"), "{line}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}
