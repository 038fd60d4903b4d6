//! GFLOP/s of the f32 linear kernels over BERT-base-shaped layers as the encoder runs
//! them (each product split by columns over the pool), in two passes interleaved in one
//! process: twelve distinct layers, whose weights (340 MiB) come from memory every pass,
//! and one layer's products twelve times, whose weights (28 MiB) stay in cache. The gap
//! between the two is what reading the weights costs; medians of the rounds, and the
//! median same-round ratio (these VMs drift too much for figures of separate runs).
//!     cargo run --release --example layer_stream [-- ROWS ROUNDS HIDDEN INTERMEDIATE]
use std::time::Instant;

use streambed::embed::gemm::{Epilogue, PackedLinear, RowLinear};

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numbers"))
        .collect();
    let m = *args.first().unwrap_or(&600);
    let rounds = *args.get(1).unwrap_or(&12);
    let (h, i) = (*args.get(2).unwrap_or(&768), *args.get(3).unwrap_or(&3072));
    let shapes = [(3 * h, h), (h, h), (i, h), (h, i)];
    let layer = |seed: usize| -> Vec<PackedLinear> {
        shapes
            .iter()
            .map(|&(n, k)| {
                let w: Vec<f32> = (0..n * k)
                    .map(|v| (((v + seed) * 7919) % 1000) as f32 / 1e4 - 0.05)
                    .collect();
                PackedLinear::new(&w, &vec![0.1f32; n], n, k)
            })
            .collect()
    };
    let layers: Vec<Vec<PackedLinear>> = (0..12).map(layer).collect();
    let xs: Vec<Vec<f32>> = shapes
        .iter()
        .map(|&(_, k)| {
            (0..m * k)
                .map(|v| ((v * 104729) % 1000) as f32 / 1e3 - 0.5)
                .collect()
        })
        .collect();
    let mut outs: Vec<Vec<f32>> = shapes.iter().map(|&(n, _)| vec![0f32; m * n]).collect();
    let parts = 3 * rayon::current_num_threads();
    let flop: f64 = shapes.iter().map(|&(n, k)| 24.0 * (m * n * k) as f64).sum();
    let mut pass = |distinct: bool| {
        let t = Instant::now();
        for l in 0..12 {
            let layer = &layers[if distinct { l } else { 0 }];
            for (s, lin) in layer.iter().enumerate() {
                // SAFETY: `outs[s]` holds m rows of the product's n; `xs[s]` m rows of k.
                unsafe { lin.run_split(&xs[s], m, outs[s].as_mut_ptr(), &Epilogue::Bias, parts) };
            }
        }
        flop / t.elapsed().as_secs_f64() / 1e9
    };
    pass(true);
    let (mut cold, mut warm, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..rounds {
        // Alternate which goes first.
        let (c, w) = if r % 2 == 0 {
            let c = pass(true);
            (c, pass(false))
        } else {
            let w = pass(false);
            (pass(true), w)
        };
        cold.push(c);
        warm.push(w);
        ratio.push(w / c);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "isa {:?}, {} threads, {m} rows, {rounds} rounds: twelve layers {:.1} GFLOP/s, one layer twelve times {:.1}, ratio {:.3}",
        streambed::embed::gemm::isa(),
        rayon::current_num_threads(),
        median(&mut cold),
        median(&mut warm),
        median(&mut ratio),
    );
}
