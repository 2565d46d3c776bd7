//! Backbone weights: where they come from (a known public source by name, a local file, a URL,
//! or seeded random initialization), downloading them once into a cache with their checksums
//! checked, and loading them into the network by tensor name.
//!
//! Files: safetensors (read by libtorch), and PyTorch's `torch.save` files, both the zip format
//! (PyTorch >= 1.6) and the older pickle stream (torchvision's and Facebook's 2019 downloads),
//! read here by a small pickle reader that only rebuilds tensors and never runs code from the
//! file (libtorch itself cannot read a saved `OrderedDict`, which is what `state_dict()` is).

mod beside;
mod cache;
mod load;
mod pth;
mod sources;

use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};

pub use beside::{check_file, file_name, keep_beside, local_file, place_beside};
use cache::is_hex;
pub use cache::{cache_dir, checksum};
pub(crate) use load::is_safetensors;
pub use load::{load, load_file, read_file};
use sources::SOURCES;
pub use sources::{known_sources, resolve, Checksum, Host, KnownSource};

/// What `--weights` asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightsSpec {
    /// A known public source by name (`imagenet`, `ssl`, `swsl`; see [`known_sources`]): the
    /// safetensors republication, or with `pth` the original PyTorch file.
    Known { name: &'static str, pth: bool },
    /// torchvision-style initialization from a seed: for smoke tests and offline demos.
    Random(u64),
    /// A safetensors file or a PyTorch state dict saved by `torch.save`.
    File(PathBuf),
    /// A file to download (into the cache), optionally pinned by `#sha256=HEX`.
    Url { url: String, sha256: Option<String> },
    /// A self-contained model's own weights file (its sidecar's `weights_file`), never given
    /// on the command line: refused unless its SHA-256 is `sha256` (checked before it is
    /// read), and loaded without the cache: nothing is looked up, downloaded or written there
    /// (the BatchNorm probe is run rather than read from the cache).
    ModelFile { path: PathBuf, sha256: String },
}

impl WeightsSpec {
    /// The default: torchvision's ImageNet weights for the chosen backbone.
    pub const IMAGENET: WeightsSpec = WeightsSpec::Known {
        name: "imagenet",
        pth: false,
    };

    /// Whether loading these weights may use the cache (downloads, checksum memos, the
    /// BatchNorm probe's outcome): all but a self-contained model's own file.
    pub fn uses_cache(&self) -> bool {
        !matches!(self, WeightsSpec::ModelFile { .. })
    }

    pub fn parse(s: &str) -> Result<Self> {
        if let Some(seed) = s.strip_prefix("random:") {
            let seed = seed
                .parse()
                .map_err(|_| anyhow!("--weights random:SEED needs an integer seed, got '{s}'"))?;
            return Ok(WeightsSpec::Random(seed));
        }
        if s.starts_with("http://") || s.starts_with("https://") {
            let (url, sha256) = match s.split_once("#sha256=") {
                Some((u, h)) => {
                    let h = h.to_ascii_lowercase();
                    if !is_hex(&h, 64) {
                        bail!("--weights URL#sha256=HEX needs the 64 hex digits of a SHA-256, got '{h}'");
                    }
                    (u.to_string(), Some(h))
                }
                None => (s.to_string(), None),
            };
            return Ok(WeightsSpec::Url { url, sha256 });
        }
        let (name, form) = match s.split_once(':') {
            Some((n, f)) => (n, Some(f)),
            None => (s, None),
        };
        if let Some(known) = SOURCES.iter().find(|k| k.name == name) {
            return match form {
                None => Ok(WeightsSpec::Known {
                    name: known.name,
                    pth: false,
                }),
                Some("pth") => Ok(WeightsSpec::Known {
                    name: known.name,
                    pth: true,
                }),
                Some(other) => bail!(
                    "--weights {s}: unknown form '{other}' (use {name} for the safetensors file \
                     or {name}:pth for the original PyTorch file)"
                ),
            };
        }
        Ok(WeightsSpec::File(PathBuf::from(s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::backbone::Arch;
    use crate::util::fsutil::{blake3_file, sha256_file};
    use cache::{checksum_with_memos, stat_key, Expected};
    use load::{legacy_densenet_name, read_tensors};
    use std::io::Write;
    use tch::Tensor;

    #[test]
    fn parses_specs() {
        assert_eq!(
            WeightsSpec::parse("imagenet").unwrap(),
            WeightsSpec::IMAGENET
        );
        assert_eq!(
            WeightsSpec::parse("imagenet:pth").unwrap(),
            WeightsSpec::Known {
                name: "imagenet",
                pth: true
            }
        );
        assert_eq!(
            WeightsSpec::parse("swsl").unwrap(),
            WeightsSpec::Known {
                name: "swsl",
                pth: false
            }
        );
        let e = WeightsSpec::parse("ssl:onnx").unwrap_err().to_string();
        assert!(e.contains("ssl:pth"), "{e}");
        assert_eq!(
            WeightsSpec::parse("random:7").unwrap(),
            WeightsSpec::Random(7)
        );
        assert!(WeightsSpec::parse("random:x").is_err());
        let sha = "AB".repeat(32);
        assert_eq!(
            WeightsSpec::parse(&format!("http://h/f#sha256={sha}")).unwrap(),
            WeightsSpec::Url {
                url: "http://h/f".into(),
                sha256: Some(sha.to_ascii_lowercase())
            }
        );
        assert!(WeightsSpec::parse("http://h/f#sha256=ab").is_err());
        assert_eq!(
            WeightsSpec::parse("w.safetensors").unwrap(),
            WeightsSpec::File("w.safetensors".into())
        );
        assert_eq!(
            WeightsSpec::parse("C:\\w.pth").unwrap(),
            WeightsSpec::File("C:\\w.pth".into())
        );
    }

    #[test]
    fn every_arch_has_its_default_weights_as_name_and_as_pth() {
        for a in Arch::ALL {
            let name = a.default_weights();
            let k = resolve(name, true, a).unwrap();
            assert_eq!((k.arch, k.pth, k.host), (a, true, Host::PyTorch));
            // The safetensors form where there is one, else the .pth file.
            let k = resolve(name, false, a).unwrap();
            assert_eq!(k.arch, a);
            assert_eq!(
                k.pth,
                !SOURCES
                    .iter()
                    .any(|o| o.arch == a && !o.pth && o.name == name)
            );
        }
        let e = resolve("imagenet", false, Arch::Deeplabv3Resnet50)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("--weights imagenet exists only for --backbone resnet18"),
            "{e}"
        );
        let e = resolve("coco", true, Arch::Resnet50)
            .unwrap_err()
            .to_string();
        assert!(e.contains("deeplabv3_resnet50, deeplabv3_resnet101"), "{e}");
    }

    #[test]
    fn old_densenet_names_are_renamed() {
        let f = legacy_densenet_name;
        assert_eq!(
            f("features.denseblock1.denselayer1.norm.1.weight"),
            "features.denseblock1.denselayer1.norm1.weight"
        );
        assert_eq!(
            f("features.denseblock4.denselayer16.conv.2.weight"),
            "features.denseblock4.denselayer16.conv2.weight"
        );
        assert_eq!(
            f("features.denseblock2.denselayer3.norm.2.running_var"),
            "features.denseblock2.denselayer3.norm2.running_var"
        );
        for same in [
            "features.denseblock1.denselayer1.norm1.weight",
            "features.transition1.norm.weight",
            "features.denseblock1.denselayer1.norm.1.num_batches_tracked",
            "layer1.0.conv1.weight",
            "features.10.weight",
        ] {
            assert_eq!(f(same), same);
        }
    }

    #[test]
    fn the_table_is_consistent() {
        let mut seen = std::collections::HashSet::new();
        for k in SOURCES {
            assert!(seen.insert((k.name, k.pth, k.arch.name())), "{k:?} twice");
            assert_eq!(
                SOURCES.iter().filter(|o| o.path == k.path).count(),
                1,
                "{k:?}"
            );
            assert_eq!(
                SOURCES
                    .iter()
                    .filter(|o| o.cache_name == k.cache_name)
                    .count(),
                1,
                "{k:?}"
            );
            assert!(
                k.path.starts_with('/')
                    && k.path.ends_with(k.cache_name.rsplit('.').next().unwrap())
            );
            assert_eq!(k.pth, k.path.ends_with(".pth"), "{k:?}");
            assert_eq!(k.pth, k.host != Host::HuggingFace, "{k:?}");
            match k.checksum {
                Checksum::Sha256(h) => assert!(is_hex(h, 64), "{k:?}"),
                Checksum::Sha256Prefix(p) => assert!(is_hex(p, 8), "{k:?}"),
                Checksum::Unpublished => {}
            }
            // torchvision's file names carry the first digits of the SHA-256: a full checksum
            // found elsewhere must agree with them.
            if k.host == Host::PyTorch {
                let digits = k
                    .cache_name
                    .trim_end_matches(".pth")
                    .rsplit('-')
                    .next()
                    .unwrap();
                assert!(is_hex(digits, 8), "{k:?}");
                match k.checksum {
                    Checksum::Sha256(h) => assert!(h.starts_with(digits), "{k:?}"),
                    Checksum::Sha256Prefix(p) => assert_eq!(p, digits, "{k:?}"),
                    Checksum::Unpublished => panic!("{k:?}: its name carries a checksum"),
                }
            }
            assert!(k.default_url().starts_with("https://"), "{k:?}");
        }
        // Every safetensors form has its original .pth file.
        for k in SOURCES.iter().filter(|k| !k.pth) {
            assert!(
                SOURCES
                    .iter()
                    .any(|o| o.name == k.name && o.arch == k.arch && o.pth != k.pth),
                "{k:?}"
            );
        }
    }

    #[test]
    fn a_source_for_another_backbone_is_refused_naming_its_backbones() {
        let e = resolve("ssl", false, Arch::WideResnet50_2)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "--weights ssl exists only for --backbone resnet18, resnet50, resnext50_32x4d, \
             resnext101_32x8d, not wide_resnet50_2"
        );
        let e = resolve("swsl", true, Arch::Resnet34)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--weights swsl:pth exists only"), "{e}");
        assert_eq!(
            resolve("ssl", true, Arch::Resnet50).unwrap().host,
            Host::FacebookAi
        );
    }

    #[test]
    fn checksums_are_checked_in_full_or_by_prefix() {
        let h = "0676ba61b6795bbe1773cffd859882e5e297624d384b6993f7c9e683e722fb8a";
        assert_eq!(Expected::Full(h).mismatch(h), None);
        assert_eq!(Expected::Prefix("0676ba61").mismatch(h), None);
        assert_eq!(Expected::Nothing.mismatch(h), None);
        assert!(Expected::Full(&"0".repeat(64)).mismatch(h).is_some());
        let why = Expected::Prefix("63fe2227").mismatch(h).unwrap();
        assert!(why.contains("63fe2227"), "{why}");
    }

    /// A pickle string (BINUNICODE).
    fn s(f: &mut Vec<u8>, v: &str) {
        f.push(b'X');
        f.extend((v.len() as u32).to_le_bytes());
        f.extend(v.as_bytes());
    }

    /// A file as torch.save wrote them before PyTorch 1.6, by hand: an OrderedDict with two
    /// 2x2 tensors on one storage, the second a transposed view.
    fn legacy_file() -> Vec<u8> {
        let mut f = legacy_header();
        f.extend(state_dict_pickle());
        f.extend([0x80, 2, b']']);
        s(&mut f, "140000");
        f.extend([b'a', b'.']);
        f.extend(4u64.to_le_bytes());
        f.extend(storage());
        f
    }

    /// The elements of the one storage of [`state_dict_pickle`].
    fn storage() -> Vec<u8> {
        [1f32, 2., 3., 4.]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect()
    }

    /// The saved object: an OrderedDict of two tensors on storage "140000".
    fn state_dict_pickle() -> Vec<u8> {
        let mut f = vec![0x80, 2];
        f.extend(b"ccollections\nOrderedDict\nq\x00)R");
        for (name, stride) in [("w", [2u8, 1]), ("w_t", [1, 2])] {
            s(&mut f, name);
            f.extend(b"ctorch._utils\n_rebuild_tensor_v2\n((");
            s(&mut f, "storage");
            f.extend(b"ctorch\nFloatStorage\n");
            s(&mut f, "140000");
            s(&mut f, "cpu");
            f.extend([b'K', 4, b'N', b't', b'Q', b'K', 0]);
            f.extend([
                b'K', 2, b'K', 2, 0x86, b'K', stride[0], b'K', stride[1], 0x86,
            ]);
            f.extend([0x89, b'h', 0, b')', b'R', b't', b'R', b's']);
        }
        f.extend([b'N', b'b', b'.']);
        f
    }

    /// The pickles before the saved object: magic number, protocol version, system info.
    fn legacy_header() -> Vec<u8> {
        let mut f = vec![0x80, 2, 0x8a, 10];
        f.extend([
            0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, b'.',
        ]);
        f.extend([0x80, 2, b'M']);
        f.extend(1001u16.to_le_bytes());
        f.push(b'.');
        f.extend([0x80, 2, b'}']);
        s(&mut f, "little_endian");
        f.extend([0x88, b's', b'.']);
        f
    }

    #[test]
    fn reads_a_pre_1_6_torch_save_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("legacy.pth");
        std::fs::write(&path, legacy_file()).unwrap();
        let t = read_file(&path).unwrap();
        let names: Vec<&str> = t.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["w", "w_t"]);
        let values = |x: &Tensor| Vec::<f32>::try_from(x.flatten(0, -1)).unwrap();
        assert_eq!(t[0].1.size(), [2, 2]);
        assert_eq!(values(&t[0].1), [1., 2., 3., 4.]);
        assert_eq!(values(&t[1].1), [1., 3., 2., 4.]);
        // Only the wanted tensors are made.
        let only = read_tensors(&path, &|n| n == "w_t").unwrap();
        assert_eq!(only.len(), 1);
        assert_eq!(
            (only[0].0.as_str(), values(&only[0].1)),
            ("w_t", vec![1., 3., 2., 4.])
        );
        // Cut short anywhere, it is an error, not a crash.
        let full = legacy_file();
        for cut in [3, 20, 60, 150, full.len() - 3] {
            std::fs::write(&path, &full[..cut]).unwrap();
            assert!(read_file(&path).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn safetensors_files_give_only_the_wanted_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let a = Tensor::from_slice(&[1f32, 2., 3., 4.]).reshape([2, 2]);
        let b = Tensor::from_slice(&[5f32, 6.]);
        Tensor::write_safetensors(&[("a", &a), ("b", &b)], &path).unwrap();
        let mut all: Vec<String> = read_file(&path).unwrap().into_iter().map(|t| t.0).collect();
        all.sort();
        assert_eq!(all, ["a", "b"]);
        let only = read_tensors(&path, &|n| n == "a").unwrap();
        assert_eq!(only.len(), 1);
        assert_eq!(only[0].0, "a");
        assert!(only[0].1.equal(&a));
        // Cut short, it is an error naming the file.
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let e = format!("{:#}", read_file(&path).unwrap_err());
        assert!(e.contains("w.safetensors"), "{e}");
    }

    #[test]
    fn checksums_are_sha256_worked_out_once_per_content() {
        let dir = tempfile::tempdir().unwrap();
        let (file, memos) = (dir.path().join("w.bin"), dir.path().join("memos"));
        std::fs::write(&file, "abc").unwrap();
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(checksum_with_memos(&file, &memos).unwrap(), abc);
        // Kept under the content's BLAKE3, and what is kept is what later calls return.
        let memo = memos.join(blake3_file(&file).unwrap());
        assert_eq!(std::fs::read_to_string(&memo).unwrap().trim(), abc);
        // An unchanged file is known by its identity alone.
        let by_stat = memos.join("stat").join(stat_key(&file).unwrap());
        assert_eq!(std::fs::read_to_string(&by_stat).unwrap().trim(), abc);
        let planted = "0".repeat(64);
        std::fs::write(&by_stat, &planted).unwrap();
        assert_eq!(checksum_with_memos(&file, &memos).unwrap(), planted);
        std::fs::remove_file(&by_stat).unwrap();
        std::fs::write(&memo, &planted).unwrap();
        assert_eq!(checksum_with_memos(&file, &memos).unwrap(), planted);
        // Other content, its own SHA-256; an unreadable memo is worked out again.
        std::fs::write(&file, "abd").unwrap();
        let abd = sha256_file(&file).unwrap();
        assert_eq!(checksum_with_memos(&file, &memos).unwrap(), abd);
        std::fs::write(memos.join(blake3_file(&file).unwrap()), "junk").unwrap();
        std::fs::remove_dir_all(memos.join("stat")).unwrap();
        assert_eq!(checksum_with_memos(&file, &memos).unwrap(), abd);
        // No writable place for memos: still the right answer.
        let nowhere = file.join("not-a-folder");
        assert_eq!(checksum_with_memos(&file, &nowhere).unwrap(), abd);
    }

    /// A zip archive of stored entries, as torch.save writes them.
    fn zip_file(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let stored = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        for (name, data) in entries {
            w.start_file(*name, stored).unwrap();
            w.write_all(data).unwrap();
        }
        w.finish().unwrap().into_inner()
    }

    #[test]
    fn reads_a_zip_torch_save_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("zip.pth");
        let file = zip_file(&[
            ("archive/data.pkl", &state_dict_pickle()),
            ("archive/byteorder", b"little"),
            ("archive/data/140000", &storage()),
            ("archive/version", b"3\n"),
        ]);
        std::fs::write(&path, &file).unwrap();
        let t = read_file(&path).unwrap();
        let names: Vec<&str> = t.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["w", "w_t"]);
        let values = |x: &Tensor| Vec::<f32>::try_from(x.flatten(0, -1)).unwrap();
        assert_eq!(values(&t[0].1), [1., 2., 3., 4.]);
        assert_eq!(values(&t[1].1), [1., 3., 2., 4.]);
        let only = read_tensors(&path, &|n| n == "w").unwrap();
        assert_eq!(only.len(), 1);
        assert_eq!(
            (only[0].0.as_str(), values(&only[0].1)),
            ("w", vec![1., 2., 3., 4.])
        );
        for cut in [10, file.len() / 2, file.len() - 5] {
            std::fs::write(&path, &file[..cut]).unwrap();
            assert!(read_file(&path).is_err(), "cut at {cut}");
        }
        // A compressed entry (method 8, deflate, in its local and central headers).
        let mut deflated = file.clone();
        for (sig, at) in [(b"PK\x03\x04", 8), (b"PK\x01\x02", 10)] {
            let h = deflated.windows(4).position(|w| w == sig).unwrap();
            deflated[h + at] = 8;
        }
        std::fs::write(&path, &deflated).unwrap();
        let e = format!("{:#}", read_file(&path).unwrap_err());
        assert!(e.contains("archive/data.pkl is compressed"), "{e}");
        // Without data.pkl: not ours to read (perhaps libtorch's own format).
        let other = zip_file(&[("archive/constants.pkl", b"")]);
        assert!(pth::read_zip(&other, &|_| true).unwrap().is_none());
        // Big-endian data is refused rather than misread.
        let big = zip_file(&[
            ("archive/data.pkl", &state_dict_pickle()),
            ("archive/byteorder", b"big"),
        ]);
        let e = pth::read_zip(&big, &|_| true).unwrap_err().to_string();
        assert!(e.contains("big-endian"), "{e}");
    }

    #[test]
    fn functions_named_in_a_pickle_are_never_called() {
        // A saved object that is a call of os.system("touch FILE").
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ran");
        let mut f = legacy_header();
        f.extend([0x80, 2]);
        f.extend(b"cos\nsystem\n(");
        s(&mut f, &format!("touch {}", marker.display()));
        f.extend(b"tR.");
        f.extend([0x80, 2, b']', b'.']);
        let path = dir.path().join("evil.pth");
        std::fs::write(&path, &f).unwrap();
        let e = format!("{:#}", read_file(&path).unwrap_err());
        assert!(e.contains("made by os.system, not a state dict"), "{e}");
        assert!(!marker.exists());
    }
}
