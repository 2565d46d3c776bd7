//! The weights download path against a local HTTP server on 127.0.0.1 (the hosts' base URLs
//! replaced through PATCHCORE_WEIGHTS_BASE_URL and PATCHCORE_WEIGHTS_PTH_BASE_URL): download
//! with checksum, cache reuse, pinned and prefix checksums, named sources, the offline error.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use patchcore::features::backbone::{Arch, ResNet};
use patchcore::util::fsutil::sha256_file;
use patchcore::util::synthetic::Defect;
use tch::{nn::VarStore, Device};

const HF: &str = "PATCHCORE_WEIGHTS_BASE_URL";
const PTH: &str = "PATCHCORE_WEIGHTS_PTH_BASE_URL";

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

/// Weights for `arch` (up to layer3) with seeded values, written as safetensors by tch.
fn make_weights(dir: &Path, arch: Arch) -> PathBuf {
    tch::manual_seed(3);
    let vs = VarStore::new(Device::Cpu);
    let _net = ResNet::new(&vs.root(), arch, &[2, 3]).unwrap();
    let file = dir.join(format!("{}.safetensors", arch.name()));
    vs.save(&file).unwrap();
    file
}

/// `patchcore train` on two small images with `--backbone arch --weights weights`, the cache
/// in `cache` and the environment `env`.
fn train_with(
    root: &Path,
    cache: &Path,
    arch: Arch,
    weights: &str,
    env: &[(&str, &str)],
) -> Output {
    let train = root.join("train");
    if !train.exists() {
        common::write_images(&train, 2, 0, (64, 64), Defect::None);
    }
    let mut cmd = common::bin();
    cmd.env("PATCHCORE_CACHE", cache).envs(env.iter().copied());
    cmd.args([
        "train",
        "-i",
        train.to_str().unwrap(),
        "-o",
        root.join("index.faiss").to_str().unwrap(),
        "--backbone",
        arch.name(),
        "--weights",
        weights,
        "--resize",
        "64",
        "-q",
    ])
    .output()
    .unwrap()
}

/// `patchcore predict` of the training images with the model trained by `train_with`.
fn predict_with(root: &Path, cache: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = common::bin();
    cmd.env("PATCHCORE_CACHE", cache).envs(env.iter().copied());
    cmd.args([
        "predict",
        "-i",
        root.join("train").to_str().unwrap(),
        "-o",
        root.join("out").to_str().unwrap(),
        "--index",
        root.join("index.faiss").to_str().unwrap(),
        "-q",
        // Called more than once into the same folder: the weights are what is tested here.
        "--overwrite",
    ])
    .output()
    .unwrap()
}

fn sidecar(root: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(root.join("index.faiss.json")).unwrap()).unwrap()
}

fn cached_weights(cache: &Path) -> Vec<PathBuf> {
    walk(cache)
        .into_iter()
        .filter(|p| {
            let p = p.to_string_lossy();
            p.ends_with(".safetensors") || p.ends_with(".pth")
        })
        .collect()
}

#[test]
fn downloads_once_with_checksum_then_uses_the_cache() {
    let root = tempfile::tempdir().unwrap();
    let cache = root.path().join("cache");
    let file = make_weights(root.path(), Arch::Resnet18);
    let sha = sha256_file(&file).unwrap();
    let (addr, hits) = serve(file, "/w/model.safetensors", 8);
    let spec = format!("{addr}/w/model.safetensors#sha256={sha}");

    let o = train_with(root.path(), &cache, Arch::Resnet18, &spec, &[]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    let o = train_with(root.path(), &cache, Arch::Resnet18, &spec, &[]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert_eq!(hits.load(Ordering::SeqCst), 1, "second run uses the cache");
    assert_eq!(sidecar(root.path())["weights"]["sha256"], sha.as_str());
}

#[test]
fn checksum_mismatch_is_refused_and_nothing_is_cached() {
    let root = tempfile::tempdir().unwrap();
    let cache = root.path().join("cache");
    let file = make_weights(root.path(), Arch::Resnet18);
    let (addr, _) = serve(file, "/w/model.safetensors", 4);
    let spec = format!("{addr}/w/model.safetensors#sha256={}", "0".repeat(64));
    let o = train_with(root.path(), &cache, Arch::Resnet18, &spec, &[]);
    let line = common::error_line(&o);
    assert!(
        line.contains("checksum") && line.contains("refusing"),
        "{line}"
    );
    assert!(cached_weights(&cache).is_empty());
    assert!(!root.path().join("index.faiss").exists());
}

/// The default source is pinned by its published SHA-256: other bytes at its URL are refused.
#[test]
fn default_imagenet_source_is_pinned_by_its_published_checksum() {
    let root = tempfile::tempdir().unwrap();
    let cache = root.path().join("cache");
    let file = make_weights(root.path(), Arch::Resnet18);
    let (addr, hits) = serve(
        file,
        "/timm/resnet18.tv_in1k/resolve/main/model.safetensors",
        4,
    );
    let o = train_with(
        root.path(),
        &cache,
        Arch::Resnet18,
        "imagenet",
        &[(HF, &addr)],
    );
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    let line = common::error_line(&o);
    assert!(
        line.contains("expected 694f673df6520a3158624e8a89af086f59923ee4cd7436fe5bc3bc71d295ad81")
            && line.contains("refusing"),
        "{line}"
    );
    assert!(cached_weights(&cache).is_empty());
}

/// A named source without a published checksum (SSL ResNet-50, safetensors): downloaded once
/// from the base URL, its checksum recorded; predict gets the same weights from the name in
/// the model; a changed cache file is then refused.
#[test]
fn named_source_downloads_once_and_predict_reuses_it() {
    let root = tempfile::tempdir().unwrap();
    let cache = root.path().join("cache");
    let file = make_weights(root.path(), Arch::Resnet50);
    let sha = sha256_file(&file).unwrap();
    let (addr, hits) = serve(
        file,
        "/timm/resnet50.fb_ssl_yfcc100m_ft_in1k/resolve/main/model.safetensors",
        8,
    );
    let env = [(HF, addr.as_str())];
    let o = train_with(root.path(), &cache, Arch::Resnet50, "ssl", &env);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    let w = &sidecar(root.path())["weights"];
    assert_eq!(w["spec"], "ssl");
    assert_eq!(w["sha256"], sha.as_str());
    assert!(w["source"].as_str().unwrap().starts_with(&addr), "{w}");

    let o = predict_with(root.path(), &cache, &env);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert_eq!(hits.load(Ordering::SeqCst), 1, "predict uses the cache");

    let cached = cached_weights(&cache);
    assert_eq!(cached.len(), 1);
    assert!(cached[0].ends_with("resnet50.fb_ssl_yfcc100m_ft_in1k.safetensors"));
    let mut bytes = std::fs::read(&cached[0]).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&cached[0], bytes).unwrap();
    let line = common::error_line(&predict_with(root.path(), &cache, &env));
    assert!(
        line.contains("checksum") && line.contains(&sha) && line.contains("delete the file"),
        "{line}"
    );
}

/// Facebook's original file (`ssl:pth`): a torchvision ResNet-50 state dict as torch.save
/// wrote it in 2019 (an OrderedDict, the format before PyTorch 1.6), from the .pth base URL.
#[test]
fn facebook_pth_source_loads_through_the_pth_base_url() {
    let root = tempfile::tempdir().unwrap();
    let cache = root.path().join("cache");
    let file = root.path().join("ssl.pth");
    let script = "import sys, torch, torchvision\n\
        torch.manual_seed(0)\n\
        sd = torchvision.models.resnet50(weights=None).state_dict()\n\
        for k in [k for k in sd if k.startswith('layer4') or k.startswith('fc')]: del sd[k]\n\
        torch.save(sd, sys.argv[1], _use_new_zipfile_serialization=False)\n";
    let py = common::python();
    let o = Command::new(&py)
        .args(["-c", script])
        .arg(&file)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} (run scripts/setup.sh): {e}", py.display()));
    assert!(o.status.success(), "{}", common::stderr(&o));
    let (addr, hits) = serve(
        file,
        "/semiweaksupervision/model_files/semi_supervised_resnet50-08389792.pth",
        4,
    );
    let o = train_with(
        root.path(),
        &cache,
        Arch::Resnet50,
        "ssl:pth",
        &[(PTH, &addr)],
    );
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    assert_eq!(sidecar(root.path())["weights"]["spec"], "ssl:pth");
}

/// torchvision's file names carry the first digits of their SHA-256; a download that does
/// not start with them is refused, in one line.
#[test]
fn published_checksum_prefix_mismatch_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let cache = root.path().join("cache");
    let file = root.path().join("not-weights.pth");
    std::fs::write(&file, b"not the weights").unwrap();
    let (addr, hits) = serve(file, "/models/resnet101-63fe2227.pth", 4);
    let o = train_with(
        root.path(),
        &cache,
        Arch::Resnet101,
        "imagenet:pth",
        &[(PTH, &addr)],
    );
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    let line = common::error_line(&o);
    assert!(
        line.contains("/models/resnet101-63fe2227.pth has checksum")
            && line.contains("begins with 63fe2227")
            && line.contains("refusing"),
        "{line}"
    );
    assert!(cached_weights(&cache).is_empty());
}

#[test]
fn a_source_for_another_backbone_or_a_mistyped_name_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let cache = root.path().join("cache");
    let o = train_with(root.path(), &cache, Arch::Resnet34, "swsl", &[]);
    assert_eq!(
        common::error_line(&o),
        "error: --weights swsl exists only for --backbone resnet18, resnet50, resnext50_32x4d, \
         resnext101_32x8d, not resnet34"
    );
    let o = train_with(root.path(), &cache, Arch::Resnet18, "imagenett", &[]);
    let line = common::error_line(&o);
    assert!(
        line.contains(
            "imagenett: no such file, nor a known source (known: imagenet, coco, ssl, swsl"
        ),
        "{line}"
    );
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
    let addr = format!("http://127.0.0.1:{port}");
    let o = train_with(
        root.path(),
        &root.path().join("cache"),
        Arch::Resnet18,
        "imagenet",
        &[(HF, &addr)],
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
