//! Small helpers shared by commands, stages and benchmarks.

/// Peak resident set size of this process in MiB (Linux `VmHWM`), 0 where unknown.
pub fn peak_rss_mb() -> f64 {
    proc_status_kb("VmHWM:") as f64 / 1024.0
}

/// Current resident set size in MiB (Linux `VmRSS`), 0 where unknown.
pub fn rss_mb() -> f64 {
    proc_status_kb("VmRSS:") as f64 / 1024.0
}

fn proc_status_kb(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// The value at quantile `q` (0..=1) of `sorted` (ascending); 0 for an empty slice.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Runs blocking work from async code without stalling a runtime worker: `block_in_place`
/// on a multi-threaded runtime (the other tasks move to other workers; order is kept
/// because the caller waits), directly elsewhere (a plain thread, a test runtime).
pub fn blocking_here<T>(f: impl FnOnce() -> T) -> T {
    let in_runtime = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if in_runtime {
        tokio::task::block_in_place(f)
    } else {
        f()
    }
}
