//! Running one soak case on one rank. An all-reduce runs here: its buffers
//! (allocated, registered, views, freed early or late), the call eager or
//! in a graph, and the checks every rank judges together. The other ops go
//! to their checkers in `verify`.

use std::any::Any;
use std::collections::HashMap;

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaSlice, DevicePtr};

use super::all_reduce::{AllReduceCase, Memory, MAX_OFFSET};
use super::case::{Rng, SoakCase, SoakOp};
use crate::comm::{CallOptions, Communicator};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::memory::DeviceBuffer;
use crate::verify::fused::check_norm_case_on_rank;
use crate::verify::scatter_gather::check_sg_case_on_rank;
use crate::verify::{judge, poison, runs_push, DeviceChecks, Examined, Expect, Outcome};

/// Elements checked on each side of a view: nothing may write them.
const GUARD: usize = 16;
/// Room around views in their parent allocation.
const SLACK: usize = MAX_OFFSET + GUARD + 1;

/// One of a case's buffers on this rank.
enum Buf<T> {
    Owned {
        buffer: DeviceBuffer<T>,
        registered: bool,
    },
    /// A view at `offset` of a pool allocation with room around it.
    Pool { slice: CudaSlice<T>, offset: usize },
    /// A view at `offset` into the arena's input or output half.
    Arena { output: bool, offset: usize },
}

/// Two registered buffers per dtype that views are cut from: inputs from
/// one, outputs from the other (a call borrows both at once).
struct Arena<T> {
    input: DeviceBuffer<T>,
    output: DeviceBuffer<T>,
}

/// A case's buffers kept for later cases.
struct Held {
    release_at: u64,
    _buffers: Box<dyn Any>,
}

/// One rank's side of a soak: what it keeps between cases (the check
/// kernels, registered arenas, buffers held for later cases). Build it on
/// every rank, run the same cases on every rank, then `finish` it.
pub struct Soak {
    checks: DeviceChecks,
    /// `Arena<T>` by dtype.
    arenas: HashMap<DType, Box<dyn Any>>,
    held: Vec<Held>,
    max_len: usize,
}

impl Soak {
    /// Collective: registers this rank's arenas for cases of up to
    /// `max_len` elements.
    pub fn new(comm: &mut Communicator, max_len: usize) -> Result<Soak> {
        // One stream per rank orders everything; cudarc's event tracking
        // would also record and wait on events inside graph captures, which
        // capture forbids.
        // SAFETY: every buffer a soak allocates is used on this rank's one
        // stream only, so stream order is all the synchronisation it needs.
        unsafe { comm.context().disable_event_tracking() };
        let mut arenas: HashMap<DType, Box<dyn Any>> = HashMap::new();
        arenas.insert(DType::F32, Box::new(Arena::<f32>::new(comm, max_len)?));
        arenas.insert(
            DType::F16,
            Box::new(Arena::<half::f16>::new(comm, max_len)?),
        );
        arenas.insert(
            DType::BF16,
            Box::new(Arena::<half::bf16>::new(comm, max_len)?),
        );
        Ok(Soak {
            checks: DeviceChecks::new(comm.stream(), 8)?,
            arenas,
            held: Vec::new(),
            max_len,
        })
    }

    /// Frees held buffers and ends the arenas' registrations. Collective.
    pub fn finish(mut self, comm: &mut Communicator) -> Result<()> {
        self.held.clear();
        for dtype in DType::ALL {
            let arena = self.arenas.remove(&dtype);
            match dtype {
                DType::F32 => end_arena::<f32>(comm, arena)?,
                DType::F16 => end_arena::<half::f16>(comm, arena)?,
                DType::BF16 => end_arena::<half::bf16>(comm, arena)?,
            }
        }
        Ok(())
    }

    fn arena<T: Element>(&mut self) -> Result<&mut Arena<T>> {
        self.arenas
            .get_mut(&T::DTYPE)
            .and_then(|arena| arena.downcast_mut::<Arena<T>>())
            .ok_or_else(|| Error::InvalidConfig(format!("no {} arena", T::DTYPE)))
    }

    /// Frees the held buffers whose time has come.
    fn release_due(&mut self, number: u64) {
        self.held.retain(|held| held.release_at > number);
    }

    /// Runs `case` on this rank and judges it with every rank. Collective.
    pub fn run(&mut self, comm: &mut Communicator, case: &SoakCase, seed: u64) -> Result<Outcome> {
        let number = case.number;
        match case.op {
            SoakOp::AllReduce(all_reduce) => match all_reduce.dtype {
                DType::F32 => self.all_reduce::<f32>(comm, number, &all_reduce, seed),
                DType::F16 => self.all_reduce::<half::f16>(comm, number, &all_reduce, seed),
                DType::BF16 => self.all_reduce::<half::bf16>(comm, number, &all_reduce, seed),
            },
            // Their checkers allocate their own buffers; buffers held for
            // this case are freed as it starts.
            SoakOp::FusedNorm(norm) => {
                self.release_due(number);
                check_norm_case_on_rank(comm, norm, data_seed(seed, number, 0))
            }
            SoakOp::ScatterGather(sg) => {
                self.release_due(number);
                check_sg_case_on_rank(comm, sg, data_seed(seed, number, 0))
            }
        }
    }

    fn all_reduce<T: Element>(
        &mut self,
        comm: &mut Communicator,
        number: u64,
        case: &AllReduceCase,
        seed: u64,
    ) -> Result<Outcome> {
        if case.len > self.max_len {
            return Err(Error::InvalidConfig(format!(
                "case length {} exceeds the soak's {}",
                case.len, self.max_len
            )));
        }
        let mut run = CaseRun::<T>::new(comm, number, case, seed);
        let outcome = run.execute(self, comm);
        // Buffers of the case go (or are kept) whatever happened.
        let buffers = run.take_buffers();
        let kept = if case.hold > 0 && outcome.is_ok() {
            let mut kept = Vec::new();
            for buffer in buffers {
                match buffer {
                    Buf::Owned {
                        registered: true, ..
                    }
                    | Buf::Arena { .. } => {}
                    other => kept.push(other),
                }
            }
            kept
        } else {
            Vec::new()
        };
        if !kept.is_empty() {
            self.held.push(Held {
                release_at: number + case.hold,
                _buffers: Box::new(kept),
            });
        }
        outcome
    }
}

impl<T: Element> Arena<T> {
    fn new(comm: &mut Communicator, max_len: usize) -> Result<Arena<T>> {
        let input = comm.alloc::<T>(max_len + 2 * SLACK)?;
        let output = comm.alloc::<T>(max_len + 2 * SLACK)?;
        comm.register(&input)?;
        comm.register(&output)?;
        Ok(Arena { input, output })
    }
}

fn end_arena<T: Element>(comm: &mut Communicator, arena: Option<Box<dyn Any>>) -> Result<()> {
    if let Some(arena) = arena.and_then(|a| a.downcast::<Arena<T>>().ok()) {
        comm.deregister(&arena.input)?;
        comm.deregister(&arena.output)?;
    }
    Ok(())
}

/// The seed of the data of case `number`'s replay `replay` (eager calls:
/// replay 0).
fn data_seed(seed: u64, number: u64, replay: u32) -> u64 {
    Rng::new(seed, (number << 8) | u64::from(replay)).next()
}

/// One all-reduce case in progress on one rank.
struct CaseRun<'c, T> {
    number: u64,
    case: &'c AllReduceCase,
    seed: u64,
    rank: usize,
    world: u32,
    input: Option<Buf<T>>,
    output: Option<Buf<T>>,
}

impl<'c, T: Element> CaseRun<'c, T> {
    fn new(comm: &Communicator, number: u64, case: &'c AllReduceCase, seed: u64) -> Self {
        CaseRun {
            number,
            case,
            seed,
            rank: comm.rank(),
            world: comm.world_size() as u32,
            input: None,
            output: None,
        }
    }

    fn take_buffers(&mut self) -> Vec<Buf<T>> {
        [self.input.take(), self.output.take()]
            .into_iter()
            .flatten()
            .collect()
    }

    fn input_seed(&self, replay: u32) -> u64 {
        data_seed(self.seed, self.number, replay)
    }

    fn guard_seed(&self) -> u64 {
        Rng::new(self.seed ^ 0x6775_6172_6473, self.number).next()
    }

    fn execute(&mut self, state: &mut Soak, comm: &mut Communicator) -> Result<Outcome> {
        let body = self
            .prepare(state, comm)
            .and_then(|()| self.calls(state, comm));
        match body {
            Ok(outcome) => Ok(outcome),
            // Every rank learns of a failure on one.
            Err(error) => judge(comm, T::DTYPE, Err(error)),
        }
    }

    /// Allocates (and registers) the case's buffers and fills the guards
    /// around views.
    fn prepare(&mut self, state: &mut Soak, comm: &mut Communicator) -> Result<()> {
        let input = self.allocate(state, comm, self.case.input, false)?;
        self.input = Some(input);
        if let Some(memory) = self.case.output {
            let output = self.allocate(state, comm, memory, true)?;
            self.output = Some(output);
        }
        Ok(())
    }

    fn allocate(
        &self,
        state: &mut Soak,
        comm: &mut Communicator,
        memory: Memory,
        output: bool,
    ) -> Result<Buf<T>> {
        let len = self.case.len;
        let buffer = match memory {
            Memory::Buffer => Buf::Owned {
                buffer: comm.alloc::<T>(len)?,
                registered: false,
            },
            Memory::Registered => {
                let buffer = comm.alloc::<T>(len)?;
                comm.register(&buffer)?;
                Buf::Owned {
                    buffer,
                    registered: true,
                }
            }
            Memory::Pool(offset) => {
                let offset = offset.on(self.rank);
                let slice = comm
                    .stream()
                    .alloc_zeros::<T>(len + offset + GUARD)
                    .map_err(Error::driver("cuMemAllocAsync"))?;
                Buf::Pool { slice, offset }
            }
            Memory::Arena(offset) => Buf::Arena {
                output,
                offset: SLACK + offset.on(self.rank),
            },
        };
        // The guards hold a known pattern that nothing may change.
        for (ptr, len) in self.guards(state, &buffer)? {
            // SAFETY: guards lie inside the view's parent allocation.
            unsafe {
                state
                    .checks
                    .fill(T::DTYPE, ptr, len, self.guard_seed(), self.rank as u32)
            }?;
        }
        Ok(buffer)
    }

    /// The address of a buffer's first element.
    fn address(&self, state: &mut Soak, buffer: &Buf<T>) -> Result<u64> {
        let size = std::mem::size_of::<T>() as u64;
        Ok(match buffer {
            Buf::Owned { buffer, .. } => buffer.device_address(),
            Buf::Pool { slice, offset } => {
                let stream = slice.stream().clone();
                let (ptr, _record) = slice.device_ptr(&stream);
                ptr + *offset as u64 * size
            }
            Buf::Arena { output, offset } => {
                let arena = state.arena::<T>()?;
                let base = if *output {
                    arena.output.device_address()
                } else {
                    arena.input.device_address()
                };
                base + *offset as u64 * size
            }
        })
    }

    /// The elements around a view that must not change: (address, count).
    fn guards(&self, state: &mut Soak, buffer: &Buf<T>) -> Result<Vec<(u64, usize)>> {
        let size = std::mem::size_of::<T>() as u64;
        let start = self.address(state, buffer)?;
        let end = start + (self.case.len as u64) * size;
        let before = match buffer {
            Buf::Owned { .. } => return Ok(Vec::new()),
            Buf::Pool { offset, .. } => (*offset).min(GUARD),
            Buf::Arena { .. } => GUARD,
        };
        Ok(vec![(start - before as u64 * size, before), (end, GUARD)])
    }

    /// The call, eager or captured and replayed, and its checks.
    fn calls(&mut self, state: &mut Soak, comm: &mut Communicator) -> Result<Outcome> {
        let case = self.case;
        let options = CallOptions {
            algorithm: case.algorithm,
            zero_copy: false,
            max_blocks: None,
        };
        let push = runs_push(comm, case.algorithm, case.len * T::DTYPE.size());
        if case.replays == 0 {
            self.fill(state, comm, 0)?;
            self.call(state, comm, options)?;
            if case.free_input_early {
                self.input = None;
            }
            state.release_due(self.number);
            comm.synchronize()?;
            let outcome = self.check(state, comm, 0, push)?;
            return self.end(comm, outcome);
        }
        let stream = comm.stream().clone();
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .map_err(Error::driver("cuStreamBeginCapture"))?;
        let captured = self.call(state, comm, options);
        let graph = stream
            .end_capture(CUgraphInstantiate_flags(0))
            .map_err(Error::driver("cuStreamEndCapture"));
        captured?;
        let graph = graph?.ok_or_else(|| Error::InvalidConfig("capture made no graph".into()))?;
        comm.register_graph_buffers()?;
        let mut outcome = Outcome::default();
        for replay in 0..case.replays {
            self.fill(state, comm, replay)?;
            graph.launch().map_err(Error::driver("cuGraphLaunch"))?;
            state.release_due(self.number);
            comm.synchronize()?;
            outcome = self.check(state, comm, replay, push)?;
            if !outcome.passed() {
                break;
            }
        }
        drop(graph);
        comm.release_graph_buffers()?;
        self.end(comm, outcome)
    }

    /// Ends registrations of the case's own buffers. Collective.
    fn end(&mut self, comm: &mut Communicator, outcome: Outcome) -> Result<Outcome> {
        for buffer in [&self.input, &self.output].into_iter().flatten() {
            if let Buf::Owned {
                buffer,
                registered: true,
            } = buffer
            {
                comm.deregister(buffer)?;
            }
        }
        Ok(outcome)
    }

    /// Writes replay `replay`'s input and poisons a separate output.
    fn fill(&self, state: &mut Soak, comm: &Communicator, replay: u32) -> Result<()> {
        let len = self.case.len;
        if let Some(input) = &self.input {
            let ptr = self.address(state, input)?;
            // SAFETY: the input holds `len` elements.
            unsafe {
                state.checks.fill(
                    T::DTYPE,
                    ptr,
                    len,
                    self.input_seed(replay),
                    self.rank as u32,
                )
            }?;
        }
        if let Some(output) = &self.output {
            let ptr = self.address(state, output)?;
            poison(comm, ptr, len * T::DTYPE.size())?;
        }
        Ok(())
    }

    /// Enqueues the all-reduce on this rank's buffers.
    fn call(
        &mut self,
        state: &mut Soak,
        comm: &mut Communicator,
        options: CallOptions,
    ) -> Result<()> {
        let len = self.case.len;
        let arena = state.arena::<T>()?;
        let Arena {
            input: arena_input,
            output: arena_output,
        } = arena;
        let input = self
            .input
            .as_mut()
            .ok_or_else(|| Error::InvalidConfig("the case has no input".into()))?;
        let Some(output) = self.output.as_mut() else {
            return match input {
                Buf::Owned { buffer, .. } => comm.all_reduce_in_place(buffer, options),
                Buf::Pool { slice, offset } => {
                    comm.all_reduce_in_place(&mut slice.slice_mut(*offset..*offset + len), options)
                }
                Buf::Arena { offset, .. } => comm.all_reduce_in_place(
                    &mut arena_input.slice_mut(*offset..*offset + len)?,
                    options,
                ),
            };
        };
        macro_rules! to_output {
            ($input:expr) => {
                match output {
                    Buf::Owned { buffer, .. } => comm.all_reduce_with($input, buffer, options),
                    Buf::Pool { slice, offset } => comm.all_reduce_with(
                        $input,
                        &mut slice.slice_mut(*offset..*offset + len),
                        options,
                    ),
                    Buf::Arena { offset, .. } => comm.all_reduce_with(
                        $input,
                        &mut arena_output.slice_mut(*offset..*offset + len)?,
                        options,
                    ),
                }
            };
        }
        match input {
            Buf::Owned { buffer, .. } => to_output!(&*buffer),
            Buf::Pool { slice, offset } => to_output!(&slice.slice(*offset..*offset + len)),
            Buf::Arena { offset, .. } => to_output!(&arena_input.slice(*offset..*offset + len)?),
        }
    }

    /// Checks replay `replay`'s result and what must not have changed, and
    /// judges them with every rank.
    fn check(
        &self,
        state: &mut Soak,
        comm: &Communicator,
        replay: u32,
        push: bool,
    ) -> Result<Outcome> {
        let len = self.case.len;
        let seed = self.input_seed(replay);
        let rank = self.rank as u32;
        let guard = Expect::Input {
            seed: self.guard_seed(),
            rank,
        };
        let result = match (&self.output, &self.input) {
            (Some(output), _) => output,
            (None, Some(input)) => input,
            (None, None) => return Err(Error::InvalidConfig("the case has no buffers".into())),
        };
        let mut untouched = Vec::new();
        for (ptr, count) in self.guards(state, result)? {
            untouched.push((ptr, count, guard));
        }
        if let (Some(input), Some(_)) = (&self.input, &self.output) {
            let ptr = self.address(state, input)?;
            untouched.push((ptr, len, Expect::Input { seed, rank }));
            for (ptr, count) in self.guards(state, input)? {
                untouched.push((ptr, count, guard));
            }
        }
        let examined = Examined {
            dtype: T::DTYPE,
            output: self.address(state, result)?,
            len,
            sum: Expect::Sum {
                seed,
                world: self.world,
                push,
            },
            untouched,
        };
        // SAFETY: every address holds its count of elements (views and
        // guards lie inside their allocations, which are alive).
        let findings = unsafe { examined.findings(&state.checks) };
        judge(comm, T::DTYPE, findings)
    }
}
