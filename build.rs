//! With the `cuda` feature, compiles src/embed/kernels.cu to PTX with nvcc (the PTX is
//! JIT-compiled by the driver on first use). Without it, does nothing.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/embed/kernels.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let status = std::process::Command::new("nvcc")
        .args(["--ptx", "-O3", &format!("-arch=compute_{cap}"), "-o"])
        .arg(out.join("kernels.ptx"))
        .arg("src/embed/kernels.cu")
        .status()
        .expect("the cuda feature needs nvcc on PATH (scripts/build-cuda.sh sets it up)");
    assert!(status.success(), "nvcc failed on src/embed/kernels.cu");
}
