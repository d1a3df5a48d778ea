//! `LinkreduceError`: the library's errors as one Python exception, with
//! the library's message and, as attributes, what a program may branch on.

use linkreduce::rendezvous::RendezvousError;
use linkreduce::Error;
use pyo3::create_exception;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

create_exception!(
    linkreduce,
    LinkreduceError,
    PyRuntimeError,
    "An error of the linkreduce library, with its message.\n\n\
     Attributes (None where they do not apply):\n\
     - kind: the library's name for the error (\"DriverNotFound\", \"NoDevice\",\n\
       \"PeerTimeout\", \"PeerFailed\", \"RendezvousTimeout\", \"PeerLost\",\n\
       \"Poisoned\", \"Closed\", ...);\n\
     - rank: the rank that reports the error;\n\
     - peer: the rank that died, hung or failed, where the error names one."
);

/// Why a method of a communicator failed.
pub enum Failure {
    /// `close()` ran before.
    Closed,
    Library(Error),
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        Failure::Library(error)
    }
}

/// Adds the exception to the module, with its attributes' defaults.
pub fn add_to(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    let class = py.get_type::<LinkreduceError>();
    for attribute in ["kind", "rank", "peer"] {
        class.setattr(attribute, py.None())?;
    }
    m.add("LinkreduceError", class)
}

/// The Python exception for `failure` on rank `rank` (when known); `cause`
/// (an exception the all-gather callable raised) becomes the `__cause__` of
/// a rendezvous error.
pub fn to_py(py: Python<'_>, failure: Failure, rank: Option<usize>, cause: Option<PyErr>) -> PyErr {
    let (message, kind, reporter, peer) = match &failure {
        Failure::Closed => (
            "this communicator was closed (close() or the end of its with-block); \
             create a new one"
                .to_string(),
            "Closed",
            None,
            None,
        ),
        Failure::Library(error) => {
            let (kind, reporter, peer) = describe(error);
            (error.to_string(), kind, reporter, peer)
        }
    };
    let error = LinkreduceError::new_err(message);
    let value = error.value(py);
    // Setting attributes on a fresh exception instance does not fail in
    // practice; if it did, the exception still carries its message.
    let _ = value.setattr("kind", kind);
    let _ = value.setattr("rank", reporter.or(rank));
    let _ = value.setattr("peer", peer);
    // The callable's exception is the cause only of the error its failure
    // made (the library reports an error of this rank's own first).
    if matches!(failure, Failure::Library(Error::Rendezvous(_))) && cause.is_some() {
        error.set_cause(py, cause);
    }
    error
}

/// The variant's name, the reporting rank and the peer an error names.
fn describe(error: &Error) -> (&'static str, Option<usize>, Option<usize>) {
    match error {
        Error::DriverNotFound => ("DriverNotFound", None, None),
        Error::NoDevice => ("NoDevice", None, None),
        Error::DeviceOutOfRange { .. } => ("DeviceOutOfRange", None, None),
        Error::NvrtcNotFound => ("NvrtcNotFound", None, None),
        Error::NcclNotFound => ("NcclNotFound", None, None),
        Error::Compile { .. } => ("Compile", None, None),
        Error::Driver { .. } => ("Driver", None, None),
        Error::Nccl { .. } => ("Nccl", None, None),
        Error::UnsupportedWorldSize(_) => ("UnsupportedWorldSize", None, None),
        Error::NoPeerAccess { .. } => ("NoPeerAccess", None, None),
        Error::CustomUnavailable { .. } => ("CustomUnavailable", None, None),
        Error::NcclSharedGpu { .. } => ("NcclSharedGpu", None, None),
        Error::NoPath { .. } => ("NoPath", None, None),
        Error::NcclDuringCapture => ("NcclDuringCapture", None, None),
        Error::NcclStalled { rank, .. } => ("NcclStalled", Some(*rank), None),
        Error::LengthMismatch { .. } => ("LengthMismatch", None, None),
        Error::PartialOverlap { .. } => ("PartialOverlap", None, None),
        Error::Misaligned { .. } => ("Misaligned", None, None),
        Error::NotRegistered { .. } => ("NotRegistered", None, None),
        Error::RecordTableFull { .. } => ("RecordTableFull", None, None),
        Error::NotShareable { .. } => ("NotShareable", None, None),
        Error::RankMismatch { .. } => ("RankMismatch", None, None),
        Error::PeerTimeout { rank, peer, .. } => ("PeerTimeout", Some(*rank), Some(*peer)),
        Error::Poisoned(_) => ("Poisoned", None, None),
        Error::PeerFailed { rank, .. } => ("PeerFailed", None, Some(*rank)),
        Error::InvalidConfig(_) => ("InvalidConfig", None, None),
        Error::UnsupportedDType { .. } => ("UnsupportedDType", None, None),
        Error::RowLength { .. } => ("RowLength", None, None),
        Error::NormBufferLength { .. } => ("NormBufferLength", None, None),
        Error::InvalidEps(_) => ("InvalidEps", None, None),
        Error::BuffersOverlap { .. } => ("BuffersOverlap", None, None),
        Error::RowTooLong { .. } => ("RowTooLong", None, None),
        Error::ScatterGatherLength { .. } => ("ScatterGatherLength", None, None),
        Error::ScatterGatherOverlap { .. } => ("ScatterGatherOverlap", None, None),
        Error::Rendezvous(error) => match error {
            RendezvousError::Timeout { rank, .. } => ("RendezvousTimeout", None, Some(*rank)),
            RendezvousError::PeerLost { rank, .. } => ("PeerLost", None, Some(*rank)),
            RendezvousError::Config(_) => ("RendezvousConfig", None, None),
            RendezvousError::Io { .. } => ("RendezvousIo", None, None),
            RendezvousError::Protocol(_) => ("RendezvousProtocol", None, None),
        },
    }
}
