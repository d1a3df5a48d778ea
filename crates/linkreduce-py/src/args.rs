//! Python arguments into Rust types. Every check that needs no GPU happens
//! here, before a call reaches the library, and raises `ValueError` (a bad
//! value) or `TypeError` (not an int) with what was wrong and what is
//! accepted.

use std::time::Duration;

use linkreduce::{Algorithm, AlgorithmChoice, CallOptions, Config, DType};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyInt;

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
    pub fn parse(
        dtype: &str,
        input_ptr: &Bound<'_, PyAny>,
        output_ptr: &Bound<'_, PyAny>,
        count: &Bound<'_, PyAny>,
        algorithm: &str,
        zero_copy: bool,
    ) -> PyResult<Call> {
        let dtype = parse_dtype(dtype)?;
        let algorithm = parse_algorithm(algorithm)?;
        let count = usize::try_from(non_negative(count, "count", "an element count")?)
            .map_err(|_| PyValueError::new_err("count does not fit this machine's usize"))?;
        let input = non_negative(input_ptr, "input_ptr", "a device address")?;
        let output = non_negative(output_ptr, "output_ptr", "a device address")?;
        let bytes = count.checked_mul(dtype.size()).ok_or_else(|| {
            PyValueError::new_err(format!(
                "count {count} of {dtype} is more bytes than the address space holds"
            ))
        })?;
        for (name, ptr) in [("input_ptr", input), ("output_ptr", output)] {
            if count > 0 && ptr == 0 {
                return Err(PyValueError::new_err(format!(
                    "{name} is 0 (a null pointer) for {count} elements; pass the device address \
                     of the buffer (tensor.data_ptr())"
                )));
            }
            if ptr.checked_add(bytes as u64).is_none() {
                return Err(PyValueError::new_err(format!(
                    "{name} {ptr:#x} plus {bytes} bytes runs past the end of the address space"
                )));
            }
        }
        Ok(Call {
            dtype,
            input,
            output,
            count,
            bytes,
            options: CallOptions {
                algorithm,
                zero_copy,
            },
        })
    }
}

/// The library's names (`f32`, `f16`, `bf16`) and the usual long ones.
pub fn parse_dtype(text: &str) -> PyResult<DType> {
    let lower = text.trim().to_ascii_lowercase();
    let name = match lower.as_str() {
        "float32" | "float" => "f32",
        "float16" | "half" => "f16",
        "bfloat16" => "bf16",
        other => other,
    };
    name.parse().map_err(|_| unknown_dtype(text))
}

fn unknown_dtype(text: &str) -> PyErr {
    PyValueError::new_err(format!(
        "unknown dtype {text:?}: linkreduce reduces f32, f16 and bf16 (also written float32, \
         float16, bfloat16); reduce other types with torch.distributed or NCCL"
    ))
}

/// `auto`, `nccl`, or one of the library's algorithm names.
pub fn parse_algorithm(text: &str) -> PyResult<AlgorithmChoice> {
    match text.trim().to_ascii_lowercase().as_str() {
        "auto" => return Ok(AlgorithmChoice::Auto),
        "nccl" => return Ok(AlgorithmChoice::Nccl),
        _ => {}
    }
    text.trim()
        .parse::<Algorithm>()
        .map(AlgorithmChoice::Force)
        .map_err(|message| PyValueError::new_err(format!("{message} (or auto, nccl)")))
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

/// A positive, finite number of seconds.
fn seconds(value: f64, name: &str) -> PyResult<Duration> {
    if !(value.is_finite() && value > 0.0) {
        return Err(PyValueError::new_err(format!(
            "{name} must be a positive number of seconds, got {value}"
        )));
    }
    Duration::try_from_secs_f64(value).map_err(|_| {
        PyValueError::new_err(format!("{name}={value} is not a usable number of seconds"))
    })
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
        config.timeout = seconds(value, "timeout_s")?;
    }
    if let Some(value) = rendezvous_timeout_s {
        config.rendezvous_timeout = seconds(value, "rendezvous_timeout_s")?;
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
