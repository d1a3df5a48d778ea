//! The argument checks of the Python bindings (src/checks.rs), as a plain
//! Rust test binary: the extension module cannot link one without
//! libpython (Cargo.toml), but this module uses neither PyO3 nor a GPU.

// The bindings read the checked calls' fields; this binary only tests the
// checks.
#[allow(dead_code)]
#[path = "../src/checks.rs"]
mod checks;
