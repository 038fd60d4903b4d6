//! GFLOP/s of the CPU linear kernels on one thread and on the pool, at the shapes of
//! BERT layers (token rows × hidden → 3·hidden / intermediate / hidden).
//!     cargo run --release --example kernel_speed [-- HIDDEN INTERMEDIATE ROWS BLOCK]
//! ("1 thread" runs the rows in blocks of BLOCK rows, as the encoder does, best of 5
//! trials; default 60.) "bf16x3" and "bf16" are the split kernel f32 layers run on
//! AMX-BF16 with `f32_matmul` "high" and "medium" (figures count the f32 product's flops
//! once, not bf16x3's three tile products).
use std::time::Instant;

use streambed::embed::gemm::{par_forward, Epilogue, PackedLinear, RowLinear};
use streambed::embed::qlinear::QLinear;
use streambed::embed::split::{self, Products, SplitLinear};

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap())
        .collect();
    let (h, i, m) = (
        *args.first().unwrap_or(&384),
        *args.get(1).unwrap_or(&1536),
        *args.get(2).unwrap_or(&576),
    );
    let block = *args.get(3).unwrap_or(&60);
    println!(
        "isa {:?}, pool {} threads",
        streambed::embed::gemm::isa(),
        rayon::current_num_threads()
    );
    for (n, k) in [(3 * h, h), (i, h), (h, i)] {
        let w: Vec<f32> = (0..n * k)
            .map(|v| ((v * 7919) % 1000) as f32 / 1e4 - 0.05)
            .collect();
        let b = vec![0.1f32; n];
        let x: Vec<f32> = (0..m * k)
            .map(|v| ((v * 104729) % 1000) as f32 / 1e3 - 0.5)
            .collect();
        let f = PackedLinear::new(&w, &b, n, k);
        let q = QLinear::new(&w, &b, n, k);
        let flop = 2.0 * (m * n * k) as f64;
        let s3 = split::available().then(|| SplitLinear::new(&w, &b, n, k, Products::Three));
        let s1 = split::available().then(|| SplitLinear::new(&w, &b, n, k, Products::One));
        let mut kernels = vec![
            ("f32", &f as &dyn RowLinear),
            ("int8", &q as &dyn RowLinear),
        ];
        if let (Some(s3), Some(s1)) = (&s3, &s1) {
            kernels.insert(1, ("bf16x3", s3 as &dyn RowLinear));
            kernels.insert(2, ("bf16", s1 as &dyn RowLinear));
        }
        for (name, lin) in kernels {
            let mut out = vec![0f32; m * n];
            let reps = 4;
            // Best of 5 trials: these VMs drift ±30% within minutes, and the best is the
            // figure least disturbed by neighbours.
            let mut one = 0f64;
            for _ in 0..5 {
                let t = Instant::now();
                for _ in 0..reps {
                    // In row blocks, as the encoder schedules them (cpu::block_rows).
                    for r0 in (0..m).step_by(block) {
                        let rows = block.min(m - r0);
                        unsafe {
                            lin.run(
                                &x[r0 * k..],
                                rows,
                                out.as_mut_ptr().add(r0 * n),
                                &Epilogue::Bias,
                                0..lin.units(),
                            )
                        };
                    }
                }
                one = one.max(flop * reps as f64 / t.elapsed().as_secs_f64() / 1e9);
            }
            let reps = 20;
            let t = Instant::now();
            for _ in 0..reps {
                std::hint::black_box(par_forward(lin, &x, m, &Epilogue::Bias));
            }
            let all = flop * reps as f64 / t.elapsed().as_secs_f64() / 1e9;
            // Split by columns over all the rows, as the encoder runs layers whose
            // weights stream from memory (BERT-base f32, cpu::split_by_columns).
            let parts = 3 * rayon::current_num_threads();
            let t = Instant::now();
            for _ in 0..reps {
                unsafe { lin.run_split(&x, m, out.as_mut_ptr(), &Epilogue::Bias, parts) };
            }
            let cols = flop * reps as f64 / t.elapsed().as_secs_f64() / 1e9;
            println!("{name:>6} {m}x{k} -> {n}: 1 thread ({block}-row blocks) {one:.1} GFLOP/s (GOP/s), pool {all:.1}, pool by columns {cols:.1}");
        }
    }
}
