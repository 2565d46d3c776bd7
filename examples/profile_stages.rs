//! Times the pieces of per-image work on one MVTec image (development aid).
//!   cargo run --release --example profile_stages -- IMAGE
use std::time::Instant;

use patchcore::features::backbone::{Arch, ResNet};
use patchcore::features::images::{self, Preprocess};
use patchcore::features::patch as features;
use patchcore::model::scoring;
use patchcore::outputs::files as outputs;
use tch::{nn::VarStore, Device, Tensor};

fn time<T>(name: &str, reps: usize, mut f: impl FnMut() -> T) -> T {
    let mut out = f();
    let t = Instant::now();
    for _ in 0..reps {
        out = f();
    }
    println!(
        "{name:32} {:8.2} ms",
        t.elapsed().as_secs_f64() * 1000.0 / reps as f64
    );
    out
}

fn main() {
    let path = std::env::args().nth(1).expect("image path");
    tch::set_num_threads(2);
    let bytes = std::fs::read(&path).unwrap();
    let img = time("decode", 5, || images::decode_rgb(&bytes, "input").unwrap());
    let pre = Preprocess {
        resize: 256,
        crop: Some(224),
    };
    let (input, geom) = time("resize+crop (Pillow-exact)", 5, || pre.apply(&img).unwrap());
    let data = time("normalize", 5, || images::normalize_chw(&input));
    let mut vs = VarStore::new(Device::Cpu);
    let net = ResNet::new(&vs.root(), Arch::WideResnet50_2, &[2, 3]).unwrap();
    patchcore::features::weights::load(
        &mut vs,
        Arch::WideResnet50_2,
        &patchcore::features::weights::WeightsSpec::Random(0),
        true,
    )
    .unwrap();
    let b = 8;
    let batch = Tensor::from_slice(&data)
        .reshape([1, 3, 224, 224])
        .repeat([b, 1, 1, 1]);
    let layers = time("forward to layer3 (per batch of 8)", 3, || {
        tch::no_grad(|| net.forward(&batch))
    });
    let agg = time("aggregator build", 1, || {
        features::Aggregator::new(&[512, 1024], 1024, 1024, Device::Cpu)
    });
    let _ = time("aggregate (per batch of 8)", 3, || {
        tch::no_grad(|| agg.apply(&layers))
    });
    let _ = time("  layer2 depthwise 512", 3, || {
        tch::no_grad(|| {
            layers[0].conv2d(
                &Tensor::ones([512, 1, 3, 3], (tch::Kind::Float, Device::Cpu)),
                None::<Tensor>,
                [1, 1],
                [1, 1],
                [1, 1],
                512,
            )
        })
    });
    let _ = time("  zeros+index_add 1024x28x28", 3, || {
        tch::no_grad(|| {
            Tensor::zeros([8, 1024, 28, 28], (tch::Kind::Float, Device::Cpu)).index_add(
                1,
                &Tensor::arange(512, (tch::Kind::Int64, Device::Cpu)),
                &layers[0],
            )
        })
    });
    let _ = time("  permute+reshape copy", 3, || {
        tch::no_grad(|| {
            Tensor::zeros([8, 1024, 28, 28], (tch::Kind::Float, Device::Cpu))
                .permute([0, 2, 3, 1])
                .reshape([8, 784, 1024])
        })
    });
    let patch: Vec<f32> = (0..784).map(|i| (i % 37) as f32).collect();
    let map = ndarray::ArrayView2::from_shape((28, 28), &patch).unwrap();
    let heat = time("heatmap 224 (upsample+gauss)", 5, || {
        scoring::heatmap(map, 224, 224)
    });
    let full = time("to_original 1024", 5, || {
        scoring::to_original(heat.view(), &geom)
    });
    let ov = time("overlay", 5, || outputs::overlay(&img, &full, 0.0, 36.0));
    let dir = std::env::temp_dir();
    time("write npy", 5, || {
        outputs::write_npy(&dir.join("p.npy"), &full).unwrap()
    });
    time("write jpeg", 5, || {
        outputs::write_jpeg(&dir.join("p.jpg"), &ov).unwrap()
    });
}
