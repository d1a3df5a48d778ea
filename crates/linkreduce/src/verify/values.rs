//! The host's copy of the data that check.cu generates, and the reference
//! sum: for spot checks of the device checker and for reporting what a
//! wrong element should have been. Mirrors check.cu bit for bit; change
//! both together.

use crate::dtype::DType;

/// splitmix64's finaliser (check.cu `lr_mix`).
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The f32 bits of element `index` of `rank`'s input before rounding to the
/// element type (check.cu `lr_value_bits`).
pub fn value_bits(seed: u64, rank: u32, index: u64) -> u32 {
    let h = mix(seed ^ mix((u64::from(rank) << 56) ^ index));
    let sign = ((h >> 63) as u32) << 31;
    match (h >> 52) & 63 {
        0 => sign,
        1 => 0x8000_8000,
        _ => {
            let exponent = 119 + ((h >> 32) % 18) as u32;
            sign | exponent << 23 | (h as u32 & 0x7f_ffff)
        }
    }
}

/// An f32 rounded to `dtype`'s storage bits, to nearest even.
pub fn round_to(dtype: DType, value: f32) -> u32 {
    match dtype {
        DType::F32 => value.to_bits(),
        DType::F16 => u32::from(half::f16::from_f32(value).to_bits()),
        DType::BF16 => u32::from(half::bf16::from_f32(value).to_bits()),
    }
}

/// Storage bits of `dtype` as f32 (exact).
pub fn to_f32(dtype: DType, bits: u32) -> f32 {
    match dtype {
        DType::F32 => f32::from_bits(bits),
        DType::F16 => half::f16::from_bits(bits as u16).to_f32(),
        DType::BF16 => half::bf16::from_bits(bits as u16).to_f32(),
    }
}

/// Element `index` of `rank`'s input, as `dtype` storage bits.
pub fn input_bits(dtype: DType, seed: u64, rank: u32, index: u64) -> u32 {
    round_to(dtype, f32::from_bits(value_bits(seed, rank, index)))
}

/// What push sends for an element: its marker value rewritten (-0.0 in
/// f16 and bf16 becomes +0.0; the f32 pattern 0x80008000 becomes -0.0).
pub fn unmarked(dtype: DType, bits: u32) -> u32 {
    match (dtype, bits) {
        (DType::F32, 0x8000_8000) => 0x8000_0000,
        (DType::F16 | DType::BF16, 0x8000) => 0,
        _ => bits,
    }
}

/// The reference for element `index` of a `world`-rank all-reduce: every
/// rank's input summed in f32 in rank order and rounded once (with push's
/// marker rewritten first where `push`).
pub fn sum_bits(dtype: DType, seed: u64, world: u32, index: u64, push: bool) -> u32 {
    let mut sum = 0.0f32;
    for rank in 0..world {
        let mut bits = input_bits(dtype, seed, rank, index);
        if push {
            bits = unmarked(dtype, bits);
        }
        let value = to_f32(dtype, bits);
        sum = if rank == 0 { value } else { sum + value };
    }
    round_to(dtype, sum)
}

/// A small integer in -16..=16 for (seed, rank, index): sums of up to 8 are
/// exact in every dtype and in any order, so results of implementations
/// that sum in another order (NCCL) can be checked too. For benchmarks;
/// correctness runs use [`value_bits`].
pub fn small_integer(seed: u64, rank: usize, index: usize) -> f64 {
    let h = mix(seed ^ mix(((rank as u64) << 56) ^ index as u64));
    (h % 33) as f64 - 16.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_mix_signs_magnitudes_zeros_and_the_push_marker() {
        let values: Vec<f32> = (0..4096)
            .map(|i| f32::from_bits(value_bits(3, 1, i)))
            .collect();
        assert!(values.iter().any(|v| *v < 0.0) && values.iter().any(|v| *v > 0.0));
        assert!(values.iter().any(|v| v.abs() < 0.01) && values.iter().any(|v| v.abs() > 100.0));
        assert!(values.iter().any(|v| v.fract() != 0.0));
        let zeros = values
            .iter()
            .filter(|v| **v == 0.0 && v.to_bits() != 0x8000_8000);
        assert!(zeros.clone().any(|v| v.is_sign_negative()));
        assert!(zeros.clone().any(|v| v.is_sign_positive()));
        assert!(values.iter().any(|v| v.to_bits() == 0x8000_8000));
        assert!(values.iter().all(|v| v.is_finite() && v.abs() < 1024.0));
        assert_ne!(value_bits(3, 1, 5), value_bits(3, 2, 5), "ranks differ");
        assert_ne!(value_bits(3, 1, 5), value_bits(4, 1, 5), "seeds differ");
    }

    #[test]
    fn small_integers_vary_within_range() {
        let values: Vec<f64> = (0..1000).map(|i| small_integer(7, 3, i)).collect();
        assert!(values.iter().all(|v| v.fract() == 0.0 && v.abs() <= 16.0));
        assert!(values.iter().any(|v| *v != values[0]));
        assert_ne!(small_integer(7, 3, 5), small_integer(7, 4, 5));
    }

    #[test]
    fn the_marker_pattern_rounds_to_negative_zero_in_16_bit_types() {
        let marker = f32::from_bits(0x8000_8000);
        assert_eq!(round_to(DType::F16, marker), 0x8000);
        assert_eq!(round_to(DType::BF16, marker), 0x8000);
        assert_eq!(unmarked(DType::F16, 0x8000), 0);
        assert_eq!(unmarked(DType::F32, 0x8000_8000), 0x8000_0000);
        assert_eq!(unmarked(DType::BF16, 0x3f80), 0x3f80);
    }

    #[test]
    fn sums_round_once_in_rank_order() {
        // A lone -0.0 keeps its sign; push turns it into +0.0.
        let seed = (0..u64::MAX)
            .find(|&s| value_bits(s, 0, 0) == 0x8000_0000 && value_bits(s, 1, 0) == 0x8000_0000)
            .unwrap();
        assert_eq!(sum_bits(DType::BF16, seed, 2, 0, false), 0x8000);
        assert_eq!(sum_bits(DType::BF16, seed, 2, 0, true), 0);
        // Otherwise the sum is the plain f32 sum in rank order.
        for index in 0..64 {
            let expected: f32 = (0..4)
                .map(|r| f32::from_bits(value_bits(9, r, index)))
                .fold(None, |sum: Option<f32>, v| Some(sum.map_or(v, |s| s + v)))
                .unwrap();
            assert_eq!(sum_bits(DType::F32, 9, 4, index, false), expected.to_bits());
        }
    }
}
