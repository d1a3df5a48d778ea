//! Python arguments into Rust types. Every check that needs no GPU happens
//! here, before a call reaches the library, and raises `ValueError` (a bad
//! value) or `TypeError` (not an int) with what was wrong and what is
//! accepted. This module takes the values out of Python objects; `checks`
//! judges them.

use linkreduce::{CallOptions, Config, ScatterGather};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyInt;

use crate::checks::{self, Call, Invalid, NormCall, ScatterGatherCall};

impl From<Invalid> for PyErr {
    fn from(invalid: Invalid) -> PyErr {
        PyValueError::new_err(invalid.0)
    }
}

/// The options every collective takes.
fn options(algorithm: &str, zero_copy: bool) -> PyResult<CallOptions> {
    Ok(CallOptions {
        algorithm: checks::algorithm(algorithm)?,
        zero_copy,
        max_blocks: None,
    })
}

fn address(value: &Bound<'_, PyAny>, name: &str) -> PyResult<u64> {
    non_negative(value, name, "a device address")
}

fn element_count(value: &Bound<'_, PyAny>, name: &str) -> PyResult<usize> {
    Ok(checks::count(
        non_negative(value, name, "an element count")?,
        name,
    )?)
}

/// An all-reduce's arguments.
pub fn all_reduce(
    dtype: &str,
    input_ptr: &Bound<'_, PyAny>,
    output_ptr: &Bound<'_, PyAny>,
    count: &Bound<'_, PyAny>,
    algorithm: &str,
    zero_copy: bool,
) -> PyResult<Call> {
    let dtype = checks::dtype(dtype)?;
    let options = options(algorithm, zero_copy)?;
    let count = element_count(count, "count")?;
    let input = address(input_ptr, "input_ptr")?;
    let output = address(output_ptr, "output_ptr")?;
    Ok(Call::new(dtype, (input, output), count, options)?)
}

/// A fused all-reduce, residual add and RMSNorm's arguments: the
/// (input, residual, out) addresses and count, the weight's address and
/// hidden size, as the library's call takes them.
pub fn fused_norm(
    dtype: &str,
    (input_ptr, residual_ptr, out_ptr): (&Bound<'_, PyAny>, &Bound<'_, PyAny>, &Bound<'_, PyAny>),
    count: &Bound<'_, PyAny>,
    (weight_ptr, hidden): (&Bound<'_, PyAny>, &Bound<'_, PyAny>),
    eps: &Bound<'_, PyAny>,
    algorithm: &str,
    zero_copy: bool,
) -> PyResult<NormCall> {
    let dtype = checks::dtype(dtype)?;
    let options = options(algorithm, zero_copy)?;
    let count = element_count(count, "count")?;
    let hidden = element_count(hidden, "hidden")?;
    let buffers = (
        address(input_ptr, "input_ptr")?,
        address(residual_ptr, "residual_ptr")?,
        address(out_ptr, "out_ptr")?,
    );
    let weight = (address(weight_ptr, "weight_ptr")?, hidden);
    let eps = eps.extract::<f64>().map_err(|_| {
        PyTypeError::new_err(format!("eps must be a float, got {}", type_name(eps)))
    })?;
    Ok(NormCall::new(dtype, buffers, count, weight, eps, options)?)
}

/// A reduce-scatter's or all-gather's arguments on `world_size` ranks;
/// `count` is one rank's block (the reduce-scatter's `recv_count`, the
/// all-gather's `send_count`).
pub fn scatter_gather(
    op: ScatterGather,
    dtype: &str,
    (send_ptr, recv_ptr): (&Bound<'_, PyAny>, &Bound<'_, PyAny>),
    count: &Bound<'_, PyAny>,
    world_size: usize,
    algorithm: &str,
    zero_copy: bool,
) -> PyResult<ScatterGatherCall> {
    let dtype = checks::dtype(dtype)?;
    let options = options(algorithm, zero_copy)?;
    let count_name = match op {
        ScatterGather::ReduceScatter => "recv_count",
        ScatterGather::AllGather => "send_count",
    };
    let count = element_count(count, count_name)?;
    let buffers = (
        address(send_ptr, "send_ptr")?,
        address(recv_ptr, "recv_ptr")?,
    );
    Ok(ScatterGatherCall::new(
        op,
        dtype,
        buffers,
        (count, world_size),
        options,
    )?)
}

/// A raw CUstream handle, or None for the communicator's own stream.
pub fn stream(value: Option<&Bound<'_, PyAny>>) -> PyResult<Option<u64>> {
    value
        .map(|s| non_negative(s, "stream", "a CUstream handle"))
        .transpose()
}

/// A Python int in `0..=u64::MAX`: an address, a count, a stream handle.
pub fn non_negative(value: &Bound<'_, PyAny>, name: &str, what: &str) -> PyResult<u64> {
    if value.cast::<PyInt>().is_err() && !value.hasattr("__index__")? {
        return Err(PyTypeError::new_err(format!(
            "{name} must be an int ({what}), got {}",
            type_name(value)
        )));
    }
    if let Ok(number) = value.extract::<u64>() {
        return Ok(number);
    }
    let negative = value.lt(0).unwrap_or(false);
    Err(PyValueError::new_err(if negative {
        format!("{name} must be a non-negative int ({what}), got {value}")
    } else {
        format!("{name} must fit in 64 bits ({what}), got {value}")
    }))
}

fn type_name(value: &Bound<'_, PyAny>) -> String {
    value
        .get_type()
        .name()
        .map(|name| name.to_string())
        .unwrap_or_else(|_| "an object of unknown type".into())
}

/// The `Config` a constructor's keyword arguments describe (the library's
/// defaults for those not given). Every rank must pass the same values;
/// set-up checks that they do.
pub fn config(
    timeout_s: Option<f64>,
    rendezvous_timeout_s: Option<f64>,
    staging_bytes: Option<&Bound<'_, PyAny>>,
    max_blocks: Option<&Bound<'_, PyAny>>,
) -> PyResult<Config> {
    let mut config = Config::default();
    if let Some(value) = timeout_s {
        config.timeout = checks::seconds(value, "timeout_s")?;
    }
    if let Some(value) = rendezvous_timeout_s {
        config.rendezvous_timeout = checks::seconds(value, "rendezvous_timeout_s")?;
    }
    if let Some(value) = staging_bytes {
        let bytes = non_negative(value, "staging_bytes", "a size in bytes")?;
        config.set_staging_bytes(
            usize::try_from(bytes)
                .map_err(|_| PyValueError::new_err("staging_bytes does not fit this machine"))?,
        );
    }
    if let Some(value) = max_blocks {
        let blocks = non_negative(value, "max_blocks", "a number of blocks")?;
        config.max_blocks = u32::try_from(blocks)
            .map_err(|_| PyValueError::new_err(format!("max_blocks {blocks} is too large")))?;
    }
    Ok(config)
}
