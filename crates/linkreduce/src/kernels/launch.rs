//! How the all-reduce kernels (one-stage, two-stage, push) are launched:
//! through cudarc, or as programmatic dependent launches where a rank asked
//! for them and may have them (docs/design.md, "Programmatic dependent
//! launch"). The other kernels keep cudarc's launch.

use cudarc::driver::{CudaFunction, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg};

use super::THREADS_PER_BLOCK;
use crate::error::{Error, Result};

/// The first compute capability with `griddepcontrol`; the kernels compile
/// it only from there on (barrier.cu), so below it a programmatic launch
/// would let a kernel start before the previous one ends with nothing to
/// make it wait.
const FIRST_CAPABILITY: (i32, i32) = (9, 0);

/// The first driver (CUDA 12.3) whose graphs hold programmatic edges, so
/// that a captured call keeps its launch as an eager one does.
const FIRST_DRIVER: i32 = 12030;

/// Whether a rank launches its all-reduce kernels programmatically: where
/// `wanted` (Config::wants_programmatic_launch), on a GPU of `capability`
/// with a driver of `driver` (1000 * major + 10 * minor) that allow it, in
/// a group where no ranks share a GPU. A refusal is logged with its reason.
/// Each rank decides from its own GPU; ranks that decide differently still
/// meet alike, since the launch changes only when a kernel may start,
/// never what it does with its peers.
pub(crate) fn programmatic_launch(
    wanted: bool,
    capability: (i32, i32),
    driver: i32,
    shares_gpu: bool,
) -> bool {
    if !wanted {
        return false;
    }
    let refused = refusal(capability, driver, shares_gpu);
    if let Some(why) = &refused {
        tracing::warn!("programmatic launches were asked for but stay off: {why}");
    }
    refused.is_none()
}

/// Why a rank that asked for programmatic launches does not get them, or
/// None where it does.
fn refusal(capability: (i32, i32), driver: i32, shares_gpu: bool) -> Option<String> {
    if capability < FIRST_CAPABILITY {
        return Some(format!(
            "the GPU is sm_{}{}; programmatic launches need sm_90 or newer",
            capability.0, capability.1
        ));
    }
    if driver < FIRST_DRIVER {
        return Some(format!(
            "the driver supports CUDA {}.{}; programmatic launches need 12.3 or newer",
            driver / 1000,
            driver % 1000 / 10
        ));
    }
    // A rank's next kernel, launched early, holds SMs while it waits; its
    // co-tenant's blocks, which this rank's kernel waits for, might then
    // find no room (docs/design.md, "Ranks sharing a GPU").
    shares_gpu.then(|| "ranks share a GPU".to_string())
}

/// Launches an all-reduce kernel of `blocks` blocks with its one parameter
/// `arg` on `stream`: programmatically where `programmatic`, else as
/// before, through cudarc.
///
/// # Safety
/// `function` must take exactly one parameter, laid out as `T`, and the
/// memory it touches must stay valid until `stream` reaches it. Where
/// `programmatic`, it must wait for the previous kernel before reading
/// anything (the all-reduce kernels call `lr_wait_for_previous_kernel`
/// first) and run on a GPU and driver that
/// [`programmatic_launch`] accepts.
pub(crate) unsafe fn launch<T: DeviceRepr>(
    stream: &CudaStream,
    function: &CudaFunction,
    blocks: u32,
    arg: &T,
    programmatic: bool,
) -> Result<()> {
    if programmatic {
        stream
            .context()
            .bind_to_thread()
            .map_err(Error::driver("cuCtxSetCurrent"))?;
        // SAFETY: the caller vouches for the function, its parameter, its
        // memory and its wait; the stream's context is current (above).
        return unsafe {
            crate::driver::launch_programmatic(
                function.cu_function(),
                stream.cu_stream(),
                (blocks, THREADS_PER_BLOCK),
                arg,
            )
        }
        .map_err(Error::driver("cuLaunchKernelEx"));
    }
    let config = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS_PER_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut launch = stream.launch_builder(function);
    launch.arg(arg);
    // SAFETY: the caller vouches for the function, its parameter and its
    // memory.
    unsafe { launch.launch(config) }
        .map(|_| ())
        .map_err(Error::driver("cuLaunchKernel"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programmatic_launches_need_sm90_a_12_3_driver_and_a_gpu_per_rank() {
        let on = |capability, driver, shares| programmatic_launch(true, capability, driver, shares);
        for capability in [(9, 0), (10, 0), (12, 1)] {
            assert!(on(capability, 13000, false), "{capability:?}");
            assert!(on(capability, 12030, false), "{capability:?}");
            assert!(
                !programmatic_launch(false, capability, 13000, false),
                "only where asked for"
            );
        }
        for capability in [(8, 0), (8, 9), (7, 0)] {
            assert!(!on(capability, 13000, false), "{capability:?}");
        }
        assert!(!on((9, 0), 12020, false));
        assert!(!on((9, 0), 13000, true));
        assert_eq!(
            refusal((8, 6), 13000, false).as_deref(),
            Some("the GPU is sm_86; programmatic launches need sm_90 or newer")
        );
        assert_eq!(
            refusal((9, 0), 12020, false).as_deref(),
            Some("the driver supports CUDA 12.2; programmatic launches need 12.3 or newer")
        );
        assert_eq!(
            refusal((9, 0), 13000, true).as_deref(),
            Some("ranks share a GPU")
        );
    }

    /// The PTX of `arch` (e.g. compute_90) of the all-reduce program.
    fn ptx(arch: &'static str) -> String {
        let options = cudarc::nvrtc::CompileOptions {
            options: vec!["--std=c++17".into(), "-default-device".into()],
            arch: Some(arch),
            ..Default::default()
        };
        cudarc::nvrtc::compile_ptx_with_opts(super::super::Program::AllReduce.source(), options)
            .unwrap_or_else(|e| panic!("{arch}: {e}"))
            .to_src()
            .to_string()
    }

    /// Each kernel's PTX, by name.
    fn entries(ptx: &str) -> Vec<(&str, &str)> {
        ptx.split(".entry ")
            .skip(1)
            .map(|body| (body.split('(').next().unwrap_or_default(), body))
            .collect()
    }

    /// On sm_90 every all-reduce kernel waits for the previous kernel
    /// before any access to memory but its parameters, and may let the
    /// next one launch; below sm_90 neither is compiled. Needs NVRTC, as
    /// tests/compile_kernels.rs does.
    #[test]
    fn all_reduce_kernels_wait_for_the_previous_kernel_before_touching_memory() {
        let kernels = [
            "linkreduce_one_stage_",
            "linkreduce_two_stage_",
            "linkreduce_push_",
            "linkreduce_chunked_push_",
        ];
        let sm90 = ptx("compute_90");
        let mut checked = 0;
        for (name, body) in entries(&sm90) {
            if !kernels.iter().any(|k| name.starts_with(k)) {
                continue;
            }
            let wait = body
                .find("griddepcontrol.wait")
                .unwrap_or_else(|| panic!("{name} does not wait"));
            let touches_memory = body[..wait].lines().map(str::trim).any(|line| {
                ["ld.", "st.", "atom.", "red."]
                    .iter()
                    .any(|op| line.starts_with(op))
                    && !line.starts_with("ld.param")
            });
            assert!(!touches_memory, "{name} touches memory before it waits");
            assert!(
                body.contains("griddepcontrol.launch_dependents"),
                "{name} never lets the next kernel launch"
            );
            checked += 1;
        }
        assert_eq!(checked, super::super::all_kernel_names().len());
        assert!(!ptx("compute_80").contains("griddepcontrol"));
    }

    /// No kernel's PTX uses local memory: a per-thread array indexed at
    /// run time (a partial packet's lanes, once) ends up there, one more
    /// memory round trip on a path meant to be at the floor. Spills that
    /// ptxas adds later are not seen here; `linkreduce info` prints each
    /// kernel's local bytes on the GPU.
    #[test]
    fn no_kernel_uses_local_memory() {
        for (name, body) in entries(&ptx("compute_90")) {
            let local = body.matches("ld.local").count() + body.matches("st.local").count();
            assert_eq!(local, 0, "{name} uses local memory");
        }
    }
}
