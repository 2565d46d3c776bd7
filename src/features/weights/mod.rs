//! Backbone weights: where they come from (a known public source by name, a local file, a URL,
//! or seeded random initialization), downloading them once into a cache with their checksums
//! checked, and loading them into the network by tensor name.
//!
//! Files: safetensors (read by libtorch), and PyTorch's `torch.save` files, both the zip format
//! (PyTorch >= 1.6) and the older pickle stream (torchvision's and Facebook's 2019 downloads),
//! read here by a small pickle reader that only rebuilds tensors and never runs code from the
//! file (libtorch itself cannot read a saved `OrderedDict`, which is what `state_dict()` is).

mod beside;
mod pth;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};
use tch::{nn::VarStore, Kind, Tensor};

use crate::features::backbone::Arch;
use crate::util::fsutil::blake3_file;
use crate::util::fsutil::AtomicFile;
pub use crate::util::fsutil::{hex, sha256_file};
pub use crate::util::records::WeightsInfo;
pub use beside::{check_file, file_name, keep_beside, local_file, place_beside};

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

/// Where a known source is served from. Each host's base URL can be replaced (a mirror, or a
/// local server in the tests) by an environment variable; the paths stay the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    /// The Hugging Face hub (the timm project's safetensors republications).
    HuggingFace,
    /// download.pytorch.org (torchvision's own files).
    PyTorch,
    /// dl.fbaipublicfiles.com (Facebook AI's files).
    FacebookAi,
}

impl Host {
    pub fn default_base(self) -> &'static str {
        match self {
            Host::HuggingFace => "https://huggingface.co",
            Host::PyTorch => "https://download.pytorch.org",
            Host::FacebookAi => "https://dl.fbaipublicfiles.com",
        }
    }

    /// The environment variable that replaces [`Host::default_base`].
    pub fn env_var(self) -> &'static str {
        match self {
            Host::HuggingFace => "PATCHCORE_WEIGHTS_BASE_URL",
            Host::PyTorch | Host::FacebookAi => "PATCHCORE_WEIGHTS_PTH_BASE_URL",
        }
    }

    fn base(self) -> String {
        std::env::var(self.env_var()).unwrap_or_else(|_| self.default_base().to_string())
    }
}

/// What is known of a source file's checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checksum {
    /// Its full SHA-256, published: the download must match it.
    Sha256(&'static str),
    /// The first hex digits of its SHA-256, as torch.hub file names carry them
    /// (`NAME-<prefix>.pth`, checked by `torch.hub.download_url_to_file`): the download must
    /// start with them, and the full checksum of the first download is recorded and checked on
    /// every later use.
    Sha256Prefix(&'static str),
    /// None published: the first download's SHA-256 is recorded beside the cached file and
    /// checked on every later use (trust on first use).
    Unpublished,
}

impl Checksum {
    fn expected(self) -> Expected<'static> {
        match self {
            Checksum::Sha256(h) => Expected::Full(h),
            Checksum::Sha256Prefix(p) => Expected::Prefix(p),
            Checksum::Unpublished => Expected::Nothing,
        }
    }
}

/// A public weights file known by name, downloaded through the same cache and checks as any
/// URL.
#[derive(Debug, Clone, Copy)]
pub struct KnownSource {
    /// The `--weights` name: `imagenet`, `ssl` or `swsl`.
    pub name: &'static str,
    /// The original PyTorch file (`--weights NAME:pth`) rather than the safetensors one.
    pub pth: bool,
    pub arch: Arch,
    /// What the weights are, for messages and listings.
    pub label: &'static str,
    pub host: Host,
    /// Path under the host's base URL.
    pub path: &'static str,
    /// File name in the cache folder.
    pub cache_name: &'static str,
    pub checksum: Checksum,
    /// The weights' licence, as their publishers state it (SPDX identifier).
    pub licence: &'static str,
}

impl KnownSource {
    /// The `--weights` value that selects this source (with `--backbone` its arch).
    pub fn spec(&self) -> String {
        if self.pth {
            format!("{}:pth", self.name)
        } else {
            self.name.to_string()
        }
    }

    /// The URL it is downloaded from, after the host's environment override.
    pub fn url(&self) -> String {
        format!("{}{}", self.host.base().trim_end_matches('/'), self.path)
    }

    /// The URL without any override.
    pub fn default_url(&self) -> String {
        format!("{}{}", self.host.default_base(), self.path)
    }
}

/// Every known source: for each architecture, torchvision's ImageNet weights (for DeepLabV3,
/// its COCO weights); for ResNet-18, ResNet-50 and the two ResNeXts, also Facebook's
/// semi-supervised and semi-weakly supervised ImageNet models.
pub fn known_sources() -> &'static [KnownSource] {
    SOURCES
}

const IMAGENET: &str = "ImageNet";
const SSL: &str = "SSL (semi-supervised on YFCC100M, fine-tuned on ImageNet)";
const SWSL: &str = "SWSL (semi-weakly supervised on IG-1B, fine-tuned on ImageNet)";
const COCO: &str = "COCO (torchvision's COCO_WITH_VOC_LABELS_V1 segmentation model)";

/// A torchvision .pth file that only exists in that form (no safetensors republication known
/// with torchvision's module names): `--weights NAME` falls back to it ([`resolve`]).
const fn tv_only(
    name: &'static str,
    label: &'static str,
    arch: Arch,
    path: &'static str,
    cache_name: &'static str,
    checksum: Checksum,
) -> KnownSource {
    KnownSource {
        name,
        pth: true,
        arch,
        label,
        host: Host::PyTorch,
        path,
        cache_name,
        checksum,
        licence: "BSD-3-Clause",
    }
}

/// Facebook's SSL / SWSL models: timm's safetensors republication, or with `pth` the
/// original file. No checksum is published for either.
const fn fb(
    name: &'static str,
    pth: bool,
    arch: Arch,
    path: &'static str,
    cache_name: &'static str,
) -> KnownSource {
    KnownSource {
        name,
        pth,
        arch,
        label: if name.len() == 3 { SSL } else { SWSL },
        host: if pth {
            Host::FacebookAi
        } else {
            Host::HuggingFace
        },
        path,
        cache_name,
        checksum: Checksum::Unpublished,
        licence: "CC-BY-NC-4.0",
    }
}

const fn hf(
    arch: Arch,
    path: &'static str,
    cache_name: &'static str,
    checksum: Checksum,
) -> KnownSource {
    KnownSource {
        name: "imagenet",
        pth: false,
        arch,
        label: IMAGENET,
        host: Host::HuggingFace,
        path,
        cache_name,
        checksum,
        licence: "BSD-3-Clause",
    }
}

const fn tv(
    arch: Arch,
    path: &'static str,
    cache_name: &'static str,
    checksum: Checksum,
) -> KnownSource {
    KnownSource {
        name: "imagenet",
        pth: true,
        arch,
        label: IMAGENET,
        host: Host::PyTorch,
        path,
        cache_name,
        checksum,
        licence: "BSD-3-Clause",
    }
}

// Sources of the table (the URLs and every checksum were found in public sources, none is
// computed here: there is no network where this was written):
//
// - `imagenet`, safetensors: torchvision's IMAGENET1K_V1 weights as republished by the timm
//   project on the Hugging Face hub, `timm/<arch>.tv_in1k` (timm's `default_cfgs` in
//   timm/models/resnet.py: "torchvision resnet weights", `hf_hub_id='timm/'`). These were
//   converted from torchvision's older file of the same weights (e.g. resnet50-19c8e357.pth):
//   torchvision re-saved those files in 2021 with the values unchanged (pytorch/vision#3620:
//   "weights are unchanged, but the files can now be properly unpickled"; timm PR #2346).
//   The wide ResNets' .pth files are half the size of their safetensors (138 and 255 MB for
//   69 and 127 M parameters: half precision), the reader below widens them. Full SHA-256s, as pinned by unrelated public projects (exact-string
//   search of public GitHub code):
//     resnet18.tv_in1k   694f673d...: pinned with the size 46,807,446 and the hub revision
//       bbd144b3e5565108aad885f145491d11bc6ce807 in a racket checkpoint table, the same hash
//       in a Python backbone table at that revision, in a mojo test (main, "compared value for
//       value against a torchvision IMAGENET1K_V1 dump") and in a JAX project at revision
//       a987fd6b60f845221bfff84b6f0191273ba56ead;
//     resnet34.tv_in1k   0bb82595...: the racket table (revision 1b7b21cc..., 87,278,522 B);
//     resnet50.tv_in1k   5d061a3c...: the racket table (revision 78f3ecfd..., 102,469,840 B)
//       and a Python preset table (main);
//     wide_resnet50_2.tv_in1k df6fb6c4...: a Python backbone table (revision 343c5fa5...) and
//       a weights catalog (main, 275,835,296 B).
//   None found for resnet101, resnet152, wide_resnet101_2: trust on first use.
// - `imagenet:pth`: torchvision's own files, the `IMAGENET1K_V1` URLs of
//   torchvision/models/resnet.py (torchvision 0.28). Their names carry the first 8 hex digits
//   of the SHA-256, which torchvision checks on download (`get_state_dict(check_hash=True)`).
//   Full SHA-256s, where a public weights catalog lists them (each begins with the name's
//   digits): resnet18 (also pinned by several other projects), resnet34, resnet50,
//   wide_resnet50_2, wide_resnet101_2.
// - `ssl`, `swsl` (resnet50 only): the models of "Billion-scale semi-supervised learning for
//   image classification" (Yalniz et al. 2019), facebookresearch/semi-supervised-ImageNet1K-
//   models (hubconf.py: `semi_supervised_model_urls`, `semi_weakly_supervised_model_urls`),
//   loaded there into torchvision's ResNet, so with torchvision's tensor names. timm
//   republishes them as `resnet50.fb_ssl_yfcc100m_ft_in1k` / `resnet50.fb_swsl_ig1b_ft_in1k`.
//   No checksum is published for either form: the digits in the Facebook file names follow
//   the torch.hub pattern, but nothing documents or checks them as a SHA-256 prefix (the
//   hubconf loads with torch.hub's default `check_hash=False`), so they are not relied on.
//   Licence CC-BY-NC 4.0 (non-commercial), as the project states; torchvision's weights are
//   BSD-3-Clause (timm's cfgs: `license='bsd-3-clause'`).
// - ResNeXt, DenseNet, VGG (`imagenet:pth`) and DeepLabV3 (`coco:pth`): the IMAGENET1K_V1 and
//   COCO_WITH_VOC_LABELS_V1 URLs of torchvision 0.28's resnet.py, densenet.py, vgg.py and
//   segmentation/deeplabv3.py (read from the installed package); checked by the SHA-256
//   prefix in their names. The ResNeXts' safetensors are timm's `<arch>.tv_in1k` (timm's cfgs
//   give the same torchvision URLs as their origin; no full checksum found). DenseNet and VGG
//   are served as torchvision's files only (timm's republications exist, but their layouts
//   were not checked here), DeepLabV3 has no republication.
// - `ssl`, `swsl` for resnet18, resnext50_32x4d, resnext101_32x8d: the same hubconf and timm
//   cfgs (`resnet18.fb_ssl_yfcc100m_ft_in1k` ..., `semi_supervised_resnet18-d92f0530.pth`,
//   `semi_weakly_supervised_resnet18-118f1556.pth`, `..._resnext50_32x4-ddb3e555.pth` /
//   `-72679e44.pth`, `..._resnext101_32x8-2cfe2f8b.pth` / `-b4712904.pth`), unchecked as
//   ResNet-50's.
// The official PatchCore (amazon-science/patchcore-inspection, src/patchcore/backbones.py)
// uses torchvision's `pretrained=True` weights, i.e. IMAGENET1K_V1, for its ResNets; its
// backbone list has no SSL/SWSL entries.
const SOURCES: &[KnownSource] = &[
    hf(
        Arch::Resnet18,
        "/timm/resnet18.tv_in1k/resolve/main/model.safetensors",
        "resnet18.tv_in1k.safetensors",
        Checksum::Sha256("694f673df6520a3158624e8a89af086f59923ee4cd7436fe5bc3bc71d295ad81"),
    ),
    hf(
        Arch::Resnet34,
        "/timm/resnet34.tv_in1k/resolve/main/model.safetensors",
        "resnet34.tv_in1k.safetensors",
        Checksum::Sha256("0bb82595a564991a9d424708b33f5d843f5aaed7f6c0886ff10849ff97022235"),
    ),
    hf(
        Arch::Resnet50,
        "/timm/resnet50.tv_in1k/resolve/main/model.safetensors",
        "resnet50.tv_in1k.safetensors",
        Checksum::Sha256("5d061a3c593d795bfe682d9b152bafbcf550579873492def3515b46db1189888"),
    ),
    hf(
        Arch::Resnet101,
        "/timm/resnet101.tv_in1k/resolve/main/model.safetensors",
        "resnet101.tv_in1k.safetensors",
        Checksum::Unpublished,
    ),
    hf(
        Arch::Resnet152,
        "/timm/resnet152.tv_in1k/resolve/main/model.safetensors",
        "resnet152.tv_in1k.safetensors",
        Checksum::Unpublished,
    ),
    hf(
        Arch::WideResnet50_2,
        "/timm/wide_resnet50_2.tv_in1k/resolve/main/model.safetensors",
        "wide_resnet50_2.tv_in1k.safetensors",
        Checksum::Sha256("df6fb6c4824769769de18e14088475fd6ee94236849aa4e5d8022ba9d9a9a16c"),
    ),
    hf(
        Arch::WideResnet101_2,
        "/timm/wide_resnet101_2.tv_in1k/resolve/main/model.safetensors",
        "wide_resnet101_2.tv_in1k.safetensors",
        Checksum::Unpublished,
    ),
    tv(
        Arch::Resnet18,
        "/models/resnet18-f37072fd.pth",
        "resnet18-f37072fd.pth",
        Checksum::Sha256("f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec"),
    ),
    tv(
        Arch::Resnet34,
        "/models/resnet34-b627a593.pth",
        "resnet34-b627a593.pth",
        Checksum::Sha256("b627a593bcbe140c234610266fe4f8ae95ea42fc881d091c9b6052e6b1d0590f"),
    ),
    tv(
        Arch::Resnet50,
        "/models/resnet50-0676ba61.pth",
        "resnet50-0676ba61.pth",
        Checksum::Sha256("0676ba61b6795bbe1773cffd859882e5e297624d384b6993f7c9e683e722fb8a"),
    ),
    tv(
        Arch::Resnet101,
        "/models/resnet101-63fe2227.pth",
        "resnet101-63fe2227.pth",
        Checksum::Sha256Prefix("63fe2227"),
    ),
    tv(
        Arch::Resnet152,
        "/models/resnet152-394f9c45.pth",
        "resnet152-394f9c45.pth",
        Checksum::Sha256Prefix("394f9c45"),
    ),
    tv(
        Arch::WideResnet50_2,
        "/models/wide_resnet50_2-95faca4d.pth",
        "wide_resnet50_2-95faca4d.pth",
        Checksum::Sha256("95faca4d11227dddf8633dbb5ff6c8a9003c1aa5b8945c73834b8007b10950b8"),
    ),
    tv(
        Arch::WideResnet101_2,
        "/models/wide_resnet101_2-32ee1156.pth",
        "wide_resnet101_2-32ee1156.pth",
        Checksum::Sha256("32ee11565f95f2f07223b243ada444a6457c4b90a88e6e293922813faf6dfd06"),
    ),
    hf(
        Arch::Resnext50_32x4d,
        "/timm/resnext50_32x4d.tv_in1k/resolve/main/model.safetensors",
        "resnext50_32x4d.tv_in1k.safetensors",
        Checksum::Unpublished,
    ),
    hf(
        Arch::Resnext101_32x8d,
        "/timm/resnext101_32x8d.tv_in1k/resolve/main/model.safetensors",
        "resnext101_32x8d.tv_in1k.safetensors",
        Checksum::Unpublished,
    ),
    tv(
        Arch::Resnext50_32x4d,
        "/models/resnext50_32x4d-7cdf4587.pth",
        "resnext50_32x4d-7cdf4587.pth",
        Checksum::Sha256Prefix("7cdf4587"),
    ),
    tv(
        Arch::Resnext101_32x8d,
        "/models/resnext101_32x8d-8ba56ff5.pth",
        "resnext101_32x8d-8ba56ff5.pth",
        Checksum::Sha256Prefix("8ba56ff5"),
    ),
    tv_only(
        "coco",
        COCO,
        Arch::Deeplabv3Resnet50,
        "/models/deeplabv3_resnet50_coco-cd0a2569.pth",
        "deeplabv3_resnet50_coco-cd0a2569.pth",
        Checksum::Sha256Prefix("cd0a2569"),
    ),
    tv_only(
        "coco",
        COCO,
        Arch::Deeplabv3Resnet101,
        "/models/deeplabv3_resnet101_coco-586e9e4e.pth",
        "deeplabv3_resnet101_coco-586e9e4e.pth",
        Checksum::Sha256Prefix("586e9e4e"),
    ),
    tv_only(
        "imagenet",
        IMAGENET,
        Arch::Densenet121,
        "/models/densenet121-a639ec97.pth",
        "densenet121-a639ec97.pth",
        Checksum::Sha256Prefix("a639ec97"),
    ),
    tv_only(
        "imagenet",
        IMAGENET,
        Arch::Densenet161,
        "/models/densenet161-8d451a50.pth",
        "densenet161-8d451a50.pth",
        Checksum::Sha256Prefix("8d451a50"),
    ),
    tv_only(
        "imagenet",
        IMAGENET,
        Arch::Densenet169,
        "/models/densenet169-b2777c0a.pth",
        "densenet169-b2777c0a.pth",
        Checksum::Sha256Prefix("b2777c0a"),
    ),
    tv_only(
        "imagenet",
        IMAGENET,
        Arch::Densenet201,
        "/models/densenet201-c1103571.pth",
        "densenet201-c1103571.pth",
        Checksum::Sha256Prefix("c1103571"),
    ),
    tv_only(
        "imagenet",
        IMAGENET,
        Arch::Vgg11,
        "/models/vgg11-8a719046.pth",
        "vgg11-8a719046.pth",
        Checksum::Sha256Prefix("8a719046"),
    ),
    tv_only(
        "imagenet",
        IMAGENET,
        Arch::Vgg11Bn,
        "/models/vgg11_bn-6002323d.pth",
        "vgg11_bn-6002323d.pth",
        Checksum::Sha256Prefix("6002323d"),
    ),
    tv_only(
        "imagenet",
        IMAGENET,
        Arch::Vgg13,
        "/models/vgg13-19584684.pth",
        "vgg13-19584684.pth",
        Checksum::Sha256Prefix("19584684"),
    ),
    tv_only(
        "imagenet",
        IMAGENET,
        Arch::Vgg13Bn,
        "/models/vgg13_bn-abd245e5.pth",
        "vgg13_bn-abd245e5.pth",
        Checksum::Sha256Prefix("abd245e5"),
    ),
    tv_only(
        "imagenet",
        IMAGENET,
        Arch::Vgg16,
        "/models/vgg16-397923af.pth",
        "vgg16-397923af.pth",
        Checksum::Sha256Prefix("397923af"),
    ),
    tv_only(
        "imagenet",
        IMAGENET,
        Arch::Vgg16Bn,
        "/models/vgg16_bn-6c64b313.pth",
        "vgg16_bn-6c64b313.pth",
        Checksum::Sha256Prefix("6c64b313"),
    ),
    tv_only(
        "imagenet",
        IMAGENET,
        Arch::Vgg19,
        "/models/vgg19-dcbb9e9d.pth",
        "vgg19-dcbb9e9d.pth",
        Checksum::Sha256Prefix("dcbb9e9d"),
    ),
    tv_only(
        "imagenet",
        IMAGENET,
        Arch::Vgg19Bn,
        "/models/vgg19_bn-c79401a0.pth",
        "vgg19_bn-c79401a0.pth",
        Checksum::Sha256Prefix("c79401a0"),
    ),
    fb(
        "ssl",
        false,
        Arch::Resnet18,
        "/timm/resnet18.fb_ssl_yfcc100m_ft_in1k/resolve/main/model.safetensors",
        "resnet18.fb_ssl_yfcc100m_ft_in1k.safetensors",
    ),
    fb(
        "ssl",
        true,
        Arch::Resnet18,
        "/semiweaksupervision/model_files/semi_supervised_resnet18-d92f0530.pth",
        "semi_supervised_resnet18-d92f0530.pth",
    ),
    fb(
        "swsl",
        false,
        Arch::Resnet18,
        "/timm/resnet18.fb_swsl_ig1b_ft_in1k/resolve/main/model.safetensors",
        "resnet18.fb_swsl_ig1b_ft_in1k.safetensors",
    ),
    fb(
        "swsl",
        true,
        Arch::Resnet18,
        "/semiweaksupervision/model_files/semi_weakly_supervised_resnet18-118f1556.pth",
        "semi_weakly_supervised_resnet18-118f1556.pth",
    ),
    fb(
        "ssl",
        false,
        Arch::Resnext50_32x4d,
        "/timm/resnext50_32x4d.fb_ssl_yfcc100m_ft_in1k/resolve/main/model.safetensors",
        "resnext50_32x4d.fb_ssl_yfcc100m_ft_in1k.safetensors",
    ),
    fb(
        "ssl",
        true,
        Arch::Resnext50_32x4d,
        "/semiweaksupervision/model_files/semi_supervised_resnext50_32x4-ddb3e555.pth",
        "semi_supervised_resnext50_32x4-ddb3e555.pth",
    ),
    fb(
        "swsl",
        false,
        Arch::Resnext50_32x4d,
        "/timm/resnext50_32x4d.fb_swsl_ig1b_ft_in1k/resolve/main/model.safetensors",
        "resnext50_32x4d.fb_swsl_ig1b_ft_in1k.safetensors",
    ),
    fb(
        "swsl",
        true,
        Arch::Resnext50_32x4d,
        "/semiweaksupervision/model_files/semi_weakly_supervised_resnext50_32x4-72679e44.pth",
        "semi_weakly_supervised_resnext50_32x4-72679e44.pth",
    ),
    fb(
        "ssl",
        false,
        Arch::Resnext101_32x8d,
        "/timm/resnext101_32x8d.fb_ssl_yfcc100m_ft_in1k/resolve/main/model.safetensors",
        "resnext101_32x8d.fb_ssl_yfcc100m_ft_in1k.safetensors",
    ),
    fb(
        "ssl",
        true,
        Arch::Resnext101_32x8d,
        "/semiweaksupervision/model_files/semi_supervised_resnext101_32x8-2cfe2f8b.pth",
        "semi_supervised_resnext101_32x8-2cfe2f8b.pth",
    ),
    fb(
        "swsl",
        false,
        Arch::Resnext101_32x8d,
        "/timm/resnext101_32x8d.fb_swsl_ig1b_ft_in1k/resolve/main/model.safetensors",
        "resnext101_32x8d.fb_swsl_ig1b_ft_in1k.safetensors",
    ),
    fb(
        "swsl",
        true,
        Arch::Resnext101_32x8d,
        "/semiweaksupervision/model_files/semi_weakly_supervised_resnext101_32x8-b4712904.pth",
        "semi_weakly_supervised_resnext101_32x8-b4712904.pth",
    ),
    KnownSource {
        name: "ssl",
        pth: false,
        arch: Arch::Resnet50,
        label: SSL,
        host: Host::HuggingFace,
        path: "/timm/resnet50.fb_ssl_yfcc100m_ft_in1k/resolve/main/model.safetensors",
        cache_name: "resnet50.fb_ssl_yfcc100m_ft_in1k.safetensors",
        checksum: Checksum::Unpublished,
        licence: "CC-BY-NC-4.0",
    },
    KnownSource {
        name: "ssl",
        pth: true,
        arch: Arch::Resnet50,
        label: SSL,
        host: Host::FacebookAi,
        path: "/semiweaksupervision/model_files/semi_supervised_resnet50-08389792.pth",
        cache_name: "semi_supervised_resnet50-08389792.pth",
        checksum: Checksum::Unpublished,
        licence: "CC-BY-NC-4.0",
    },
    KnownSource {
        name: "swsl",
        pth: false,
        arch: Arch::Resnet50,
        label: SWSL,
        host: Host::HuggingFace,
        path: "/timm/resnet50.fb_swsl_ig1b_ft_in1k/resolve/main/model.safetensors",
        cache_name: "resnet50.fb_swsl_ig1b_ft_in1k.safetensors",
        checksum: Checksum::Unpublished,
        licence: "CC-BY-NC-4.0",
    },
    KnownSource {
        name: "swsl",
        pth: true,
        arch: Arch::Resnet50,
        label: SWSL,
        host: Host::FacebookAi,
        path: "/semiweaksupervision/model_files/semi_weakly_supervised_resnet50-16a12f1b.pth",
        cache_name: "semi_weakly_supervised_resnet50-16a12f1b.pth",
        checksum: Checksum::Unpublished,
        licence: "CC-BY-NC-4.0",
    },
];

/// The source `--weights NAME[:pth]` names for `arch`, or an error naming the architectures it
/// exists for. `NAME` alone falls back to the .pth file where that is the only form.
pub fn resolve(name: &str, pth: bool, arch: Arch) -> Result<&'static KnownSource> {
    let same = |k: &&KnownSource| k.name == name && k.pth == pth;
    if let Some(k) = SOURCES.iter().filter(same).find(|k| k.arch == arch) {
        return Ok(k);
    }
    let only_pth = |k: &&KnownSource| k.name == name && k.pth && k.arch == arch;
    if let Some(k) = SOURCES.iter().find(only_pth).filter(|_| !pth) {
        return Ok(k);
    }
    let archs: Vec<&str> = Arch::ALL
        .iter()
        .filter(|a| {
            SOURCES
                .iter()
                .any(|k| k.name == name && k.arch == **a && (k.pth || !pth))
        })
        .map(|a| a.name())
        .collect();
    let spec = if pth {
        format!("{name}:pth")
    } else {
        name.to_string()
    };
    if archs.is_empty() {
        bail!("--weights {spec}: no such source");
    }
    bail!(
        "--weights {spec} exists only for --backbone {}, not {}",
        archs.join(", "),
        arch.name()
    )
}

/// The cache folder: `$PATCHCORE_CACHE`, else `$XDG_CACHE_HOME/patchcore`, else
/// `~/.cache/patchcore`.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("PATCHCORE_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(p).join("patchcore");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    PathBuf::from(home).join(".cache").join("patchcore")
}

/// Fills every variable of `vs` (a freshly built backbone) according to `spec`.
pub fn load(vs: &mut VarStore, arch: Arch, spec: &WeightsSpec, quiet: bool) -> Result<WeightsInfo> {
    match spec {
        WeightsSpec::Random(seed) => {
            init_random(vs, *seed);
            Ok(WeightsInfo {
                spec: format!("random:{seed}"),
                source: format!("random:{seed}"),
                sha256: hex(&Sha256::digest(format!("random:{seed}:{}", arch.name()))),
            })
        }
        WeightsSpec::File(path) => {
            if !path.exists() && looks_like_a_name(path) {
                bail!(
                    "--weights {}: no such file, nor a known source (known: {}, each also as \
                     NAME:pth; random:SEED; or an http(s) URL)",
                    path.display(),
                    known_names().join(", ")
                );
            }
            let sha256 = checksum(path)?;
            load_file(vs, path)?;
            let absolute = path.canonicalize().unwrap_or_else(|_| path.clone());
            Ok(WeightsInfo {
                spec: absolute.display().to_string(),
                source: absolute.display().to_string(),
                sha256,
            })
        }
        WeightsSpec::ModelFile { path, sha256 } => {
            check_file(path, sha256)?;
            load_file(vs, path)?;
            Ok(WeightsInfo {
                spec: path.display().to_string(),
                source: path.display().to_string(),
                sha256: sha256.clone(),
            })
        }
        WeightsSpec::Url { url, sha256 } => {
            let expected = match sha256 {
                Some(h) => Expected::Full(h),
                None => Expected::Nothing,
            };
            let (path, actual) = fetch(url, None, expected, quiet)?;
            load_file(vs, &path)?;
            Ok(WeightsInfo {
                spec: match sha256 {
                    Some(h) => format!("{url}#sha256={h}"),
                    None => url.clone(),
                },
                source: url.clone(),
                sha256: actual,
            })
        }
        WeightsSpec::Known { name, pth } => {
            let src = resolve(name, *pth, arch)?;
            let url = src.url();
            let (path, actual) = fetch(&url, Some(src.cache_name), src.checksum.expected(), quiet)
                .map_err(|e| {
                    if e.downcast_ref::<Unreachable>().is_none() {
                        return e;
                    }
                    let other = SOURCES
                        .iter()
                        .find(|k| k.name == src.name && k.arch == arch && k.pth != src.pth)
                        .map(|k| {
                            format!(
                                ", or --weights {} (from {})",
                                k.spec(),
                                k.host.default_base()
                            )
                        })
                        .unwrap_or_default();
                    anyhow!(
                        "no {} weights for {}: {e:#}. Put the file from {url} at {}{other}, or \
                         pass --weights FILE (safetensors or a PyTorch state dict), or --weights \
                         random:0 to try the pipeline with random weights",
                        src.label,
                        arch.name(),
                        cached_path(&url, Some(src.cache_name)).display()
                    )
                })?;
            load_file(vs, &path)?;
            Ok(WeightsInfo {
                spec: src.spec(),
                source: url,
                sha256: actual,
            })
        }
    }
}

fn known_names() -> Vec<&'static str> {
    let mut names: Vec<&str> = Vec::new();
    for k in SOURCES {
        if !names.contains(&k.name) {
            names.push(k.name);
        }
    }
    names
}

/// A bare word (no folder, no extension): more likely a mistyped source name than a file.
fn looks_like_a_name(path: &Path) -> bool {
    path.components().count() == 1 && path.extension().is_none()
}

/// torchvision's initialization: convolutions Kaiming-normal (fan-out, ReLU gain), batch norms
/// at identity. Deterministic for a seed on a given libtorch.
fn init_random(vs: &mut VarStore, seed: u64) {
    tch::manual_seed(seed as i64);
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    tch::no_grad(|| {
        for (name, mut t) in vars {
            let size = t.size();
            if size.len() == 4 {
                let fan_out = (size[0] * size[2] * size[3]) as f64;
                let std = (2.0 / fan_out).sqrt();
                t.copy_(&(Tensor::randn(&size, (Kind::Float, t.device())) * std));
            } else if name.ends_with("running_var") || name.ends_with("weight") {
                let _ = t.fill_(1.0);
            } else {
                let _ = t.fill_(0.0);
            }
        }
    });
}

/// Every tensor of a weights file, by name: safetensors, or a `torch.save` file (zip or the
/// older pickle stream) holding a state dict (also under a "state_dict" or "model" key).
pub fn read_file(path: &Path) -> Result<Vec<(String, Tensor)>> {
    read_tensors(path, &|_| true)
}

/// Whether a weights file's first bytes are a safetensors header (an 8-byte length, then
/// JSON); anything else is read as a `torch.save` file.
pub(crate) fn is_safetensors(head: &[u8]) -> bool {
    head.get(8) == Some(&b'{')
}

/// The `wanted` tensors of a weights file (see [`read_file`]), by name. The file is mapped,
/// not read: only the bytes of the wanted tensors are touched and converted (a backbone cut
/// after layer3 needs well under half of a full checkpoint).
fn read_tensors(path: &Path, wanted: &dyn Fn(&str) -> bool) -> Result<Vec<(String, Tensor)>> {
    let cannot_read =
        |e: std::io::Error| anyhow!("cannot read weights file {}: {e}", path.display());
    let file = std::fs::File::open(path).map_err(cannot_read)?;
    // SAFETY: the mapping is only read, and dropped before this returns (every tensor is a
    // copy). Weights files are written once; one changed under us gives wrong values or a
    // refusal, as it would with read().
    let data = unsafe { memmap2::Mmap::map(&file) }.map_err(cannot_read)?;
    let magic = &data[..data.len().min(9)];
    let cannot =
        |e: &dyn std::fmt::Display| anyhow!("cannot load weights file {}: {e}", path.display());
    if is_safetensors(magic) {
        let st = safetensors::SafeTensors::deserialize(&data).map_err(|e| cannot(&e))?;
        return st
            .tensors()
            .into_iter()
            .filter(|(name, _)| wanted(name))
            .map(|(name, view)| Ok((name, Tensor::try_from(view).map_err(|e| cannot(&e))?)))
            .collect();
    }
    let is_zip = magic.starts_with(b"PK\x03\x04");
    let is_pickle = magic.len() >= 2 && magic[0] == 0x80;
    if !is_zip && !is_pickle {
        bail!(
            "weights file {} is neither safetensors nor a PyTorch state dict saved by torch.save",
            path.display()
        );
    }
    let read = if is_zip {
        match pth::read_zip(&data, wanted) {
            // A zip without data.pkl: perhaps libtorch's own format.
            Ok(None) => return Tensor::loadz_multi(path).map_err(|e| cannot(&e)),
            Ok(Some(tensors)) => Ok(tensors),
            Err(e) => Err(e),
        }
    } else {
        pth::read_legacy(&data, wanted)
    };
    read.map_err(|e| cannot(&format!("{e:#}")))
}

/// Loads a weights file by tensor name, checking that every variable is present with the
/// right shape. Extra tensors (the classifier, deeper layers) are ignored, never converted;
/// a `module.` prefix (from `DataParallel`) is dropped.
pub fn load_file(vs: &mut VarStore, path: &Path) -> Result<()> {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let needed: HashSet<&str> = vars.iter().map(|(k, _)| k.as_str()).collect();
    let strip = |k: &str| legacy_densenet_name(k.strip_prefix("module.").unwrap_or(k));
    let named: HashMap<String, Tensor> =
        read_tensors(path, &|k| needed.contains(strip(k).as_str()))?
            .into_iter()
            .map(|(k, v)| (strip(&k), v))
            .collect();
    tch::no_grad(|| -> Result<()> {
        for (name, mut var) in vars {
            let Some(src) = named.get(&name) else {
                bail!(
                    "weights file {} has no tensor '{name}' (is it for another backbone?)",
                    path.display()
                );
            };
            if src.size() != var.size() {
                bail!(
                    "weights file {}: tensor '{name}' has shape {:?}, the backbone needs {:?} \
                     (is it for another backbone?)",
                    path.display(),
                    src.size(),
                    var.size()
                );
            }
            var.copy_(&src.to_kind(Kind::Float).to_device(var.device()));
        }
        Ok(())
    })
}

/// torchvision's DenseNet files are older than its module names: `...denselayer1.norm.1.weight`
/// is now `...denselayer1.norm1.weight` (torchvision's `_load_state_dict` renames them with a
/// regex). Other names are returned as they are.
fn legacy_densenet_name(k: &str) -> String {
    let parts: Vec<&str> = k.split('.').collect();
    let n = parts.len();
    let legacy = n >= 4
        && parts[n - 4]
            .strip_prefix("denselayer")
            .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
        && ["norm", "relu", "conv"].contains(&parts[n - 3])
        && ["1", "2"].contains(&parts[n - 2])
        && ["weight", "bias", "running_mean", "running_var"].contains(&parts[n - 1]);
    if !legacy {
        return k.to_string();
    }
    let head = parts[..n - 2].join(".");
    format!("{head}{}.{}", parts[n - 2], parts[n - 1])
}

/// Where a download of `url` is cached: `CACHE/weights/NAME`, with `name` given for the
/// known sources and derived from the URL (a short hash plus its file name) otherwise.
fn cached_path(url: &str, name: Option<&str>) -> PathBuf {
    let file = match name {
        Some(n) => n.to_string(),
        None => {
            let digest = hex(&Sha256::digest(url.as_bytes()));
            let base: String = url
                .rsplit('/')
                .next()
                .unwrap_or("weights")
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            format!("{}-{base}", &digest[..12])
        }
    };
    cache_dir().join("weights").join(file)
}

/// The SHA-256 of a weights file, which models record and published checksums are. SHA-256
/// over a few hundred MB costs a good part of a second at every start, so each content's
/// SHA-256 is worked out once and kept in the cache under the content's BLAKE3
/// (`CACHE/weights/blake3/HEX`), and under the file's identity as the file system states it
/// (`CACHE/weights/stat/HEX`: path, device, inode, size, modification and change times, which
/// any write to or replacement of the file changes, and which a user cannot set back). A start
/// that finds the file unchanged since it was hashed reads only that; otherwise it hashes the
/// file with BLAKE3 (mapped, on all cores), which identifies the content as surely. Without a
/// writable cache, SHA-256 it is.
pub fn checksum(path: &Path) -> Result<String> {
    checksum_with_memos(path, &memo_dir())
}

/// Where [`checksum`] keeps the SHA-256 of each content, under its BLAKE3 (and `stat/`).
fn memo_dir() -> PathBuf {
    cache_dir().join("weights").join("blake3")
}

/// The file's identity as the file system states it, hashed: `None` when it cannot be read.
fn stat_key(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let path = std::fs::canonicalize(path).ok()?;
    let m = std::fs::metadata(&path).ok()?;
    let id = format!(
        "{}|{}|{}|{}|{}.{}|{}.{}",
        path.display(),
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec()
    );
    Some(hex(&Sha256::digest(id)))
}

/// A SHA-256 kept in a memo file, if it holds one.
fn read_memo(memo: &Path) -> Option<String> {
    let known = std::fs::read_to_string(memo).ok()?;
    let known = known.trim();
    is_hex(known, 64).then(|| known.to_string())
}

fn checksum_with_memos(path: &Path, memos: &Path) -> Result<String> {
    let by_stat = stat_key(path).map(|k| memos.join("stat").join(k));
    if let Some(known) = by_stat.as_deref().and_then(read_memo) {
        return Ok(known);
    }
    let blake3 = blake3_file(path).map_err(|e| {
        anyhow!(
            "cannot read weights file {}: {}",
            path.display(),
            e.root_cause()
        )
    })?;
    let memo = memos.join(&blake3);
    let sha256 = match read_memo(&memo) {
        Some(known) => known,
        None => {
            let sha256 = sha256_file(path)?;
            remember(&memo, &sha256);
            sha256
        }
    };
    if let Some(by_stat) = by_stat {
        remember(&by_stat, &sha256);
    }
    Ok(sha256)
}

/// Keeps `sha256` in the memo file `memo` of [`checksum`], if the cache can be written
/// (a read-only cache only makes later starts slower).
fn remember(memo: &Path, sha256: &str) {
    let dir = memo.parent().expect("memo path has a folder");
    let _ = std::fs::create_dir_all(dir)
        .map_err(anyhow::Error::from)
        .and_then(|_| record(memo, sha256));
}

/// What a file's SHA-256 must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expected<'a> {
    Full(&'a str),
    Prefix(&'a str),
    Nothing,
}

impl Expected<'_> {
    /// Why `actual` does not qualify, if it does not.
    fn mismatch(self, actual: &str) -> Option<String> {
        match self {
            Expected::Full(e) if e != actual => Some(format!("expected {e}")),
            Expected::Prefix(p) if !actual.starts_with(p) => {
                Some(format!("the published checksum begins with {p}"))
            }
            _ => None,
        }
    }
}

/// A download that could not be made (no connection, an HTTP error, a broken transfer), as
/// opposed to one that was refused.
#[derive(Debug)]
struct Unreachable(String);

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unreachable {}

/// Returns the cached copy of `url` and its SHA-256, downloading it first if needed. The file
/// must satisfy `expected`; the checksum of the first download is recorded beside the file
/// and checked on every later use as well.
fn fetch(
    url: &str,
    name: Option<&str>,
    expected: Expected<'_>,
    quiet: bool,
) -> Result<(PathBuf, String)> {
    let path = cached_path(url, name);
    let recorded = path.with_extension("sha256");
    if path.exists() {
        let actual = checksum(&path)?;
        let first = std::fs::read_to_string(&recorded)
            .ok()
            .map(|s| s.trim().to_string());
        let why = expected.mismatch(&actual).or_else(|| match first {
            Some(r) if r != actual => Some(format!("expected {r} (recorded at its download)")),
            _ => None,
        });
        if let Some(why) = why {
            bail!(
                "cached weights {} have checksum {actual}, {why}: delete the file to download \
                 it again",
                path.display()
            );
        }
        if !recorded.exists() {
            // Put there by hand: its checksum now is the one to keep.
            record(&recorded, &actual)?;
        }
        return Ok((path, actual));
    }
    let dir = path.parent().expect("cache path has a folder");
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create cache folder {}", dir.display()))?;
    let actual = download(url, &path, quiet)?;
    if let Some(why) = expected.mismatch(&actual) {
        let _ = std::fs::remove_file(&path);
        bail!("download of {url} has checksum {actual}, {why}: refusing to use it");
    }
    record(&recorded, &actual)?;
    Ok((path, actual))
}

fn record(path: &Path, sha256: &str) -> Result<()> {
    let mut f = AtomicFile::create(path)?;
    writeln!(f, "{sha256}")?;
    f.commit()
}

/// Streams `url` into `dest` (atomically), with a progress bar; returns the file's SHA-256.
fn download(url: &str, dest: &Path, quiet: bool) -> Result<String> {
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(20))
        .timeout_read(Duration::from_secs(60))
        .build();
    let resp = agent.get(url).call().map_err(|e| {
        let why = match e {
            ureq::Error::Status(code, _) => format!("HTTP status {code}"),
            ureq::Error::Transport(t) => match t.message() {
                Some(m) => format!("{}: {m}", t.kind()),
                None => t.kind().to_string(),
            },
        };
        Unreachable(format!("download of {url} failed ({why})"))
    })?;
    let total: Option<u64> = resp.header("Content-Length").and_then(|v| v.parse().ok());
    let bar = crate::util::progress::bytes(total, &format!("downloading {url}"), quiet);
    let mut reader = resp.into_reader();
    let mut out = AtomicFile::create(dest)?;
    let mut hasher = Sha256::new();
    let mut blake3 = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut received = 0u64;
    loop {
        let n = reader
            .read(&mut buf)
            .map_err(|e| Unreachable(format!("download of {url} broke off: {e}")))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        blake3.update(&buf[..n]);
        out.write_all(&buf[..n])?;
        received += n as u64;
        bar.set_position(received);
    }
    bar.finish_and_clear();
    if let Some(t) = total {
        if t != received {
            return Err(Unreachable(format!(
                "download of {url} ended after {received} of {t} bytes"
            ))
            .into());
        }
    }
    out.commit()?;
    let sha256 = hex(&hasher.finalize());
    remember(
        &memo_dir().join(blake3.finalize().to_hex().as_str()),
        &sha256,
    );
    Ok(sha256)
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

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
