//! From image files to patch features: `images` (finding, decoding, Pillow-exact resizing),
//! `weights` (the backbone's parameters: sources, cache, loading), `backbone` (the CNNs),
//! `probe` (the official BatchNorm probe), `patch` (3x3 neighbourhoods, upsampling, pooling)
//! and `extractor`, which runs them for a list of images in batches.

pub mod backbone;
pub(crate) mod extractor;
pub mod images;
pub mod patch;
pub(crate) mod probe;
pub mod weights;
