//! Run-time compilation of the kernels with NVRTC, cached in memory (once per
//! process and architecture) and on disk (across processes).
//!
//! The disk cache key covers everything that changes the CUBIN: the source,
//! the options, the architecture and the NVRTC version. Set
//! `LINKREDUCE_CACHE_DIR` to move the cache; set it to an empty string to
//! turn the disk cache off.

use std::collections::HashMap;
use std::ffi::{c_char, CString};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys};
use sha2::{Digest, Sha256};

use super::Program;
use crate::error::{Error, Result};

/// A GPU architecture, as compute capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Arch {
    pub major: u32,
    pub minor: u32,
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sm_{}{}", self.major, self.minor)
    }
}

/// NVRTC options; the architecture is added per compile.
const BASE_OPTIONS: &[&str] = &["--std=c++17", "-default-device"];

fn options(arch: Arch) -> Vec<String> {
    let mut options: Vec<String> = BASE_OPTIONS.iter().map(|s| s.to_string()).collect();
    options.push(format!("--gpu-architecture={arch}"));
    options
}

fn ensure_nvrtc() -> Result<()> {
    // SAFETY: only tries to dlopen the library by its candidate names.
    if unsafe { nvrtc_sys::is_culib_present() } {
        Ok(())
    } else {
        Err(Error::NvrtcNotFound)
    }
}

/// NVRTC's version as (major, minor).
pub fn nvrtc_version() -> Result<(i32, i32)> {
    ensure_nvrtc()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present (checked above); both out-pointers are
    // valid for writes.
    unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| nvrtc_failure(Arch { major: 0, minor: 0 }, &[], e))?;
    Ok((major, minor))
}

/// The CUBIN of `program`'s kernels for `arch`, compiled on first use.
pub fn compile_cubin(program: Program, arch: Arch) -> Result<Arc<Vec<u8>>> {
    type Compiled = HashMap<(Program, Arch), Arc<Vec<u8>>>;
    static COMPILED: OnceLock<Mutex<Compiled>> = OnceLock::new();
    let compiled = COMPILED.get_or_init(Default::default);
    // Holding the lock while compiling makes concurrent ranks wait for one
    // compile instead of each running their own.
    let mut compiled = compiled.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(cubin) = compiled.get(&(program, arch)) {
        return Ok(cubin.clone());
    }
    let options = options(arch);
    let key = cache_key(&program.source(), arch, &options, nvrtc_version()?);
    let cache = cache_dir().map(|dir| dir.join(format!("{key}.cubin")));
    let cubin = match cache.as_deref().and_then(|path| std::fs::read(path).ok()) {
        Some(cubin) => cubin,
        None => {
            let cubin = run_nvrtc(program, arch, &options)?;
            if let Some(path) = &cache {
                store(path, &cubin);
            }
            cubin
        }
    };
    let cubin = Arc::new(cubin);
    compiled.insert((program, arch), cubin.clone());
    Ok(cubin)
}

fn cache_key(source: &str, arch: Arch, options: &[String], nvrtc: (i32, i32)) -> String {
    let mut hash = Sha256::new();
    for part in [source, &options.join(" "), &arch.to_string()] {
        hash.update(part.as_bytes());
        hash.update([0u8]);
    }
    hash.update(format!("nvrtc {}.{}", nvrtc.0, nvrtc.1).as_bytes());
    hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn cache_dir() -> Option<PathBuf> {
    cache_dir_from(|name| std::env::var_os(name))
}

fn cache_dir_from(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> Option<PathBuf> {
    if let Some(dir) = var("LINKREDUCE_CACHE_DIR") {
        return (!dir.is_empty()).then(|| PathBuf::from(dir));
    }
    if let Some(dir) = var("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("linkreduce"));
    }
    var("HOME")
        .filter(|d| !d.is_empty())
        .map(|home| PathBuf::from(home).join(".cache").join("linkreduce"))
}

/// Writes through a temporary file and a rename so that a concurrent reader
/// never sees half a CUBIN. A cache that cannot be written only costs time.
fn store(path: &Path, cubin: &[u8]) {
    let attempt = || -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, cubin)?;
        std::fs::rename(&tmp, path)
    };
    if let Err(error) = attempt() {
        tracing::warn!(
            "could not write the kernel cache {}: {error}",
            path.display()
        );
    }
}

fn nvrtc_failure(arch: Arch, options: &[String], error: nvrtc::NvrtcError) -> Error {
    Error::Compile {
        arch: arch.to_string(),
        options: options.to_vec(),
        log: format!("{error}"),
    }
}

/// Owns an NVRTC program and destroys it on every path.
struct NvrtcProgram(nvrtc_sys::nvrtcProgram);

impl Drop for NvrtcProgram {
    fn drop(&mut self) {
        // SAFETY: the handle came from nvrtcCreateProgram and is destroyed once.
        let _ = unsafe { nvrtc::destroy_program(self.0) };
    }
}

fn run_nvrtc(program: Program, arch: Arch, options: &[String]) -> Result<Vec<u8>> {
    ensure_nvrtc()?;
    let fail = |e| nvrtc_failure(arch, options, e);
    let source = CString::new(program.source()).map_err(|_| Error::Compile {
        arch: arch.to_string(),
        options: options.to_vec(),
        log: "the kernel source contains a NUL byte".into(),
    })?;
    let program =
        NvrtcProgram(nvrtc::create_program(&source, Some(program.file_name())).map_err(fail)?);
    // SAFETY: `program` is a live program; the options are plain strings
    // without NUL bytes (built above from ASCII).
    let compiled = unsafe { nvrtc::compile_program(program.0, options) };
    if let Err(error) = compiled {
        // SAFETY: `program` is live; the log is NUL-terminated by NVRTC.
        let log = unsafe { nvrtc::get_program_log(program.0) }
            .map(|chars| c_chars_to_string(&chars))
            .unwrap_or_else(|e| format!("{error} (no log: {e})"));
        return Err(Error::Compile {
            arch: arch.to_string(),
            options: options.to_vec(),
            log,
        });
    }
    let mut size = 0usize;
    // SAFETY: `program` compiled successfully; `size` is valid for writes.
    unsafe { nvrtc_sys::nvrtcGetCUBINSize(program.0, &mut size) }
        .result()
        .map_err(fail)?;
    let mut cubin = vec![0u8; size];
    // SAFETY: `cubin` holds exactly the size NVRTC reported.
    unsafe { nvrtc_sys::nvrtcGetCUBIN(program.0, cubin.as_mut_ptr() as *mut c_char) }
        .result()
        .map_err(fail)?;
    Ok(cubin)
}

fn c_chars_to_string(chars: &[c_char]) -> String {
    let bytes: Vec<u8> = chars
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    #[test]
    fn cache_key_changes_with_every_input() {
        let sm90 = Arch { major: 9, minor: 0 };
        let sm80 = Arch { major: 8, minor: 0 };
        let source = Program::AllReduce.source();
        let base = cache_key(&source, sm90, &options(sm90), (13, 0));
        assert_eq!(base, cache_key(&source, sm90, &options(sm90), (13, 0)));
        assert_ne!(base, cache_key(&source, sm80, &options(sm90), (13, 0)));
        assert_ne!(base, cache_key(&source, sm90, &options(sm80), (13, 0)));
        assert_ne!(base, cache_key(&source, sm90, &options(sm90), (13, 1)));
        let check = Program::Check.source();
        assert_ne!(base, cache_key(&check, sm90, &options(sm90), (13, 0)));
        assert_eq!(base.len(), 64);
    }

    #[test]
    fn cache_dir_prefers_the_override_then_xdg_then_home() {
        fn vars<'a>(pairs: &'a [(&str, &str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| OsString::from(v))
            }
        }
        let all = [
            ("LINKREDUCE_CACHE_DIR", "/a"),
            ("XDG_CACHE_HOME", "/x"),
            ("HOME", "/h"),
        ];
        assert_eq!(cache_dir_from(vars(&all)), Some(PathBuf::from("/a")));
        assert_eq!(
            cache_dir_from(vars(&[("XDG_CACHE_HOME", "/x"), ("HOME", "/h")])),
            Some(PathBuf::from("/x/linkreduce"))
        );
        assert_eq!(
            cache_dir_from(vars(&[("HOME", "/h")])),
            Some(PathBuf::from("/h/.cache/linkreduce"))
        );
        assert_eq!(
            cache_dir_from(vars(&[("LINKREDUCE_CACHE_DIR", ""), ("HOME", "/h")])),
            None
        );
    }
}
