//! The host's mirror of norm.cu's residual add and RMSNorm, bit for bit:
//! the reference the fused and plain kernels are checked against. Mirrors
//! `lr_add_rms_norm_row` and `lr_block_sum`; change them together
//! (docs/fused.md, "Rounding").

use super::values::{round_to, to_f32};
use crate::dtype::DType;
use crate::kernels::{PACKET_BYTES, THREADS_PER_BLOCK};

/// One row: adds `sum` into `residual` (in place, storage bits) and
/// returns `rmsnorm(residual) * weight` as storage bits.
pub fn add_rms_norm_row(
    dtype: DType,
    sum: &[u32],
    residual: &mut [u32],
    weight: &[u32],
    eps: f32,
) -> Vec<u32> {
    let per_pack = PACKET_BYTES / dtype.size();
    let threads = THREADS_PER_BLOCK as usize;
    // Thread t takes groups t, t + threads, ...: in element order, each
    // element's square goes to its group's thread.
    let mut squares = vec![0.0f32; threads];
    for (e, (r, s)) in residual.iter_mut().zip(sum).enumerate() {
        *r = round_to(dtype, to_f32(dtype, *r) + to_f32(dtype, *s));
        let x = to_f32(dtype, *r);
        let thread = &mut squares[(e / per_pack) % threads];
        *thread = x.mul_add(x, *thread);
    }
    let mean = block_sum(&squares) / residual.len() as f32;
    let inv_rms = 1.0 / (mean + eps).sqrt();
    residual
        .iter()
        .zip(weight)
        .map(|(&r, &w)| round_to(dtype, to_f32(dtype, r) * inv_rms * to_f32(dtype, w)))
        .collect()
}

/// `lr_block_sum`: a butterfly within each warp of 32, then the warps'
/// totals in warp order.
fn block_sum(values: &[f32]) -> f32 {
    let warps: Vec<f32> = values
        .chunks(32)
        .map(|lanes| {
            let mut v = lanes.to_vec();
            for offset in [16, 8, 4, 2, 1] {
                v = (0..v.len()).map(|i| v[i] + v[i ^ offset]).collect();
            }
            v[0]
        })
        .collect();
    warps.iter().skip(1).fold(warps[0], |total, w| total + w)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bf16(x: f32) -> u32 {
        round_to(DType::BF16, x)
    }

    #[test]
    fn a_row_adds_then_normalises() {
        // residual 1+1 = 2 and 3+1 = 4: mean of squares 10, rms sqrt(10).
        let mut residual = vec![bf16(1.0), bf16(3.0)];
        let out = add_rms_norm_row(
            DType::BF16,
            &[bf16(1.0), bf16(1.0)],
            &mut residual,
            &[bf16(1.0), bf16(0.5)],
            0.0,
        );
        assert_eq!(residual, vec![bf16(2.0), bf16(4.0)]);
        let inv = 1.0 / 10f32.sqrt();
        assert_eq!(out, vec![bf16(2.0 * inv), bf16(4.0 * inv * 0.5)]);
    }

    #[test]
    fn the_block_sum_follows_the_butterfly_then_warp_order() {
        // Equal values sum exactly, whatever the order.
        assert_eq!(block_sum(&[1.0; 512]), 512.0);
        // 2^24 then ones: added one by one, each one is lost (ties round to
        // even); the butterfly pairs the ones first and keeps all but one.
        let mut values = vec![1.0f32; 512];
        values[0] = 16_777_216.0;
        let butterfly_first = block_sum(&values);
        let sequential: f32 = values.iter().sum();
        assert_eq!(butterfly_first, 16_777_216.0 + 510.0);
        assert_eq!(sequential, 16_777_216.0);
    }
}
