//! A trained model and how it scores: `bank` (the FAISS index and its sidecar), `knn` (the
//! bank's exact search), `scoring` (patch scores, image score, heatmap), `single` (one
//! backbone's model loaded), `ensemble` (several backbones as one) and `verdict` (what is
//! said of one scored image).

pub mod bank;
pub mod ensemble;
pub mod knn;
pub mod scoring;
pub mod single;
pub mod verdict;
