//! A [`Rendezvous`] over a Python callable: `all_gather(bytes) -> list of
//! bytes`, one per rank in rank order. `linkreduce.torch` passes one built
//! on a `torch.distributed` process group; other frameworks pass theirs.

use std::sync::Mutex;

use linkreduce::rendezvous::{Rendezvous, RendezvousError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes};

pub struct CallableRendezvous {
    rank: usize,
    world_size: usize,
    all_gather: Py<PyAny>,
    /// The exception the callable raised last, until the method that
    /// called it raises its own error with this one as the cause.
    last_error: Mutex<Option<PyErr>>,
}

impl CallableRendezvous {
    pub fn new(rank: usize, world_size: usize, all_gather: Py<PyAny>) -> Self {
        CallableRendezvous {
            rank,
            world_size,
            all_gather,
            last_error: Mutex::new(None),
        }
    }

    /// The exception the callable raised since the last call of this.
    pub fn take_error(&self) -> Option<PyErr> {
        self.last_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
    }

    fn call(&self, py: Python<'_>, bytes: &[u8]) -> Result<Vec<Vec<u8>>, RendezvousError> {
        let returned = self
            .all_gather
            .call1(py, (PyBytes::new(py, bytes),))
            .map_err(|error| self.raised(py, error))?;
        let items = returned
            .bind(py)
            .try_iter()
            .map_err(|_| protocol("did not return a list".into()))?;
        // Not sized by `world_size`: set-up reports an unsupported world
        // size to the peers through this very call.
        let mut gathered = Vec::new();
        for (index, item) in items.enumerate() {
            let item = item.map_err(|error| self.raised(py, error))?;
            let contribution = if let Ok(item) = item.cast::<PyBytes>() {
                item.as_bytes().to_vec()
            } else if let Ok(item) = item.cast::<PyByteArray>() {
                item.to_vec()
            } else {
                let type_name = item
                    .get_type()
                    .name()
                    .map(|name| name.to_string())
                    .unwrap_or_default();
                return Err(protocol(format!(
                    "returned a {type_name} at position {index}; every item must be bytes"
                )));
            };
            gathered.push(contribution);
        }
        if gathered.len() != self.world_size {
            return Err(protocol(format!(
                "returned {} items for {} ranks; it must return one per rank",
                gathered.len(),
                self.world_size
            )));
        }
        if gathered.get(self.rank).map(Vec::as_slice) != Some(bytes) {
            return Err(protocol(format!(
                "returned at position {} (this rank's) other bytes than this rank sent; it must \
                 return the contributions in rank order",
                self.rank
            )));
        }
        Ok(gathered)
    }

    /// Keeps the callable's exception for the caller's error, and says
    /// what happened in the library's terms.
    fn raised(&self, py: Python<'_>, error: PyErr) -> RendezvousError {
        let text = error.to_string();
        *self
            .last_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(error.clone_ref(py));
        RendezvousError::Io {
            context: "the Python all_gather callable".into(),
            source: std::io::Error::other(text),
        }
    }
}

fn protocol(detail: String) -> RendezvousError {
    RendezvousError::Protocol(format!("the Python all_gather callable {detail}"))
}

impl Rendezvous for CallableRendezvous {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    /// Attaches to the interpreter (the methods that get here detached from
    /// it first) and calls the callable. During interpreter shutdown, when
    /// Python can no longer run, this fails instead (a communicator dropped
    /// then skips its closing barrier).
    fn all_gather(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>, RendezvousError> {
        Python::try_attach(|py| self.call(py, bytes)).unwrap_or_else(|| {
            Err(RendezvousError::Config(
                "the Python interpreter is shutting down; the all_gather callable cannot run"
                    .into(),
            ))
        })
    }
}
