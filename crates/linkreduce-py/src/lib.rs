//! `linkreduce._linkreduce`: the Python extension module of linkreduce.
//!
//! The plain API on raw device addresses and streams, for any framework
//! (PyTorch's `data_ptr()`, CuPy, JAX through DLPack); `python/linkreduce`
//! builds the PyTorch API on it. Built by maturin from `pyproject.toml` at
//! the repository root.
//!
//! - [`communicator`]: the `Communicator` class;
//! - [`rendezvous`]: a `Rendezvous` over a Python all-gather callable;
//! - [`args`]: Python arguments into Rust values (`TypeError` for what is
//!   not an int), judged by [`checks`] (`ValueError`), before anything
//!   touches a GPU;
//! - [`errors`]: `LinkreduceError`, which carries the library's message.
//!
//! Nothing a caller passes makes this module panic: arguments are checked
//! into Rust types first, and the library returns errors, not panics.

mod args;
mod checks;
mod communicator;
mod errors;
mod rendezvous;

use pyo3::prelude::*;

/// The version of linkreduce this module was built from.
#[pyfunction]
fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// validate_all_reduce(dtype, input_ptr, output_ptr, count, algorithm="auto") -> int
///
/// The argument checks `Communicator.all_reduce` makes before it touches a
/// GPU, on their own: raises `ValueError` (or `TypeError`) for an unknown
/// dtype or algorithm, a negative count, an address that is not a 64-bit
/// non-negative int, a null address with elements, or a range that runs
/// past the end of the address space. Returns the message's size in bytes.
#[pyfunction]
#[pyo3(signature = (dtype, input_ptr, output_ptr, count, algorithm = "auto"))]
fn validate_all_reduce(
    dtype: &str,
    input_ptr: &Bound<'_, PyAny>,
    output_ptr: &Bound<'_, PyAny>,
    count: &Bound<'_, PyAny>,
    algorithm: &str,
) -> PyResult<usize> {
    let call = args::all_reduce(dtype, input_ptr, output_ptr, count, algorithm, false)?;
    Ok(call.bytes)
}

/// validate_all_reduce_add_rms_norm(dtype, input_ptr, residual_ptr, out_ptr,
///                                  count, weight_ptr, hidden, eps,
///                                  algorithm="auto") -> int
///
/// The argument checks `Communicator.all_reduce_add_rms_norm` makes before
/// it touches a GPU: those of `validate_all_reduce` for each buffer (the
/// weight's `hidden` elements read only where there are rows), plus a
/// dtype other than f16 and bf16, a `count` that is not a whole number of
/// rows of `hidden` > 0 elements, and an `eps` that is negative or not
/// finite as an f32. Returns the input's size in bytes (what the path
/// choice goes by).
#[pyfunction]
#[pyo3(signature = (dtype, input_ptr, residual_ptr, out_ptr, count, weight_ptr, hidden, eps, algorithm = "auto"))]
#[allow(clippy::too_many_arguments)]
fn validate_all_reduce_add_rms_norm(
    dtype: &str,
    input_ptr: &Bound<'_, PyAny>,
    residual_ptr: &Bound<'_, PyAny>,
    out_ptr: &Bound<'_, PyAny>,
    count: &Bound<'_, PyAny>,
    weight_ptr: &Bound<'_, PyAny>,
    hidden: &Bound<'_, PyAny>,
    eps: &Bound<'_, PyAny>,
    algorithm: &str,
) -> PyResult<usize> {
    let buffers = (input_ptr, residual_ptr, out_ptr);
    let weight = (weight_ptr, hidden);
    let call = args::fused_norm(dtype, buffers, count, weight, eps, algorithm, false)?;
    Ok(call.bytes)
}

/// validate_reduce_scatter(dtype, send_ptr, recv_ptr, recv_count,
///                         world_size, algorithm="auto") -> int
///
/// The argument checks `Communicator.reduce_scatter` makes before it
/// touches a GPU, for a group of `world_size` ranks: those of
/// `validate_all_reduce`, with `send_ptr` holding world_size x
/// `recv_count` elements. Returns the send buffer's size in bytes (what
/// CustomAllreduce's `max_size` goes by).
#[pyfunction]
#[pyo3(signature = (dtype, send_ptr, recv_ptr, recv_count, world_size, algorithm = "auto"))]
fn validate_reduce_scatter(
    dtype: &str,
    send_ptr: &Bound<'_, PyAny>,
    recv_ptr: &Bound<'_, PyAny>,
    recv_count: &Bound<'_, PyAny>,
    world_size: usize,
    algorithm: &str,
) -> PyResult<usize> {
    let op = linkreduce::ScatterGather::ReduceScatter;
    let buffers = (send_ptr, recv_ptr);
    Ok(args::scatter_gather(op, dtype, buffers, recv_count, world_size, algorithm, false)?.bytes)
}

/// validate_all_gather(dtype, send_ptr, recv_ptr, send_count, world_size,
///                     algorithm="auto") -> int
///
/// As `validate_reduce_scatter`, for `Communicator.all_gather`: `recv_ptr`
/// holds world_size x `send_count` elements. Returns its size in bytes.
#[pyfunction]
#[pyo3(signature = (dtype, send_ptr, recv_ptr, send_count, world_size, algorithm = "auto"))]
fn validate_all_gather(
    dtype: &str,
    send_ptr: &Bound<'_, PyAny>,
    recv_ptr: &Bound<'_, PyAny>,
    send_count: &Bound<'_, PyAny>,
    world_size: usize,
    algorithm: &str,
) -> PyResult<usize> {
    let op = linkreduce::ScatterGather::AllGather;
    let buffers = (send_ptr, recv_ptr);
    Ok(args::scatter_gather(op, dtype, buffers, send_count, world_size, algorithm, false)?.bytes)
}

/// _rendezvous_all_gather(rank, world_size, all_gather, data) -> list of bytes
///
/// One all-gather through `all_gather` exactly as a communicator makes it
/// (GIL released, then taken again for the callable), with its checks of
/// what the callable returns. For tests of such callables without a GPU.
#[pyfunction]
fn _rendezvous_all_gather(
    py: Python<'_>,
    rank: usize,
    world_size: usize,
    all_gather: Bound<'_, PyAny>,
    data: Vec<u8>,
) -> PyResult<Vec<Vec<u8>>> {
    use linkreduce::rendezvous::Rendezvous;
    if rank >= world_size {
        return Err(pyo3::exceptions::PyValueError::new_err(format!(
            "rank {rank} is out of range for world_size {world_size}"
        )));
    }
    let rendezvous = rendezvous::CallableRendezvous::new(rank, world_size, all_gather.unbind());
    let gathered = py.detach(|| rendezvous.all_gather(&data));
    gathered.map_err(|error| {
        let failure = errors::Failure::Library(linkreduce::Error::Rendezvous(error));
        errors::to_py(py, failure, Some(rank), rendezvous.take_error())
    })
}

#[pymodule]
fn _linkreduce(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    errors::add_to(m)?;
    m.add_class::<communicator::PyCommunicator>()?;
    m.add_function(wrap_pyfunction!(version, m)?)?;
    m.add_function(wrap_pyfunction!(validate_all_reduce, m)?)?;
    m.add_function(wrap_pyfunction!(validate_all_reduce_add_rms_norm, m)?)?;
    m.add_function(wrap_pyfunction!(validate_reduce_scatter, m)?)?;
    m.add_function(wrap_pyfunction!(validate_all_gather, m)?)?;
    m.add_function(wrap_pyfunction!(_rendezvous_all_gather, m)?)?;
    let dtypes: Vec<&str> = linkreduce::DType::ALL.iter().map(|d| d.name()).collect();
    m.add("DTYPES", pyo3::types::PyTuple::new(py, dtypes)?)?;
    let algorithms: Vec<&str> = std::iter::once("auto")
        .chain(linkreduce::Algorithm::ALL.iter().map(|a| a.name()))
        .chain(["nccl"])
        .collect();
    m.add("ALGORITHMS", pyo3::types::PyTuple::new(py, algorithms)?)?;
    Ok(())
}
