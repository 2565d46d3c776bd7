//! Scores one image with a trained model through the library's front door (`patchcore::api`),
//! as a program embedding patchcore would; prints the image score, the number `patchcore
//! predict` writes to results.csv for the same image:
//!
//!     cargo run --release --example score_image -- MODEL IMAGE

use anyhow::{bail, Result};
use patchcore::api::Detector;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, image] = args.as_slice() else {
        bail!("usage: score_image MODEL IMAGE");
    };
    let mut detector = Detector::load(model)?;
    let scored = detector.score(&image::open(image)?)?;
    println!("{}", scored.score);
    Ok(())
}
