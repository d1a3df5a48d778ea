//! Compiles every kernel variant of every program with NVRTC for the
//! architectures we ship for. Needs libnvrtc (CI installs the
//! `nvidia-cuda-nvrtc` wheel), not a GPU.

use linkreduce::kernels::{compile_cubin, Arch, Program};

fn cubin_defines(cubin: &[u8], symbol: &str) -> bool {
    let needle = format!("{symbol}\0");
    cubin
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

#[test]
fn every_kernel_variant_compiles_for_sm80_and_sm90() {
    // The disk cache would hide a compile failure behind an old CUBIN.
    std::env::set_var("LINKREDUCE_CACHE_DIR", "");
    for program in Program::ALL {
        for arch in [Arch { major: 8, minor: 0 }, Arch { major: 9, minor: 0 }] {
            let cubin = compile_cubin(program, arch)
                .unwrap_or_else(|e| panic!("{program:?} for {arch}: {e}"));
            assert!(cubin.starts_with(b"\x7fELF"), "{arch}: not an ELF CUBIN");
            let names = program.kernel_names();
            assert!(!names.is_empty());
            for name in names {
                assert!(cubin_defines(&cubin, &name), "{arch}: {name} missing");
            }
        }
    }
}
