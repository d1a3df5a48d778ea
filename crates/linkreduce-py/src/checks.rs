//! The checks of a call's values once they are Rust numbers: dtype and
//! algorithm names, counts, addresses, lengths, eps. Each says what was
//! wrong and what is accepted; `args` raises them as `ValueError`.
//!
//! This module uses neither PyO3 nor a GPU, so that its tests run as a
//! plain Rust test binary (`tests/checks.rs` includes this file): the
//! extension module itself cannot link one without libpython
//! (Cargo.toml). Keep it that way: no `crate::` paths, no `pyo3`.

use std::fmt;

use linkreduce::kernels::NORM_DTYPES;
use linkreduce::{Algorithm, AlgorithmChoice, CallOptions, DType, ScatterGather};

/// A value a call refuses, with the message `ValueError` carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid(pub String);

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub type Checked<T> = Result<T, Invalid>;

fn invalid<T>(message: String) -> Checked<T> {
    Err(Invalid(message))
}

/// The library's names (`f32`, `f16`, `bf16`) and the usual long ones.
pub fn dtype(text: &str) -> Checked<DType> {
    let lower = text.trim().to_ascii_lowercase();
    let name = match lower.as_str() {
        "float32" | "float" => "f32",
        "float16" | "half" => "f16",
        "bfloat16" => "bf16",
        other => other,
    };
    name.parse().map_err(|_| {
        Invalid(format!(
            "unknown dtype {text:?}: linkreduce reduces f32, f16 and bf16 (also written \
             float32, float16, bfloat16); reduce other types with torch.distributed or NCCL"
        ))
    })
}

/// `auto`, `nccl`, or one of the library's algorithm names.
pub fn algorithm(text: &str) -> Checked<AlgorithmChoice> {
    match text.trim().to_ascii_lowercase().as_str() {
        "auto" => return Ok(AlgorithmChoice::Auto),
        "nccl" => return Ok(AlgorithmChoice::Nccl),
        _ => {}
    }
    text.trim()
        .parse::<Algorithm>()
        .map(AlgorithmChoice::Force)
        .map_err(|message| Invalid(format!("{message} (or auto, nccl)")))
}

/// A count from Python's 64 bits as this machine's `usize`.
pub fn count(value: u64, name: &str) -> Checked<usize> {
    usize::try_from(value).map_err(|_| Invalid(format!("{name} does not fit this machine's usize")))
}

/// Bytes of `count` elements of `dtype`; `what` names them in the error.
fn bytes_of(count: usize, dtype: DType, what: &str) -> Checked<usize> {
    count.checked_mul(dtype.size()).ok_or_else(|| {
        Invalid(format!(
            "{what} of {count} {dtype} elements is more bytes than the address space holds"
        ))
    })
}

/// A buffer of `bytes` at `ptr`: not null when it holds anything, and not
/// running past the end of the address space.
fn span(name: &str, ptr: u64, elements: usize, bytes: usize) -> Checked<()> {
    if elements > 0 && ptr == 0 {
        return invalid(format!(
            "{name} is 0 (a null pointer) for {elements} elements; pass the device address of \
             the buffer (tensor.data_ptr())"
        ));
    }
    if ptr.checked_add(bytes as u64).is_none() {
        return invalid(format!(
            "{name} {ptr:#x} plus {bytes} bytes runs past the end of the address space"
        ));
    }
    Ok(())
}

/// An all-reduce call, checked.
#[derive(Debug, Clone, Copy)]
pub struct Call {
    pub dtype: DType,
    pub input: u64,
    pub output: u64,
    pub count: usize,
    pub bytes: usize,
    pub options: CallOptions,
}

impl Call {
    pub fn new(
        dtype: DType,
        (input, output): (u64, u64),
        count: usize,
        options: CallOptions,
    ) -> Checked<Call> {
        let bytes = bytes_of(count, dtype, "count")?;
        span("input_ptr", input, count, bytes)?;
        span("output_ptr", output, count, bytes)?;
        Ok(Call {
            dtype,
            input,
            output,
            count,
            bytes,
            options,
        })
    }
}

/// A fused all-reduce, residual add and RMSNorm, checked: `count`
/// elements of input, residual and output, rows of `hidden` elements, and
/// a weight of `hidden`.
#[derive(Debug, Clone, Copy)]
pub struct NormCall {
    pub dtype: DType,
    pub input: u64,
    pub residual: u64,
    pub out: u64,
    pub count: usize,
    pub weight: u64,
    pub hidden: usize,
    pub eps: f32,
    /// Bytes of the input: what the path choice goes by.
    pub bytes: usize,
    pub options: CallOptions,
}

impl NormCall {
    pub fn new(
        dtype: DType,
        (input, residual, out): (u64, u64, u64),
        count: usize,
        (weight, hidden): (u64, usize),
        eps: f64,
        options: CallOptions,
    ) -> Checked<NormCall> {
        if !NORM_DTYPES.contains(&dtype) {
            return invalid(format!(
                "the fused residual add and RMSNorm takes f16 and bf16 activations, not \
                 {dtype}; for {dtype}, all-reduce and normalise separately"
            ));
        }
        if hidden == 0 || count % hidden != 0 {
            return invalid(format!(
                "count {count} is not a whole number of rows of hidden = {hidden} elements; \
                 pass rows x hidden elements and a weight of hidden > 0 elements"
            ));
        }
        // Checked in f64 before narrowing: 1e39 is finite here, not in f32.
        let narrowed = eps as f32;
        if !(eps >= 0.0 && narrowed.is_finite()) {
            return invalid(format!(
                "eps is {eps}; RMSNorm needs a finite, non-negative eps (as an f32)"
            ));
        }
        let bytes = bytes_of(count, dtype, "count")?;
        span("input_ptr", input, count, bytes)?;
        span("residual_ptr", residual, count, bytes)?;
        span("out_ptr", out, count, bytes)?;
        // Only read when there are rows: an empty call may pass a null weight.
        let weight_elements = if count > 0 { hidden } else { 0 };
        span(
            "weight_ptr",
            weight,
            weight_elements,
            bytes_of(hidden, dtype, "hidden")?,
        )?;
        Ok(NormCall {
            dtype,
            input,
            residual,
            out,
            count,
            weight,
            hidden,
            eps: narrowed,
            bytes,
            options,
        })
    }
}

/// A reduce-scatter or all-gather, checked: `count` elements per rank's
/// block, the larger buffer `world_size` blocks (NCCL's layout).
#[derive(Debug, Clone, Copy)]
pub struct ScatterGatherCall {
    pub dtype: DType,
    pub send: u64,
    pub recv: u64,
    pub count: usize,
    /// Bytes of the larger buffer: what the path choice goes by.
    pub bytes: usize,
    pub options: CallOptions,
}

impl ScatterGatherCall {
    pub fn new(
        op: ScatterGather,
        dtype: DType,
        (send, recv): (u64, u64),
        (count, world_size): (usize, usize),
        options: CallOptions,
    ) -> Checked<ScatterGatherCall> {
        if world_size == 0 {
            return invalid("world_size must be at least 1".into());
        }
        let (block, larger) = match op {
            ScatterGather::ReduceScatter => ("recv_count", "send"),
            ScatterGather::AllGather => ("send_count", "recv"),
        };
        let block_bytes = bytes_of(count, dtype, block)?;
        let bytes = count
            .checked_mul(world_size)
            .and_then(|elements| bytes_of(elements, dtype, larger).ok())
            .ok_or_else(|| {
                Invalid(format!(
                    "{larger} holds {world_size} x {block} = {world_size} x {count} {dtype} \
                     elements, more bytes than the address space holds"
                ))
            })?;
        let elements = count * world_size;
        let (send_span, recv_span) = match op {
            ScatterGather::ReduceScatter => ((elements, bytes), (count, block_bytes)),
            ScatterGather::AllGather => ((count, block_bytes), (elements, bytes)),
        };
        span("send_ptr", send, send_span.0, send_span.1)?;
        span("recv_ptr", recv, recv_span.0, recv_span.1)?;
        Ok(ScatterGatherCall {
            dtype,
            send,
            recv,
            count,
            bytes,
            options,
        })
    }
}

/// A positive, finite number of seconds.
pub fn seconds(value: f64, name: &str) -> Checked<std::time::Duration> {
    if !(value.is_finite() && value > 0.0) {
        return invalid(format!(
            "{name} must be a positive number of seconds, got {value}"
        ));
    }
    std::time::Duration::try_from_secs_f64(value)
        .map_err(|_| Invalid(format!("{name}={value} is not a usable number of seconds")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const AUTO: CallOptions = CallOptions {
        algorithm: AlgorithmChoice::Auto,
        zero_copy: false,
        max_blocks: None,
    };

    fn message<T: fmt::Debug>(checked: Checked<T>) -> String {
        checked.expect_err("the check should refuse this").0
    }

    #[test]
    fn names_parse_long_and_short() {
        assert_eq!(dtype(" BFloat16 "), Ok(DType::BF16));
        assert_eq!(dtype("half"), Ok(DType::F16));
        assert!(message(dtype("int8")).contains("reduce other types with torch.distributed"));
        assert_eq!(algorithm("NCCL"), Ok(AlgorithmChoice::Nccl));
        assert_eq!(
            algorithm("two-stage"),
            Ok(AlgorithmChoice::Force(Algorithm::TwoStage))
        );
        assert!(message(algorithm("fastest")).ends_with("(or auto, nccl)"));
    }

    #[test]
    fn an_all_reduce_refuses_null_and_wrapping_buffers() {
        let call = Call::new(DType::F32, (16, 32), 10, AUTO).unwrap();
        assert_eq!(call.bytes, 40);
        assert_eq!(Call::new(DType::F16, (0, 0), 0, AUTO).unwrap().bytes, 0);
        assert!(message(Call::new(DType::F32, (0, 16), 1, AUTO)).starts_with("input_ptr is 0"));
        assert!(message(Call::new(DType::F32, (16, u64::MAX - 3,), 1, AUTO))
            .contains("runs past the end of the address space"));
        assert!(
            message(Call::new(DType::F32, (16, 16), usize::MAX / 2, AUTO))
                .contains("more bytes than the address space holds")
        );
    }

    fn norm(dtype: DType, count: usize, hidden: usize, eps: f64) -> Checked<NormCall> {
        NormCall::new(dtype, (64, 128, 256), count, (512, hidden), eps, AUTO)
    }

    #[test]
    fn a_fused_norm_takes_whole_rows_of_half_precision() {
        let call = norm(DType::BF16, 3 * 4095, 4095, 1e-6).unwrap();
        assert_eq!((call.bytes, call.eps), (3 * 4095 * 2, 1e-6_f32));
        assert!(message(norm(DType::F32, 8, 4, 1e-6)).contains("takes f16 and bf16"));
        assert!(message(norm(DType::F16, 10, 4, 1e-6)).contains("not a whole number of rows"));
        assert!(message(norm(DType::F16, 0, 0, 1e-6)).contains("hidden = 0"));
        for eps in [-1e-6, f64::NAN, f64::INFINITY, 1e39] {
            assert!(message(norm(DType::F16, 8, 4, eps)).contains("finite, non-negative eps"));
        }
        assert_eq!(norm(DType::F16, 8, 4, 0.0).unwrap().eps, 0.0);
    }

    #[test]
    fn a_fused_norm_names_the_buffer_that_is_wrong() {
        let call = |ptrs, weight| NormCall::new(DType::F16, ptrs, 8, (weight, 4), 1e-5, AUTO);
        assert!(message(call((64, 0, 256), 512)).starts_with("residual_ptr is 0"));
        assert!(message(call((64, 128, 0), 512)).starts_with("out_ptr is 0"));
        assert!(message(call((64, 128, 256), 0)).starts_with("weight_ptr is 0"));
        assert!(message(call((64, 128, 256), u64::MAX - 4)).starts_with("weight_ptr"));
        // No rows: nothing is read, so null addresses are fine.
        let empty = NormCall::new(DType::F16, (0, 0, 0), 0, (0, 4), 1e-5, AUTO);
        assert_eq!(empty.unwrap().bytes, 0);
        // A weight longer than the address space: an error, not a panic.
        let huge = NormCall::new(DType::F16, (0, 0, 0), 0, (0, 1 << 63), 1e-5, AUTO);
        assert!(message(huge).starts_with("hidden of"));
    }

    #[test]
    fn scatter_gather_sizes_the_larger_buffer_by_the_world() {
        let rs = ScatterGather::ReduceScatter;
        let ag = ScatterGather::AllGather;
        let call = ScatterGatherCall::new(rs, DType::BF16, (64, 128), (7, 4), AUTO).unwrap();
        assert_eq!((call.count, call.bytes), (7, 56));
        // The larger buffer is the reduce-scatter's send, the all-gather's
        // recv: only that one may not fit 4 blocks before the end.
        let end = u64::MAX - 20;
        assert!(ScatterGatherCall::new(rs, DType::F32, (64, end), (4, 4), AUTO).is_ok());
        assert!(message(ScatterGatherCall::new(
            rs,
            DType::F32,
            (end, 64),
            (4, 4),
            AUTO
        ))
        .starts_with("send_ptr"));
        assert!(message(ScatterGatherCall::new(
            ag,
            DType::F32,
            (64, end),
            (4, 4),
            AUTO
        ))
        .starts_with("recv_ptr"));
        assert!(message(ScatterGatherCall::new(
            ag,
            DType::F32,
            (64, 0),
            (1, 2),
            AUTO
        ))
        .starts_with("recv_ptr is 0"));
        assert!(message(ScatterGatherCall::new(
            ag,
            DType::F16,
            (64, 128),
            (usize::MAX / 4, 8),
            AUTO
        ))
        .contains("recv holds 8 x send_count"));
        assert!(message(ScatterGatherCall::new(
            rs,
            DType::F16,
            (64, 128),
            (1, 0),
            AUTO
        ))
        .contains("world_size must be at least 1"));
    }

    #[test]
    fn seconds_are_positive_and_finite() {
        assert_eq!(seconds(0.5, "t"), Ok(std::time::Duration::from_millis(500)));
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(message(seconds(bad, "timeout_s")).contains("positive number of seconds"));
        }
    }
}
