//! Self-contained model folders: `patchcore export` and `train --self-contained`. An exported
//! folder, moved elsewhere with the original weights gone, is scored by predict, serve and
//! calibrate with no cache, no home and no network (proxies at a closed loopback port), exactly
//! as the original model; a damaged weights file is refused naming it; a non-empty target is
//! refused untouched; ensembles share their weights file; merge keeps a model self-contained.
//! Small resnet18s (a seeded weights file made here) on 64-pixel images.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{assert_fails_naming, json, s, stderr, write_images};
use patchcore::util::fsutil::sha256_file;
use patchcore::util::synthetic::Defect;

/// resnet18 weights up to layer3 with seeded values, as safetensors: ROOT/weights/NAME
/// (whatever NAME's extension).
fn make_weights(root: &Path, name: &str) -> PathBuf {
    let dir = root.join("weights");
    std::fs::create_dir_all(&dir).unwrap();
    let made = dir.join("made.safetensors");
    common::resnet18_weights(&made, 3);
    let file = dir.join(name);
    std::fs::rename(&made, &file).unwrap();
    file
}

/// 12 good training images (ROOT/train) and test images (ROOT/test: 2 good, 2 scratched).
fn write_data(root: &Path) {
    write_images(&root.join("train"), 12, 0, (64, 64), Defect::None);
    common::write_test_images(root, (64, 64), 2, 2, 0);
}

/// Trains ROOT/model/index.faiss on ROOT/train with `--weights weights` and `extra`, 4 of
/// the 12 images held out to calibrate.
fn train(root: &Path, weights: &str, extra: &[&str]) -> PathBuf {
    let index = root.join("model/index.faiss");
    let args = [
        &["--weights", weights, "--resize", "64"][..],
        &["--calibration-ratio", "0.3", "-q"],
        extra,
    ]
    .concat();
    common::train_ok(&root.join("train"), &index, &args);
    index
}

/// `["--backbone", "resnet18"]` and the like.
const RESNET18: &[&str] = &["--backbone", "resnet18"];

/// A command's output, which must be a success.
fn ok(cmd: &mut Command) -> Output {
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "{:?}: {}", cmd, stderr(&o));
    o
}

/// `patchcore predict -q` of ROOT/test with `index` into `out`.
fn predict(root: &Path, index: &Path, out: &Path) -> Command {
    let mut c = common::bin();
    c.args(["predict", "-q", "-i", s(&root.join("test")), "-o", s(out)])
        .args(["--index", s(index)]);
    c
}

/// `patchcore export --index INDEX -o DIR` (and `extra`).
fn export(index: &Path, dir: &Path, extra: &[&str]) -> Output {
    common::run(&[&["export", "--index", s(index), "-o", s(dir)], extra].concat())
}

/// A machine without cache, home or network: the cache and HOME are empty folders, and
/// every proxy variable points at a loopback port nothing listens on.
struct Offline {
    dir: tempfile::TempDir,
    proxy: String,
}

impl Offline {
    fn new() -> Offline {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("cache")).unwrap();
        std::fs::create_dir(dir.path().join("home")).unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let proxy = format!("http://127.0.0.1:{port}");
        Offline { dir, proxy }
    }

    /// `cmd`, run on this machine.
    fn apply<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        for var in [
            "http_proxy",
            "https_proxy",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
        ] {
            cmd.env(var, &self.proxy);
        }
        for var in ["no_proxy", "NO_PROXY", "XDG_CACHE_HOME"] {
            cmd.env_remove(var);
        }
        for var in [
            "PATCHCORE_WEIGHTS_BASE_URL",
            "PATCHCORE_WEIGHTS_PTH_BASE_URL",
        ] {
            cmd.env(var, &self.proxy);
        }
        cmd.env("PATCHCORE_CACHE", self.dir.path().join("cache"))
            .env("HOME", self.dir.path().join("home"))
    }

    /// Asserts that nothing was written to the cache or the home folder.
    fn assert_untouched(&self) {
        for sub in ["cache", "home"] {
            let left: Vec<_> = std::fs::read_dir(self.dir.path().join(sub))
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            assert!(left.is_empty(), "{sub} was written to: {left:?}");
        }
    }
}

/// The folder's files, sorted.
fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Moves the folder `from` to `to` (a new path elsewhere).
fn move_folder(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::rename(from, to).unwrap();
    assert!(!from.exists());
}

/// `resnet18-SHA8.safetensors` for the weights file `file`.
fn weights_name(file: &Path) -> String {
    format!("resnet18-{}.safetensors", &sha256_file(file).unwrap()[..8])
}

#[test]
fn exported_model_predicts_the_same_from_anywhere_offline() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    write_data(root);
    let weights = make_weights(root, "w.safetensors");
    // Kept private where it was (as a cache may keep it): the copy must still be readable by
    // whoever runs the model, with the permissions of any new file.
    std::fs::set_permissions(&weights, std::fs::Permissions::from_mode(0o600)).unwrap();
    let index = train(root, s(&weights), RESNET18);
    ok(&mut predict(root, &index, &root.join("original")));

    let dir = root.join("export");
    let o = export(&index, &dir, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let name = weights_name(&weights);
    let fresh = root.join("fresh-file");
    std::fs::write(&fresh, b"").unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode(&dir.join(&name)),
        mode(&fresh),
        "exported weights' permissions"
    );
    let mut want = vec![
        "index.faiss".to_string(),
        "index.faiss.calibration.svg".into(),
        "index.faiss.json".into(),
        name.clone(),
    ];
    want.sort();
    assert_eq!(files(&dir), want);
    let summary = stderr(&o);
    assert!(
        summary.contains(s(&dir)) && summary.contains("4 files") && summary.contains(" MB"),
        "{summary}"
    );
    let side = json(&dir.join("index.faiss.json"));
    assert_eq!(side["weights_file"], name.as_str());
    assert_eq!(
        side["weights"],
        json(&root.join("model/index.faiss.json"))["weights"]
    );
    assert!(json(&index.with_extension("faiss.json"))
        .get("weights_file")
        .is_none());

    // The original weights gone, the folder elsewhere, no cache, no home, no network.
    std::fs::rename(&weights, root.join("weights/gone")).unwrap();
    let line_pc = tempfile::tempdir().unwrap();
    let moved = line_pc.path().join("models/screw");
    move_folder(&dir, &moved);
    let offline = Offline::new();
    let out = root.join("exported");
    ok(offline.apply(&mut predict(root, &moved.join("index.faiss"), &out)));
    common::assert_same_outputs(&out, &root.join("original"), 1e-5, "exported");
    offline.assert_untouched();

    // The original model itself no longer loads: its weights are gone.
    let o = predict(root, &index, &root.join("p")).output().unwrap();
    assert_fails_naming(&o, &["w.safetensors", "no longer exist"]);

    // Exported again (an exported model exports as well), from the line PC.
    let again = line_pc.path().join("again");
    let o = offline
        .apply(&mut common::bin())
        .args(["export", "-q", "--index", s(&moved.join("index.faiss"))])
        .args(["-o", s(&again)])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(files(&again), want);
    assert_eq!(
        json(&again.join("index.faiss.json"))["weights_file"],
        name.as_str()
    );
}

#[test]
fn damaged_or_missing_weights_in_an_export_are_refused_naming_the_file() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    write_data(root);
    let weights = make_weights(root, "w.safetensors");
    let index = train(root, s(&weights), RESNET18);
    let dir = root.join("export");
    assert!(export(&index, &dir, &["-q"]).status.success());
    let file = dir.join(weights_name(&weights));
    let offline = Offline::new();

    // One byte changed in a tensor.
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 0x40;
    std::fs::write(&file, &bytes).unwrap();
    let exported = dir.join("index.faiss");
    let o = offline
        .apply(&mut predict(root, &exported, &root.join("p")))
        .output()
        .unwrap();
    assert_fails_naming(&o, &[s(&file), "damaged"]);
    // Calibrate and serve refuse it the same way.
    let o = offline
        .apply(&mut common::bin())
        .args(["calibrate", "-q", "-i", s(&root.join("train"))])
        .args(["--index", s(&exported)])
        .output()
        .unwrap();
    assert_fails_naming(&o, &[s(&file), "damaged"]);

    // Missing.
    std::fs::remove_file(&file).unwrap();
    let o = offline
        .apply(&mut predict(root, &exported, &root.join("p")))
        .output()
        .unwrap();
    assert_fails_naming(&o, &[s(&file), "does not exist"]);
    offline.assert_untouched();
}

#[test]
fn export_refuses_a_non_empty_folder_and_leaves_nothing_on_failure() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    write_data(root);
    let weights = make_weights(root, "w.safetensors");
    let index = train(root, s(&weights), RESNET18);

    let dir = root.join("taken");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("notes.txt"), "keep me").unwrap();
    let o = export(&index, &dir, &["-q"]);
    assert_fails_naming(&o, &[s(&dir), "not empty"]);
    assert_eq!(files(&dir), ["notes.txt"]);
    assert_eq!(
        std::fs::read_to_string(dir.join("notes.txt")).unwrap(),
        "keep me"
    );

    // A model that does not load (its weights gone) is refused before anything is written.
    std::fs::rename(&weights, root.join("weights/gone")).unwrap();
    let fresh = root.join("fresh");
    let o = export(&index, &fresh, &["-q"]);
    assert_fails_naming(&o, &["w.safetensors"]);
    assert!(!fresh.exists());
    // --weights says where they are now (checked by checksum); an empty folder is fine.
    std::fs::create_dir(&fresh).unwrap();
    let o = export(
        &index,
        &fresh,
        &["-q", "--weights", s(&root.join("weights/gone"))],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(fresh
        .join(weights_name(&root.join("weights/gone")))
        .is_file());
    // No temporary folder is left beside the exports.
    let hidden: Vec<String> = files(root)
        .into_iter()
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(hidden.is_empty(), "{hidden:?}");
}

#[test]
fn exported_ensemble_shares_its_weights_file_and_loads_the_same_offline() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    write_data(root);
    let weights = make_weights(root, "w.safetensors");
    let both = ["--backbone", "resnet18", "--backbone", "resnet18:layer2"];
    let index = train(root, s(&weights), &both);
    ok(&mut predict(root, &index, &root.join("original")));

    let dir = root.join("export");
    assert!(export(&index, &dir, &["-q"]).status.success());
    let name = weights_name(&weights);
    let mut want: Vec<String> = ["index.faiss.json".to_string(), name.clone()].into();
    for member in ["index.0-resnet18.faiss", "index.1-resnet18.faiss"] {
        for suffix in ["", ".json", ".calibration.svg"] {
            want.push(format!("{member}{suffix}"));
        }
        let side = json(&dir.join(format!("{member}.json")));
        assert_eq!(side["weights_file"], name.as_str(), "{member}");
    }
    want.sort();
    assert_eq!(files(&dir), want, "one weights file for both members");

    std::fs::remove_file(&weights).unwrap();
    let line_pc = tempfile::tempdir().unwrap();
    let moved = line_pc.path().join("ensemble");
    move_folder(&dir, &moved);
    let offline = Offline::new();
    let out = root.join("exported");
    ok(offline.apply(&mut predict(root, &moved.join("index.faiss"), &out)));
    common::assert_same_outputs(&out, &root.join("original"), 1e-5, "ensemble");

    // serve and calibrate load it too; calibrate keeps every member self-contained.
    let exported = moved.join("index.faiss");
    assert_serves_as_predicted(&offline, &exported, root, &root.join("original"));
    ok(offline
        .apply(&mut common::bin())
        .args(["calibrate", "-q", "-i", s(&root.join("train"))])
        .args(["--index", s(&exported)]));
    for member in ["index.0-resnet18.faiss", "index.1-resnet18.faiss"] {
        let side = json(&moved.join(format!("{member}.json")));
        assert_eq!(side["calibration"]["images"], 12, "{member}");
        assert_eq!(side["weights_file"], name.as_str(), "{member}");
    }
    offline.assert_untouched();
}

#[test]
fn train_self_contained_loads_after_being_moved_and_merge_keeps_it_so() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    write_data(root);
    // No extension: the copy's is the format's.
    let weights = make_weights(root, "w.bin");
    let index = train(
        root,
        s(&weights),
        &[RESNET18, &["--self-contained"]].concat(),
    );
    let name = weights_name(&weights);
    let model = root.join("model");
    assert_eq!(
        json(&model.join("index.faiss.json"))["weights_file"],
        name.as_str()
    );
    assert_eq!(
        sha256_file(&model.join(&name)).unwrap(),
        sha256_file(&weights).unwrap()
    );
    ok(&mut predict(root, &index, &root.join("original")));

    // A partial model of the same images, merged elsewhere: self-contained too.
    let part = root.join("part/part.faiss");
    let args = [RESNET18, &["--weights", s(&weights), "--resize", "64"]].concat();
    let args = [
        &args[..],
        &["--calibration-ratio", "0.3", "-q", "--partial"],
    ]
    .concat();
    common::train_ok(
        &root.join("train"),
        &part,
        &[&args[..], &["--self-contained"]].concat(),
    );
    let merged = root.join("merged/index.faiss");
    ok(common::bin().args(["merge", "-q", "-o", s(&merged), s(&part)]));
    assert_eq!(
        json(&root.join("merged/index.faiss.json"))["weights_file"],
        name.as_str()
    );
    assert!(root.join("merged").join(&name).is_file());

    std::fs::remove_file(&weights).unwrap();
    let line_pc = tempfile::tempdir().unwrap();
    let offline = Offline::new();
    for (folder, out) in [(model, "moved"), (root.join("merged"), "merged-out")] {
        let moved = line_pc.path().join(out);
        move_folder(&folder, &moved);
        let out = root.join(out);
        ok(offline.apply(&mut predict(root, &moved.join("index.faiss"), &out)));
        common::assert_same_outputs(&out, &root.join("original"), 1e-5, s(&moved));
    }
    offline.assert_untouched();

    // Random weights need no file: nothing copied, no weights_file.
    let random = root.join("random/index.faiss");
    let args = [RESNET18, &["--weights", "random:0", "--resize", "64", "-q"]].concat();
    common::train_ok(
        &root.join("train"),
        &random,
        &[&args[..], &["--self-contained"]].concat(),
    );
    assert!(json(&root.join("random/index.faiss.json"))
        .get("weights_file")
        .is_none());
    let kept = files(&root.join("random"));
    assert!(
        !kept
            .iter()
            .any(|n| n.ends_with(".safetensors") || n.ends_with(".pth")),
        "{kept:?}"
    );
}

#[test]
fn calibrate_and_serve_use_an_exported_model_offline_and_keep_it_self_contained() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    write_data(root);
    let weights = make_weights(root, "w.safetensors");
    let index = train(root, s(&weights), RESNET18);
    ok(&mut predict(root, &index, &root.join("original")));
    let dir = root.join("export");
    assert!(export(&index, &dir, &["-q"]).status.success());
    std::fs::remove_file(&weights).unwrap();
    let line_pc = tempfile::tempdir().unwrap();
    let moved = line_pc.path().join("model");
    move_folder(&dir, &moved);
    let exported = moved.join("index.faiss");
    let offline = Offline::new();

    assert_serves_as_predicted(&offline, &exported, root, &root.join("original"));

    // calibrate rewrites the sidecar and keeps weights_file.
    let before = json(&moved.join("index.faiss.json"));
    ok(offline
        .apply(&mut common::bin())
        .args(["calibrate", "-q", "-i", s(&root.join("train"))])
        .args(["--index", s(&exported)]));
    let after = json(&moved.join("index.faiss.json"));
    assert_eq!(after["calibration"]["images"], 12);
    assert_ne!(after["calibration"], before["calibration"]);
    assert_eq!(after["weights_file"], before["weights_file"]);
    ok(offline.apply(&mut predict(root, &exported, &root.join("after"))));
    offline.assert_untouched();
}

/// Asserts that `patchcore serve` (run `offline`) with `index` answers the score that predict
/// wrote into `predicted` for the image ROOT/test/scratch/000.png.
fn assert_serves_as_predicted(offline: &Offline, index: &Path, root: &Path, predicted: &Path) {
    let got = serve_score(offline, index, &root.join("test/scratch/000.png"));
    let want = common::predict_outputs(predicted);
    let (_, want, _) = want
        .iter()
        .find(|(n, _, _)| n.ends_with("scratch/000.png"))
        .unwrap();
    assert!((got - want).abs() <= 1e-5 * want.abs(), "{got} vs {want}");
}

/// The image score `patchcore serve` (run `offline`) answers for `image` with `index`.
fn serve_score(offline: &Offline, index: &Path, image: &Path) -> f32 {
    let mut child = offline
        .apply(&mut common::bin())
        .args(["serve", "--index", s(index), "--listen", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let address = lines.map_while(Result::ok).find_map(|line| {
        seen.push(line.clone());
        let rest = line.split("on http://").nth(1)?;
        Some(rest.split_whitespace().next()?.to_string())
    });
    let Some(address) = address else {
        let _ = child.kill();
        panic!("serve did not start: {seen:?}");
    };
    let body = std::fs::read(image).unwrap();
    let score = post(&address, &body);
    let _ = child.kill();
    let _ = child.wait();
    score
}

/// `POST /predict` of `body` to `address` over a plain socket; the answer's score.
fn post(address: &str, body: &[u8]) -> f32 {
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    write!(
        stream,
        "POST /predict HTTP/1.1\r\nHost: {address}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    stream.write_all(body).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, json) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{answer}");
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    v["score"].as_f64().unwrap() as f32
}

/// Serves `file` at `path` over loopback (anything else: 404); counts the hits.
fn serve_file(file: PathBuf, path: &'static str) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&hits);
    std::thread::spawn(move || {
        for mut stream in listener.incoming().map_while(Result::ok) {
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let (mut line, mut header) = (String::new(), String::new());
            reader.read_line(&mut line).unwrap();
            while reader.read_line(&mut header).unwrap() > 2 {
                header.clear();
            }
            if line.split_whitespace().nth(1) != Some(path) {
                let _ = stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
                continue;
            }
            counter.fetch_add(1, Ordering::SeqCst);
            let body = std::fs::read(&file).unwrap();
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body);
        }
    });
    (addr, hits)
}

/// A model of a known source (`--weights ssl`, served here): export, with a cache that does
/// not hold the weights yet, downloads them once; the folder then needs no network.
#[test]
fn export_downloads_a_known_source_not_yet_cached() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    write_data(root);
    let weights = make_weights(root, "ssl.safetensors");
    let path = "/timm/resnet18.fb_ssl_yfcc100m_ft_in1k/resolve/main/model.safetensors";
    let (addr, hits) = serve_file(weights.clone(), path);
    let base = "PATCHCORE_WEIGHTS_BASE_URL";
    let (trained, fresh) = (root.join("cache-train"), root.join("cache-export"));
    let index = root.join("model/index.faiss");
    let train = [RESNET18, &["--weights", "ssl", "--resize", "64", "-q"]].concat();
    ok(common::bin()
        .env("PATCHCORE_CACHE", &trained)
        .env(base, &addr)
        .args(
            [
                &["train", "-i", s(&root.join("train")), "-o", s(&index)][..],
                &train,
            ]
            .concat(),
        ));
    ok(predict(root, &index, &root.join("original"))
        .env("PATCHCORE_CACHE", &trained)
        .env(base, &addr));
    assert_eq!(hits.load(Ordering::SeqCst), 1);

    let dir = root.join("export");
    ok(common::bin()
        .env("PATCHCORE_CACHE", &fresh)
        .env(base, &addr)
        .args(["export", "-q", "--index", s(&index), "-o", s(&dir)]));
    assert_eq!(hits.load(Ordering::SeqCst), 2, "downloaded by export");
    let side = json(&dir.join("index.faiss.json"));
    assert_eq!(side["weights"]["spec"], "ssl");
    assert_eq!(side["weights_file"], weights_name(&weights).as_str());

    let offline = Offline::new();
    let out = root.join("exported");
    ok(offline.apply(&mut predict(root, &dir.join("index.faiss"), &out)));
    common::assert_same_outputs(&out, &root.join("original"), 1e-5, "ssl");
    offline.assert_untouched();
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}
