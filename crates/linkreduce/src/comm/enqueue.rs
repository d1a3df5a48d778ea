//! The enqueue path: which path a call takes (the plan's choice), and on
//! the kernels' path where this rank's input is read from (in place, a
//! staging copy, or a buffer captured in a graph), where the output is
//! written (in place, or a bounce buffer then a copy), how a call is cut
//! into launches, and the launches themselves. Both paths follow the
//! caller's stream alike (`enter_stream`, `leave_stream`).
//!
//! Every decision from this rank's own pointers stays local: each rank
//! publishes its input's table entry at the start barrier, so peers that
//! decided otherwise still read the right memory (docs/design.md, "Buffer
//! table"). What every rank must do alike (the algorithm, the cut into
//! launches, the grid) depends only on the call's length and dtype and on
//! settings checked equal at set-up.

use std::sync::Arc;

use cudarc::driver::CudaStream;

use super::custom::CustomPath;
use super::{capturing, Communicator};
use crate::algorithm::{blocks_for, chunk_packets, Algorithm};
use crate::comm::CallOptions;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kernels::{
    chunk_slot_bytes, launch, source_word, AllReduceArgs, BarrierArgs, ChunkedArgs, PushArgs,
    PACKET_BYTES, SCRATCH_TAIL_BYTES, THREADS_PER_BLOCK,
};
use crate::path::CallPath;
use crate::registry::{Located, STAGING_INDEX};

/// Where a call reads this rank's input from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Source {
    /// Where it is, through its buffer-table entry (peers read it too).
    Table(Located),
    /// Where it is, read by this rank alone (the push kernels).
    Local,
    /// A copy in this rank's staging buffer.
    Staged,
}

/// The input as one launch names it.
#[derive(Debug, Clone, Copy)]
pub(super) enum LaunchInput {
    /// A source word: table index and offset (peers read it too).
    Table(u64),
    /// This rank's address (the push kernels: only this rank reads it).
    Address(u64),
}

const PACKET: u64 = PACKET_BYTES as u64;

/// One launch of a call: `count` elements of `dtype` from `input` into
/// `output`, on at most `max_blocks` blocks.
#[derive(Debug, Clone, Copy)]
struct Launch {
    algorithm: Algorithm,
    dtype: DType,
    input: LaunchInput,
    output: u64,
    count: usize,
    max_blocks: u32,
}

/// What a call reduces: `count` elements of `dtype` from `input` into
/// `output` (device addresses of this rank).
#[derive(Debug, Clone, Copy)]
struct Call {
    dtype: DType,
    input: u64,
    output: u64,
    count: usize,
}

impl Communicator {
    pub(super) fn enqueue(
        &mut self,
        stream: &Arc<CudaStream>,
        dtype: DType,
        input: u64,
        output: u64,
        count: usize,
        options: CallOptions,
    ) -> Result<()> {
        self.check_usable()?;
        if count == 0 {
            return Ok(());
        }
        let bytes = span_bytes(input, count, dtype)?;
        span_bytes(output, count, dtype)?;
        let overlaps = input < output + bytes as u64 && output < input + bytes as u64;
        if overlaps && input != output {
            return Err(Error::PartialOverlap {
                input,
                output,
                bytes,
            });
        }
        self.gpu
            .ctx
            .bind_to_thread()
            .map_err(Error::driver("cuCtxSetCurrent"))?;
        let path = self.call_path(bytes, options.algorithm)?;
        let call = Call {
            dtype,
            input,
            output,
            count,
        };
        self.on_stream(stream, |comm, capturing| match path {
            CallPath::Custom(algorithm) => {
                comm.enqueue_custom(stream, algorithm, call, options, capturing)
            }
            CallPath::Nccl(_) => comm.enqueue_nccl(stream, call, capturing),
        })
    }

    /// Runs `enqueue` (given whether `stream` is being captured) between
    /// `enter_stream` and `leave_stream`, leaving even when it failed part
    /// way: launches it made must still order this rank's own stream.
    pub(super) fn on_stream(
        &mut self,
        stream: &Arc<CudaStream>,
        enqueue: impl FnOnce(&mut Self, bool) -> Result<()>,
    ) -> Result<()> {
        let capturing = self.enter_stream(stream)?;
        let enqueued = enqueue(self, capturing);
        let left = self.leave_stream(stream, capturing);
        enqueued.and(left)
    }

    /// The call on NCCL, set up first if this is the first call that needs
    /// it (never during a capture: NCCL cannot be set up then).
    fn enqueue_nccl(
        &mut self,
        stream: &Arc<CudaStream>,
        call: Call,
        capturing: bool,
    ) -> Result<()> {
        self.on_nccl(stream, capturing, |nccl| {
            // SAFETY: the caller vouches that both addresses hold `count`
            // elements of `dtype` on this rank's device until the call has
            // run on `stream` (all_reduce_raw), or they come from device
            // slices of that length; `stream` belongs to this rank's
            // context (enter_stream checked).
            unsafe {
                nccl.all_reduce_raw_on(stream, call.dtype, call.input, call.output, call.count)
            }
        })
    }

    /// Runs `call` on this rank's NCCL communicator, set up first where no
    /// call needed it before (never during a capture: NCCL cannot be set up
    /// then).
    /// An eager call is watched, so that a host wait for it is bounded
    /// (comm/watch.rs).
    pub(super) fn on_nccl(
        &mut self,
        stream: &CudaStream,
        capturing: bool,
        call: impl FnOnce(&mut crate::nccl::NcclComm) -> Result<()>,
    ) -> Result<()> {
        if self.nccl.is_none() {
            if capturing {
                return Err(Error::NcclDuringCapture);
            }
            self.prepare_nccl()?;
        }
        call(self.nccl.as_mut().ok_or(Error::NcclDuringCapture)?)?;
        if capturing {
            return Ok(());
        }
        self.nccl_watch.record(stream)
    }

    /// The call on the kernels: its source, destination and launches.
    fn enqueue_custom(
        &mut self,
        stream: &Arc<CudaStream>,
        algorithm: Algorithm,
        call: Call,
        options: CallOptions,
        capturing: bool,
    ) -> Result<()> {
        let Call {
            dtype,
            input,
            output,
            count,
        } = call;
        let bytes = count * dtype.size();
        let source = self.locate_input(
            algorithm,
            input,
            output,
            bytes,
            options.zero_copy,
            capturing,
        )?;
        let custom = self.custom()?;
        // The caller's grid, else the tuned one, within the group's limit:
        // the same on every rank, as the size and the table are.
        let tuned = || {
            custom
                .tuning
                .as_ref()?
                .blocks(self.world_size, bytes, algorithm)
        };
        let limit = custom.max_blocks_for(algorithm);
        let max_blocks = options
            .max_blocks
            .or_else(tuned)
            .map_or(limit, |wanted| wanted.clamp(1, limit));
        // A misaligned output is written whole packets at a time into the
        // bounce buffer, then copied into place: this rank's concern alone.
        let bounce = (output % PACKET != 0).then(|| custom.regions.bounce.ptr());
        let chunk = self.chunk_elements(custom, algorithm, dtype);
        tracing::trace!(
            rank = self.rank,
            %algorithm,
            ?source,
            bounce = bounce.is_some(),
            chunk,
            count,
            "all-reduce"
        );
        let mut done = 0;
        while done < count {
            let n = chunk.min(count - done);
            let offset = (done * dtype.size()) as u64;
            let launch_input =
                custom.launch_input(stream, algorithm, source, input, offset, n * dtype.size())?;
            let target = bounce.unwrap_or(output + offset);
            let one = Launch {
                algorithm,
                dtype,
                input: launch_input,
                output: target,
                count: n,
                max_blocks,
            };
            self.launch(custom, stream, one)?;
            if let Some(bounce) = bounce {
                copy(stream, output + offset, bounce, n * dtype.size())?;
            }
            done += n;
        }
        Ok(())
    }

    /// Orders this call after the previous one wherever that went: calls
    /// share staging, signal counters and push slots, so they must not
    /// overlap. This rank's own stream is ordered after every call (see
    /// `leave_stream`), so a call on another stream waits for it. (Skipping
    /// that wait when the previous call used the same stream would need to
    /// recognise the stream, and a caller's stream handle may be reused by
    /// a new stream once destroyed.) Returns whether `stream` is being
    /// captured: a captured call is ordered by where its graph is launched,
    /// and no event can tie it to eager calls (docs/design.md, "Streams").
    fn enter_stream(&self, stream: &Arc<CudaStream>) -> Result<bool> {
        if stream.context().cu_ctx() != self.gpu.ctx.cu_ctx() {
            return Err(Error::InvalidConfig(format!(
                "the stream belongs to another CUDA context than rank {}'s (device {}); \
                 use a stream of Communicator::context()",
                self.rank,
                self.gpu.ctx.ordinal()
            )));
        }
        let capturing = capturing(stream)?;
        if stream.cu_stream() != self.gpu.stream.cu_stream() && !capturing {
            self.hand_off(&self.gpu.stream, stream)?;
        }
        Ok(capturing)
    }

    /// After an eager call on another stream than this rank's own, orders
    /// the own stream after it: the next call elsewhere waits for it
    /// through the own stream, and what goes there next (frees of
    /// [`Communicator::alloc`]'s buffers, downloads) comes after it.
    fn leave_stream(&self, stream: &Arc<CudaStream>, capturing: bool) -> Result<()> {
        if capturing || stream.cu_stream() == self.gpu.stream.cu_stream() {
            return Ok(());
        }
        self.hand_off(stream, &self.gpu.stream)
    }

    /// Makes `to` wait for what `from` holds now.
    fn hand_off(&self, from: &CudaStream, to: &CudaStream) -> Result<()> {
        self.gpu
            .handoff
            .record(from)
            .map_err(Error::driver("cuEventRecord"))?;
        to.wait(&self.gpu.handoff)
            .map_err(Error::driver("cuStreamWaitEvent"))
    }

    /// Decides where the kernel reads this rank's input from: where it is
    /// (registered, or captured and registered after capture), or from a
    /// staging copy. Decided from this rank's pointers alone.
    pub(super) fn locate_input(
        &mut self,
        algorithm: Algorithm,
        input: u64,
        output: u64,
        bytes: usize,
        zero_copy: bool,
        capturing: bool,
    ) -> Result<Source> {
        let aligned = input % PACKET == 0;
        if algorithm.reads_input_locally() {
            // Only this rank reads its input, each packet before writing
            // the same packet of the output: in place is safe, and nothing
            // needs registering. Whole packets need 16-byte alignment.
            return match (aligned, zero_copy) {
                (true, _) => Ok(Source::Local),
                (false, false) => Ok(Source::Staged),
                (false, true) => Err(Error::Misaligned {
                    ptr: input,
                    alignment: PACKET,
                }),
            };
        }
        // One-stage writes the output while peers may still read the input.
        let hazard = algorithm == Algorithm::OneStage && input == output;
        self.locate_for_peers(input, bytes, zero_copy, capturing, hazard)
    }

    /// Where peers read the `bytes` at `input`: through its table entry
    /// where it is registered (or, captured, registered after capture) and
    /// no `hazard` forbids reading it in place; else from a staging copy.
    pub(super) fn locate_for_peers(
        &mut self,
        input: u64,
        bytes: usize,
        zero_copy: bool,
        capturing: bool,
        hazard: bool,
    ) -> Result<Source> {
        let aligned = input % PACKET == 0;
        let registered = self.custom()?.buffers.registry.lookup(input, bytes as u64);
        // Every launch's offset must fit a source word: check the last.
        let addressable = |located: Located| {
            let last = located.offset + (bytes as u64).saturating_sub(1) / PACKET * PACKET;
            source_word(located.index, located.offset).is_some()
                && source_word(located.index, last).is_some()
        };
        if let (Some(located), false) = (registered, hazard) {
            if addressable(located) {
                return Ok(Source::Table(located));
            }
        }
        if registered.is_none() && aligned && !hazard && capturing {
            // Memory peers cannot map (a pool's, across processes) is staged
            // instead, inside the graph.
            if self.shareable(self.custom()?, input, bytes).is_ok() {
                let index = self.custom_mut()?.buffers.registry.reserve_pending(input)?;
                return Ok(Source::Table(Located { index, offset: 0 }));
            }
        }
        if zero_copy && registered.is_none() {
            return Err(Error::NotRegistered { ptr: input });
        }
        Ok(Source::Staged)
    }

    /// The most elements one launch takes: what staging and the bounce
    /// buffer hold, and for two-stage what scratch holds, for push a push
    /// segment. The same on every rank, whatever its pointers, so that all
    /// ranks launch alike. A multiple of the packet, so chunks stay aligned.
    pub(super) fn chunk_elements(
        &self,
        custom: &CustomPath,
        algorithm: Algorithm,
        dtype: DType,
    ) -> usize {
        let staging = custom.regions.staging.bytes() / PACKET_BYTES * PACKET_BYTES;
        let bytes = match algorithm {
            // Chunked push needs no staging for an aligned input, but a
            // misaligned one is staged, and every rank must cut alike.
            Algorithm::OneStage | Algorithm::ChunkedPush => staging,
            Algorithm::Push => custom.regions.push_segment.min(staging),
            Algorithm::TwoStage => {
                let slice_packets = (self.config.scratch_bytes - SCRATCH_TAIL_BYTES) / PACKET_BYTES;
                // The last slice may hold up to W-1 packets more than the rest.
                let packets = (slice_packets - self.world_size) * self.world_size;
                (packets * PACKET_BYTES).min(staging)
            }
        };
        bytes / dtype.size()
    }

    fn launch(&self, custom: &CustomPath, stream: &Arc<CudaStream>, one: Launch) -> Result<()> {
        let Launch {
            algorithm,
            dtype,
            input,
            output,
            count,
            max_blocks,
        } = one;
        // Push kernels take the partial last packet as a packet; the others
        // give it to a scalar tail path.
        let packets = if algorithm.reads_input_locally() {
            (count * dtype.size()).div_ceil(PACKET_BYTES)
        } else {
            count * dtype.size() / PACKET_BYTES
        };
        let blocks = blocks_for(
            algorithm,
            self.world_size,
            packets,
            THREADS_PER_BLOCK,
            max_blocks,
        );
        // Not for a launch with a partial last packet: on 4 x H200 such a
        // launch (3000 bytes) took 4.91 us programmatically against 4.47
        // without, where 2992 and 3008 bytes gained (4.43 to 4.08 us;
        // docs/design.md, "Programmatic dependent launch"). Why is not known.
        let programmatic = custom.programmatic && (count * dtype.size()) % PACKET_BYTES == 0;
        let barrier = BarrierArgs {
            programmatic: programmatic.into(),
            ..self.barrier_args(custom)
        };
        let function = custom.kernels.get(&(algorithm, dtype)).ok_or_else(|| {
            Error::InvalidConfig(format!("no {algorithm} kernel for {dtype} was loaded"))
        })?;
        // What makes the launches below sound: the one-stage and two-stage
        // kernels take exactly one `AllReduceArgs` by value, the push
        // kernels one `PushArgs`, the chunked-push kernels one
        // `ChunkedArgs`; which one `input` and `algorithm` say (locate_input
        // gives push inputs by address, the others through the table).
        // Their pointers are valid: signal regions (with their scratch),
        // push areas and the table live as long as their communicators
        // (collectively dropped); every table entry a peer can name holds
        // a buffer checked shareable when it was shared; a push input holds
        // `count` elements and fits the push segment (chunks are cut to
        // it); a chunked push's slots lie in scratch (chunk_slot_bytes
        // divides it among the rings), its chunks fit a slot, and its grid
        // is at most CHUNK_BLOCKS (blocks_for), which its counters and
        // rings are laid out for; the
        // output holds `count` elements (the caller's slice, or the bounce
        // buffer, which holds a whole chunk). Each kernel waits for the
        // previous one before it reads anything (lr_wait_for_previous_kernel),
        // and `programmatic` holds only where set-up allowed it.
        match input {
            LaunchInput::Table(source) => {
                let args = AllReduceArgs {
                    barrier,
                    table: custom.regions.table.ptr(),
                    source,
                    output,
                    count: count as u64,
                    capacity: custom.regions.table_capacity as u32,
                };
                // SAFETY: a one-stage or two-stage kernel with its
                // `AllReduceArgs` (above).
                unsafe { launch(stream, function, blocks, &args, programmatic) }
            }
            LaunchInput::Address(input) if algorithm == Algorithm::ChunkedPush => {
                let slot_bytes = chunk_slot_bytes(self.config.scratch_bytes, self.world_size);
                let args = ChunkedArgs {
                    barrier,
                    input,
                    output,
                    count: count as u64,
                    chunk_packets: chunk_packets(packets, blocks, slot_bytes / PACKET_BYTES) as u64,
                    slot_bytes: slot_bytes as u64,
                };
                // SAFETY: a chunked-push kernel with its `ChunkedArgs` (above).
                unsafe { launch(stream, function, blocks, &args, programmatic) }
            }
            LaunchInput::Address(input) => {
                let args = PushArgs {
                    barrier,
                    push: custom.regions.push_peers,
                    input,
                    output,
                    count: count as u64,
                    segment_bytes: custom.regions.push_segment as u64,
                };
                // SAFETY: a push kernel with its `PushArgs` (above).
                unsafe { launch(stream, function, blocks, &args, programmatic) }
            }
        }
    }

    /// Whether this rank launches its all-reduce kernels as programmatic
    /// dependent launches: asked for ([`Config::programmatic_launch`] or
    /// `LINKREDUCE_PDL`) and allowed here (sm_90 or newer, a CUDA 12.3
    /// driver, one rank per GPU). False where every call takes NCCL.
    ///
    /// [`Config::programmatic_launch`]: crate::Config::programmatic_launch
    pub fn programmatic_launch(&self) -> bool {
        self.custom
            .as_ref()
            .is_some_and(|custom| custom.programmatic)
    }
}

impl Communicator {
    /// What every kernel that meets peers needs for its barriers, for a
    /// launch that is not programmatic.
    pub(super) fn barrier_args(&self, custom: &CustomPath) -> BarrierArgs {
        BarrierArgs {
            peers: custom.regions.signal_peers,
            fault: custom.regions.fault.device_ptr(),
            timeout_ns: self.config.timeout.as_nanos().min(u64::MAX as u128) as u64,
            rank: self.rank as u32,
            programmatic: 0,
        }
    }
}

/// The bytes of `count` elements of `dtype` at `address`, refused where
/// they would run past the end of the address space (a raw caller's
/// mistake), so that no later sum of addresses overflows.
pub(super) fn span_bytes(address: u64, count: usize, dtype: DType) -> Result<usize> {
    count
        .checked_mul(dtype.size())
        .filter(|&bytes| address.checked_add(bytes as u64).is_some())
        .ok_or_else(|| {
            Error::InvalidConfig(format!(
                "{count} elements of {dtype} at {address:#x} run past the end of the address \
                 space; pass the buffer's real address and length"
            ))
        })
}

/// Copies `bytes` from `src` to `dst` in `stream`'s order.
pub(super) fn copy(stream: &CudaStream, dst: u64, src: u64, bytes: usize) -> Result<()> {
    // SAFETY: both ranges hold `bytes`: a caller's buffer holds the call's
    // elements (it came from a device slice that long), and staging and
    // bounce hold a whole chunk (chunk_elements).
    unsafe { cudarc::driver::result::memcpy_dtod_async(dst, src, bytes, stream.cu_stream()) }
        .map_err(Error::driver("cuMemcpyDtoDAsync"))
}

impl CustomPath {
    /// How the launch of the `bytes` at `offset` into the input names it;
    /// a staged input is copied into staging first.
    pub(super) fn launch_input(
        &self,
        stream: &Arc<CudaStream>,
        algorithm: Algorithm,
        source: Source,
        input: u64,
        offset: u64,
        bytes: usize,
    ) -> Result<LaunchInput> {
        Ok(match source {
            Source::Table(located) => {
                // locate_input checked that every chunk's offset fits.
                let word = source_word(located.index, located.offset + offset);
                LaunchInput::Table(word.ok_or(Error::InvalidConfig(
                    "an input's offset outgrew its source word".into(),
                ))?)
            }
            Source::Local => LaunchInput::Address(input + offset),
            Source::Staged => {
                // The previous launch ended on this stream, so every
                // peer has finished reading staging.
                copy(stream, self.regions.staging.ptr(), input + offset, bytes)?;
                if algorithm.reads_input_locally() {
                    LaunchInput::Address(self.regions.staging.ptr())
                } else {
                    LaunchInput::Table(STAGING_INDEX as u64)
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_past_the_end_of_the_address_space_are_refused() {
        assert_eq!(span_bytes(0x1000, 3, DType::BF16).ok(), Some(6));
        assert!(span_bytes(u64::MAX - 3, 2, DType::F32).is_err());
        assert!(span_bytes(0x1000, usize::MAX / 2, DType::F32).is_err());
        assert_eq!(span_bytes(u64::MAX - 8, 2, DType::F32).ok(), Some(8));
    }
}
