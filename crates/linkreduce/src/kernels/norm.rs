//! Host side of norm.cu and fused.cu: residual add and RMSNorm, plain and
//! fused with the all-reduce (docs/fused.md).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaFunction, DeviceRepr};

use super::load::{load_once, Cache, StreamsPeers};
use super::{AllReduceArgs, PushArgs, WORLD_SIZES};
use crate::dtype::DType;
use crate::error::Result;

/// The activation dtypes the norm kernels are instantiated for.
pub const NORM_DTYPES: [DType; 2] = [DType::F16, DType::BF16];

/// The kernels of norm.cu and fused.cu.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NormKernel {
    /// Residual add and RMSNorm of an all-reduce's output (no peers).
    Plain,
    /// One-stage all-reduce, residual add and RMSNorm in one kernel.
    FusedOneStage,
    /// Push all-reduce, residual add and RMSNorm in one kernel.
    FusedPush,
    /// Two-stage all-reduce, residual add and RMSNorm in one kernel.
    FusedTwoStage,
}

impl NormKernel {
    pub const ALL: [NormKernel; 4] = [
        NormKernel::Plain,
        NormKernel::FusedOneStage,
        NormKernel::FusedPush,
        NormKernel::FusedTwoStage,
    ];

    /// The symbol of this kernel for `dtype` and `world_size` (which the
    /// plain kernel ignores).
    pub fn symbol(self, dtype: DType, world_size: usize) -> String {
        match self {
            NormKernel::Plain => format!("linkreduce_add_rms_norm_{}", dtype.name()),
            NormKernel::FusedOneStage => format!(
                "linkreduce_fused_norm_one_stage_{}_w{world_size}",
                dtype.name()
            ),
            NormKernel::FusedPush => {
                format!("linkreduce_fused_norm_push_{}_w{world_size}", dtype.name())
            }
            NormKernel::FusedTwoStage => format!(
                "linkreduce_fused_norm_two_stage_{}_w{world_size}",
                dtype.name()
            ),
        }
    }

    /// Whether the kernel waits for its peers (at barriers, or for pushed
    /// data): then every rank's grid must stay resident, so it counts in
    /// the grid limit.
    pub fn meets_peers(self) -> bool {
        self != NormKernel::Plain
    }
}

/// Every symbol norm.cu and fused.cu define.
pub fn norm_kernel_names() -> Vec<String> {
    let mut names = Vec::new();
    for dtype in NORM_DTYPES {
        names.push(NormKernel::Plain.symbol(dtype, 0));
        for world_size in WORLD_SIZES {
            for fused in NormKernel::ALL
                .into_iter()
                .filter(|kind| kind.meets_peers())
            {
                names.push(fused.symbol(dtype, world_size));
            }
        }
    }
    names
}

/// One world size's norm kernels in one context.
pub(crate) type NormKernels = HashMap<(NormKernel, DType), CudaFunction>;

/// This world size's norm kernels in `ctx`, looked up once per process.
pub(crate) fn load_norm_kernels(
    ctx: &Arc<CudaContext>,
    world_size: usize,
) -> Result<Arc<NormKernels>> {
    static LOADED: Cache<(NormKernel, DType)> = Mutex::new(BTreeMap::new());
    let names = NormKernel::ALL
        .into_iter()
        .flat_map(|kind| NORM_DTYPES.map(|dtype| ((kind, dtype), kind.symbol(dtype, world_size))));
    load_once(&LOADED, ctx, world_size, names, StreamsPeers::No)
}

/// Mirrors `NormArgs` of norm.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct NormArgs {
    pub residual: u64,
    pub weight: u64,
    pub out: u64,
    pub rows: u64,
    pub hidden: u64,
    pub eps: f32,
    /// 1 where whole packets may be moved (norm.cu says when).
    pub vector: u32,
}

/// Mirrors `AddRmsNormArgs`: the plain kernel's only parameter.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct AddRmsNormArgs {
    pub sum: u64,
    pub norm: NormArgs,
}

// SAFETY: plain-old-data with the layout of the C struct `AddRmsNormArgs`
// (repr(C), integers and one f32; layout checked by the test below).
unsafe impl DeviceRepr for AddRmsNormArgs {}

/// Mirrors `FusedNormArgs`: the fused kernels' only parameter.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct FusedNormArgs {
    pub all_reduce: AllReduceArgs,
    pub norm: NormArgs,
}

// SAFETY: plain-old-data with the layout of the C struct `FusedNormArgs`
// (repr(C), integers and one f32; layout checked by the test below).
unsafe impl DeviceRepr for FusedNormArgs {}

/// Mirrors `FusedPushArgs`: the fused push kernels' only parameter.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct FusedPushArgs {
    pub push: PushArgs,
    pub norm: NormArgs,
}

// SAFETY: plain-old-data with the layout of the C struct `FusedPushArgs`
// (repr(C), integers and one f32; layout checked by the test below).
unsafe impl DeviceRepr for FusedPushArgs {}

#[cfg(test)]
mod tests {
    use std::mem::{offset_of, size_of};

    use super::super::Program;
    use super::*;

    #[test]
    fn host_mirrors_have_the_c_layout() {
        assert_eq!(size_of::<NormArgs>(), 48);
        assert_eq!(
            [
                offset_of!(NormArgs, rows),
                offset_of!(NormArgs, eps),
                offset_of!(NormArgs, vector)
            ],
            [24, 40, 44]
        );
        assert_eq!(size_of::<AddRmsNormArgs>(), 56);
        assert_eq!(offset_of!(AddRmsNormArgs, norm), 8);
        assert_eq!(size_of::<FusedNormArgs>(), 176);
        assert_eq!(offset_of!(FusedNormArgs, norm), 128);
        assert_eq!(
            offset_of!(FusedPushArgs, norm),
            size_of::<super::super::PushArgs>()
        );
        assert_eq!(
            size_of::<FusedPushArgs>(),
            size_of::<super::super::PushArgs>() + 48
        );
    }

    #[test]
    fn the_source_defines_every_norm_kernel() {
        let source = Program::AllReduce.source();
        assert!(source.contains("linkreduce_add_rms_norm_##NAME("));
        assert!(source.contains("linkreduce_fused_norm_one_stage_##NAME##_w##W("));
        assert!(source.contains("linkreduce_fused_norm_push_##NAME##_w##W("));
        assert!(source.contains("linkreduce_fused_norm_two_stage_##NAME##_w##W("));
        for dtype in NORM_DTYPES {
            assert!(source.contains(&format!("LR_NORM_KERNEL({}, ", dtype.name())));
            assert!(source.contains(&format!(
                "LR_FOR_WORLDS(LR_FUSED_KERNELS, {},",
                dtype.name()
            )));
        }
        assert_eq!(norm_kernel_names().len(), 2 * (1 + 3 * 7));
        assert_eq!(
            NormKernel::FusedOneStage.symbol(DType::BF16, 3),
            "linkreduce_fused_norm_one_stage_bf16_w3"
        );
    }
}
