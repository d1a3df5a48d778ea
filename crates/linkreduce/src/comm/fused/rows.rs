//! The shape of a fused call and the buffers of its norm: the checks made
//! before anything is enqueued, and the kernels' view of each launch's rows
//! (docs/fused.md).

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kernels::{NormArgs, NORM_DTYPES, PACKET_BYTES};

/// The rows of one call: `rows` rows of `hidden` elements of `dtype`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Rows {
    pub(super) dtype: DType,
    pub(super) rows: usize,
    pub(super) hidden: usize,
}

impl Rows {
    /// Checks the lengths of a call's buffers against each other; `len` is
    /// the input's (or the sum's) length, `weight` the weight's.
    pub(super) fn of(
        dtype: DType,
        len: usize,
        residual: usize,
        weight: usize,
        out: usize,
    ) -> Result<Rows> {
        if !NORM_DTYPES.contains(&dtype) {
            return Err(Error::UnsupportedDType {
                op: "residual add and RMSNorm",
                dtype,
            });
        }
        if weight == 0 || len % weight != 0 {
            return Err(Error::RowLength {
                len,
                hidden: weight,
            });
        }
        for (what, other) in [("residual", residual), ("normed output", out)] {
            if other != len {
                return Err(Error::NormBufferLength {
                    what,
                    len: other,
                    expected: len,
                });
            }
        }
        Ok(Rows {
            dtype,
            rows: len / weight,
            hidden: weight,
        })
    }

    pub(super) fn elements(&self) -> usize {
        self.rows * self.hidden
    }

    pub(super) fn bytes(&self) -> usize {
        self.elements() * self.dtype.size()
    }

    pub(super) fn row_bytes(&self) -> usize {
        self.hidden * self.dtype.size()
    }

    /// The launches of a call cut into `per_launch` rows (at least one):
    /// each launch's first row and its rows.
    pub(super) fn launches(self, per_launch: usize) -> impl Iterator<Item = (usize, usize)> {
        (0..self.rows)
            .step_by(per_launch.max(1))
            .map(move |first| (first, per_launch.min(self.rows - first)))
    }
}

/// The buffers of the norm, as device addresses.
#[derive(Debug, Clone, Copy)]
pub(super) struct NormBuffers {
    pub(super) residual: u64,
    pub(super) weight: u64,
    pub(super) out: u64,
    pub(super) eps: f32,
}

impl NormBuffers {
    /// Refuses a bad eps and buffers that overlap where the kernels need
    /// them apart; `input` is the all-reduce's input or the plain
    /// kernel's sum, which may be the output only if `input_may_be_out`.
    pub(super) fn check(&self, rows: Rows, input: u64, input_may_be_out: bool) -> Result<()> {
        if !self.eps.is_finite() || self.eps < 0.0 {
            return Err(Error::InvalidEps(self.eps));
        }
        let bytes = rows.bytes() as u64;
        let weight_bytes = (rows.hidden * rows.dtype.size()) as u64;
        let buffers = [
            ("input", input, bytes),
            ("residual", self.residual, bytes),
            ("weight", self.weight, weight_bytes),
            ("normed output", self.out, bytes),
        ];
        for (i, &(first, a, a_len)) in buffers.iter().enumerate() {
            for &(second, b, b_len) in &buffers[i + 1..] {
                let overlap = a < b + b_len && b < a + a_len;
                let allowed = match (first, second) {
                    ("input", "weight") => true,
                    ("input", "normed output") => input_may_be_out && a == b,
                    _ => false,
                };
                if overlap && !allowed {
                    return Err(Error::BuffersOverlap { first, second });
                }
            }
        }
        Ok(())
    }

    /// The kernels' view of `rows` rows from row `first`.
    pub(super) fn args(
        &self,
        rows: Rows,
        first: usize,
        count: usize,
        sum: Option<u64>,
    ) -> NormArgs {
        let offset = (first * rows.row_bytes()) as u64;
        let per_pack = PACKET_BYTES / rows.dtype.size();
        let aligned = [self.residual, self.weight, self.out]
            .into_iter()
            .chain(sum)
            .all(|ptr| (ptr + offset) % PACKET_BYTES as u64 == 0);
        NormArgs {
            residual: self.residual + offset,
            weight: self.weight,
            out: self.out + offset,
            rows: count as u64,
            hidden: rows.hidden as u64,
            eps: self.eps,
            vector: u32::from(aligned && rows.hidden % per_pack == 0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_must_be_whole_and_buffers_as_long_as_the_input() {
        assert!(matches!(
            Rows::of(DType::F32, 8, 8, 4, 8),
            Err(Error::UnsupportedDType { .. })
        ));
        assert!(matches!(
            Rows::of(DType::BF16, 10, 10, 4, 10),
            Err(Error::RowLength { len: 10, hidden: 4 })
        ));
        assert!(matches!(
            Rows::of(DType::F16, 8, 8, 0, 8),
            Err(Error::RowLength { hidden: 0, .. })
        ));
        assert!(matches!(
            Rows::of(DType::F16, 8, 8, 4, 12),
            Err(Error::NormBufferLength {
                what: "normed output",
                len: 12,
                expected: 8
            })
        ));
        let rows = Rows::of(DType::BF16, 12, 12, 3, 12).unwrap();
        assert_eq!((rows.rows, rows.hidden, rows.bytes()), (4, 3, 24));
    }

    #[test]
    fn overlapping_buffers_and_bad_eps_are_refused() {
        let rows = Rows::of(DType::BF16, 64, 64, 16, 64).unwrap();
        let apart = NormBuffers {
            residual: 0x10000,
            weight: 0x20000,
            out: 0x30000,
            eps: 1e-6,
        };
        assert!(apart.check(rows, 0x40000, false).is_ok());
        // Reading the weight as input is harmless; the sum may be the output.
        assert!(apart.check(rows, 0x20000, false).is_ok());
        assert!(apart.check(rows, 0x30000, true).is_ok());
        assert!(matches!(
            apart.check(rows, 0x30000, false),
            Err(Error::BuffersOverlap {
                first: "input",
                second: "normed output"
            })
        ));
        let shifted = NormBuffers {
            out: 0x10000 + 64,
            ..apart
        };
        assert!(matches!(
            shifted.check(rows, 0x40000, false),
            Err(Error::BuffersOverlap {
                first: "residual",
                second: "normed output"
            })
        ));
        for eps in [-1.0, f32::NAN, f32::INFINITY] {
            let bad = NormBuffers { eps, ..apart };
            assert!(matches!(
                bad.check(rows, 0x40000, false),
                Err(Error::InvalidEps(_))
            ));
        }
    }

    #[test]
    fn whole_packets_only_where_every_buffer_and_row_allows() {
        let rows = Rows::of(DType::F16, 64, 64, 16, 64).unwrap();
        let buffers = NormBuffers {
            residual: 0x10000,
            weight: 0x20000,
            out: 0x30000,
            eps: 0.0,
        };
        assert_eq!(buffers.args(rows, 1, 2, None).vector, 1);
        assert_eq!(buffers.args(rows, 1, 2, None).residual, 0x10000 + 32);
        assert_eq!(buffers.args(rows, 0, 4, Some(0x40002)).vector, 0);
        let odd = Rows::of(DType::F16, 60, 60, 12, 60).unwrap();
        assert_eq!(buffers.args(odd, 0, 5, None).vector, 0);
    }
}
