//! The known public sources of backbone weights, by name (`imagenet`, `ssl`, `swsl`, `coco`,
//! each also as `NAME:pth`): where each is served from, its cache file name, its checksum and
//! its licence; and which source `--weights NAME` means for a backbone.

use anyhow::{bail, Result};

use super::cache::Expected;
use crate::features::backbone::Arch;

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
    pub(super) fn expected(self) -> Expected<'static> {
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
pub(super) const SOURCES: &[KnownSource] = &[
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

/// The known sources' names, each once, in table order.
pub(super) fn known_names() -> Vec<&'static str> {
    let mut names: Vec<&str> = Vec::new();
    for k in SOURCES {
        if !names.contains(&k.name) {
            names.push(k.name);
        }
    }
    names
}
