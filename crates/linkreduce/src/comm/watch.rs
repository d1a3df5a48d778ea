//! Bounded host waits on work that went through NCCL.
//!
//! The kernels bound every wait on a peer themselves (docs/design.md,
//! "Barrier protocol"); NCCL's kernels wait for a dead peer forever. So each eager
//! call on the NCCL path records an event after it, and a host wait that
//! sees none of them complete for a whole timeout aborts the NCCL
//! communicator (its kernels then leave) and reports the stall
//! (docs/design.md, "Path choice"). Calls captured in graphs are not
//! watched: their replays belong to the caller's stream.

use std::collections::VecDeque;
use std::thread::sleep;
use std::time::{Duration, Instant};

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaStream};

use crate::error::{Error, Result};

/// Events recorded after this rank's eager NCCL calls, oldest first, and
/// finished ones kept for reuse (creating an event per call costs time on
/// every call).
#[derive(Default)]
pub(super) struct NcclWatch {
    pending: VecDeque<CudaEvent>,
    spare: Vec<CudaEvent>,
}

/// What a watched wait found.
pub(super) enum Progress {
    /// Every watched call finished.
    Done,
    /// No watched call finished for the whole timeout.
    Stalled,
}

impl NcclWatch {
    /// Marks the NCCL call just enqueued on `stream`.
    pub fn record(&mut self, stream: &CudaStream) -> Result<()> {
        // Finished calls need no watching; keeps the queue short.
        while self.pending.front().is_some_and(CudaEvent::is_complete) {
            self.spare.extend(self.pending.pop_front());
        }
        let event = match self.spare.pop() {
            Some(event) => event,
            None => stream
                .context()
                .new_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))
                .map_err(Error::driver("cuEventCreate"))?,
        };
        event
            .record(stream)
            .map_err(Error::driver("cuEventRecord"))?;
        self.pending.push_back(event);
        Ok(())
    }

    /// Waits until every watched call finished, or until none finished for
    /// `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Result<Progress> {
        let mut last_progress = Instant::now();
        while let Some(oldest) = self.pending.front() {
            if oldest
                .try_is_complete()
                .map_err(Error::driver("cuEventQuery"))?
            {
                self.spare.extend(self.pending.pop_front());
                last_progress = Instant::now();
            } else if last_progress.elapsed() > timeout {
                return Ok(Progress::Stalled);
            } else {
                sleep(Duration::from_micros(50));
            }
        }
        Ok(Progress::Done)
    }
}
