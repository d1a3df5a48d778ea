//! What the GPU test binaries share.

use linkreduce::memory::device_count;

/// Whether the run must fail instead of skipping when no GPU is usable (set
/// on the GPU machine).
pub fn gpu_required() -> bool {
    std::env::var("LINKREDUCE_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

/// The number of visible GPUs, or None (after saying why) when the test
/// must skip.
pub fn gpus() -> Option<usize> {
    match device_count() {
        Ok(count) => Some(count),
        Err(error) => {
            assert!(
                !gpu_required(),
                "LINKREDUCE_REQUIRE_GPU=1 but no GPU: {error}"
            );
            eprintln!("skipping GPU test: {error}");
            None
        }
    }
}
