//! The random soak (`linkreduce check --random N`): a seeded sequence of
//! all-reduces used the way callers use them, each checked bitwise.
//!
//! Case `n` of seed `s` is the same on every rank and in every run: dtype,
//! a log-uniform length, the algorithm (automatic or forced), in place or
//! not, where each buffer comes from (our allocation, registered or not;
//! cudarc's stream-ordered pool; a view into a registered arena), element
//! offsets that may differ between ranks (so some ranks read in place while
//! others stage), eager or captured in a graph and replayed, and when
//! buffers are freed: right after the call is enqueued, at the end of the
//! case, or in the middle of a later case.

use std::any::Any;
use std::collections::HashMap;
use std::fmt;

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaSlice, DevicePtr};

use super::{judge, poison, runs_push, DeviceChecks, Examined, Expect, Outcome};
use crate::algorithm::{Algorithm, AlgorithmChoice};
use crate::comm::{CallOptions, Communicator};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::memory::DeviceBuffer;

/// What a soak runs.
#[derive(Debug, Clone, Copy)]
pub struct SoakOptions {
    pub seed: u64,
    /// The first case's number (cases before it are skipped, not run).
    pub first_case: u64,
    pub cases: u64,
    /// Longest message, in elements.
    pub max_len: usize,
}

/// Elements checked on each side of a view: nothing may write them.
const GUARD: usize = 16;
/// Largest element offset of a view.
const MAX_OFFSET: usize = 23;
/// Room around views in their parent allocation.
const SLACK: usize = MAX_OFFSET + GUARD + 1;

/// splitmix64: the soak's generator, the same on every rank.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, salt: u64) -> Rng {
        let mut rng = Rng(seed ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        rng.next();
        rng
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// True with probability `percent` / 100.
    fn percent(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// An element offset of a view: the same on every rank, or its own on each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offset {
    Same(usize),
    PerRank(u64),
}

impl Offset {
    fn on(self, rank: usize) -> usize {
        match self {
            Offset::Same(offset) => offset,
            Offset::PerRank(salt) => {
                Rng::new(salt, rank as u64).below(MAX_OFFSET as u64 + 1) as usize
            }
        }
    }

    fn random(rng: &mut Rng) -> Offset {
        match rng.below(4) {
            0 => Offset::Same(0),
            1 => Offset::PerRank(rng.next()),
            _ => Offset::Same(rng.below(MAX_OFFSET as u64 + 1) as usize),
        }
    }
}

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Offset::Same(offset) => write!(f, "+{offset}"),
            Offset::PerRank(_) => write!(f, "+per-rank"),
        }
    }
}

/// Where a buffer of a case comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Memory {
    /// `Communicator::alloc`, not registered.
    Buffer,
    /// `Communicator::alloc`, registered for the case (collective) and
    /// deregistered after it.
    Registered,
    /// cudarc's stream-ordered pool (`CudaStream::alloc_zeros`), viewed at
    /// an element offset.
    Pool(Offset),
    /// A view into this rank's arena, registered for the whole soak.
    Arena(Offset),
}

impl Memory {
    fn random(rng: &mut Rng, output: bool) -> Memory {
        match (rng.below(100), output) {
            (0..=24, _) => Memory::Buffer,
            (25..=39, false) => Memory::Registered,
            (25..=64, _) => Memory::Pool(Offset::random(rng)),
            _ => Memory::Arena(Offset::random(rng)),
        }
    }

    /// Whether buffers of this kind belong to one case, to be freed (or
    /// held) by it.
    fn owned_by_case(self) -> bool {
        matches!(self, Memory::Buffer | Memory::Pool(_))
    }
}

impl fmt::Display for Memory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Memory::Buffer => write!(f, "buffer"),
            Memory::Registered => write!(f, "registered buffer"),
            Memory::Pool(offset) => write!(f, "cudarc pool{offset}"),
            Memory::Arena(offset) => write!(f, "registered arena{offset}"),
        }
    }
}

/// One random all-reduce, the same on every rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SoakCase {
    pub number: u64,
    pub dtype: DType,
    pub len: usize,
    pub algorithm: AlgorithmChoice,
    pub input: Memory,
    /// None: in place, in the input's buffer.
    pub output: Option<Memory>,
    /// 0: eager; n: captured in a CUDA graph and replayed n times.
    pub replays: u32,
    /// The input is freed right after the call is enqueued.
    pub free_input_early: bool,
    /// The case's own buffers are kept this many cases longer and freed in
    /// the middle of a later case (0: freed at the end of this one).
    pub hold: u64,
}

impl SoakCase {
    pub fn generate(seed: u64, number: u64, max_len: usize) -> SoakCase {
        let mut rng = Rng::new(seed, number);
        let dtype = DType::ALL[rng.below(3) as usize];
        let len = ((max_len.max(1) as f64).ln() * rng.unit()).exp() as usize;
        let algorithm = match rng.below(10) {
            0..=3 => AlgorithmChoice::Auto,
            n => AlgorithmChoice::Force(Algorithm::ALL[(n as usize - 4) / 2]),
        };
        let input = Memory::random(&mut rng, false);
        let output = (!rng.percent(40)).then(|| Memory::random(&mut rng, true));
        let replays = if rng.percent(20) {
            1 + rng.below(3) as u32
        } else {
            0
        };
        let free_input_early =
            replays == 0 && output.is_some() && input.owned_by_case() && rng.percent(40);
        let hold = if rng.percent(20) { 1 + rng.below(4) } else { 0 };
        SoakCase {
            number,
            dtype,
            len: len.clamp(1, max_len.max(1)),
            algorithm,
            input,
            output,
            replays,
            free_input_early,
            hold,
        }
    }
}

impl fmt::Display for SoakCase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "case {}: {} len {} {}, input {}",
            self.number, self.dtype, self.len, self.algorithm, self.input
        )?;
        match self.output {
            Some(output) => write!(f, ", output {output}")?,
            None => write!(f, ", in place")?,
        }
        match self.replays {
            0 => write!(f, ", eager")?,
            n => write!(f, ", graph replayed {n}x")?,
        }
        if self.free_input_early {
            write!(f, ", input freed after enqueue")?;
        }
        if self.hold > 0 {
            write!(f, ", buffers held {} more case(s)", self.hold)?;
        }
        Ok(())
    }
}

/// How a soak ended.
#[derive(Debug, Clone)]
pub struct SoakReport {
    /// Cases that ran and passed.
    pub passed: u64,
    /// The first case that failed, and why.
    pub failure: Option<(SoakCase, String)>,
    /// Counts of what the passed cases covered, by name.
    pub covered: Vec<(String, u64)>,
}

/// Runs the soak on this rank; collective (every rank runs the same cases).
/// `passed` hears the count of passed cases after each one.
pub fn soak(
    comm: &mut Communicator,
    options: &SoakOptions,
    mut passed: impl FnMut(u64),
) -> Result<SoakReport> {
    let mut state = Soak::new(comm, options.max_len)?;
    let mut report = SoakReport {
        passed: 0,
        failure: None,
        covered: Vec::new(),
    };
    let mut covered: HashMap<String, u64> = HashMap::new();
    for number in options.first_case..options.first_case + options.cases {
        let case = SoakCase::generate(options.seed, number, options.max_len);
        match state.run(comm, &case, options.seed) {
            Ok(outcome) if outcome.passed() => {
                report.passed += 1;
                passed(report.passed);
                for name in coverage(&case) {
                    *covered.entry(name).or_default() += 1;
                }
            }
            Ok(outcome) => {
                report.failure = Some((case, outcome.to_string()));
                break;
            }
            Err(error) => {
                report.failure = Some((case, format!("error: {error}")));
                break;
            }
        }
    }
    if report.failure.is_none() {
        state.finish(comm)?;
    }
    report.covered = covered.into_iter().collect();
    report.covered.sort();
    Ok(report)
}

/// The coverage counters a passed case adds to.
fn coverage(case: &SoakCase) -> Vec<String> {
    let mut names = vec![
        format!("dtype {}", case.dtype),
        format!("algorithm {}", case.algorithm),
        format!("input {}", kind_name(case.input)),
        match case.output {
            Some(output) => format!("output {}", kind_name(output)),
            None => "in place".into(),
        },
    ];
    let offsets = [Some(case.input), case.output]
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            Memory::Pool(offset) | Memory::Arena(offset) => Some(offset),
            _ => None,
        });
    for offset in offsets {
        names.push(match offset {
            Offset::Same(0) => "view at offset 0".into(),
            Offset::Same(_) => "view at an offset".into(),
            Offset::PerRank(_) => "view at per-rank offsets".into(),
        });
    }
    if case.replays > 0 {
        names.push("graph".into());
    }
    if case.free_input_early {
        names.push("input freed after enqueue".into());
    }
    if case.hold > 0 {
        names.push("buffers freed in a later case".into());
    }
    names
}

fn kind_name(memory: Memory) -> &'static str {
    match memory {
        Memory::Buffer => "buffer",
        Memory::Registered => "registered buffer",
        Memory::Pool(_) => "cudarc pool",
        Memory::Arena(_) => "registered arena",
    }
}

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
        match case.dtype {
            DType::F32 => self.run_typed::<f32>(comm, case, seed),
            DType::F16 => self.run_typed::<half::f16>(comm, case, seed),
            DType::BF16 => self.run_typed::<half::bf16>(comm, case, seed),
        }
    }

    fn run_typed<T: Element>(
        &mut self,
        comm: &mut Communicator,
        case: &SoakCase,
        seed: u64,
    ) -> Result<Outcome> {
        if case.len > self.max_len {
            return Err(Error::InvalidConfig(format!(
                "case length {} exceeds the soak's {}",
                case.len, self.max_len
            )));
        }
        let mut run = CaseRun::<T>::new(comm, case, seed);
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
                release_at: case.number + case.hold,
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

/// One case in progress on one rank.
struct CaseRun<'c, T> {
    case: &'c SoakCase,
    seed: u64,
    rank: usize,
    world: u32,
    input: Option<Buf<T>>,
    output: Option<Buf<T>>,
}

impl<'c, T: Element> CaseRun<'c, T> {
    fn new(comm: &Communicator, case: &'c SoakCase, seed: u64) -> Self {
        CaseRun {
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

    /// The seed of replay `replay`'s inputs (eager calls: replay 0).
    fn input_seed(&self, replay: u32) -> u64 {
        Rng::new(self.seed, (self.case.number << 8) | u64::from(replay)).next()
    }

    fn guard_seed(&self) -> u64 {
        Rng::new(self.seed ^ 0x6775_6172_6473, self.case.number).next()
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
        };
        let push = runs_push(comm, case.algorithm, case.len * T::DTYPE.size());
        if case.replays == 0 {
            self.fill(state, comm, 0)?;
            self.call(state, comm, options)?;
            if case.free_input_early {
                self.input = None;
            }
            state.release_due(case.number);
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
            state.release_due(case.number);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cases_depend_on_seed_and_number_only() {
        assert_eq!(
            SoakCase::generate(7, 12, 1 << 20),
            SoakCase::generate(7, 12, 1 << 20)
        );
        assert_ne!(
            SoakCase::generate(7, 12, 1 << 20),
            SoakCase::generate(8, 12, 1 << 20)
        );
        assert_ne!(
            SoakCase::generate(7, 12, 1 << 20),
            SoakCase::generate(7, 13, 1 << 20)
        );
    }

    #[test]
    fn cases_cover_every_choice() {
        let cases: Vec<SoakCase> = (0..5000)
            .map(|n| SoakCase::generate(1, n, 1 << 22))
            .collect();
        assert!(cases.iter().all(|c| (1..=1 << 22).contains(&c.len)));
        let short = cases.iter().filter(|c| c.len < 100).count();
        let long = cases.iter().filter(|c| c.len > 1 << 20).count();
        assert!(
            short > 500 && long > 200,
            "log-uniform lengths: {short} short, {long} long"
        );
        for dtype in DType::ALL {
            assert!(cases.iter().any(|c| c.dtype == dtype));
        }
        for algorithm in Algorithm::ALL {
            assert!(cases
                .iter()
                .any(|c| c.algorithm == AlgorithmChoice::Force(algorithm)));
        }
        assert!(cases.iter().any(|c| c.algorithm == AlgorithmChoice::Auto));
        assert!(cases.iter().any(|c| c.output.is_none()));
        assert!(cases.iter().any(|c| c.replays > 0 && c.output.is_none()));
        assert!(cases.iter().any(|c| c.free_input_early));
        assert!(cases.iter().any(|c| c.hold > 0));
        let memories: Vec<Memory> = cases
            .iter()
            .flat_map(|c| [Some(c.input), c.output])
            .flatten()
            .collect();
        assert!(memories.contains(&Memory::Buffer));
        assert!(memories.contains(&Memory::Registered));
        assert!(memories
            .iter()
            .any(|m| matches!(m, Memory::Pool(Offset::PerRank(_)))));
        assert!(memories
            .iter()
            .any(|m| matches!(m, Memory::Arena(Offset::Same(o)) if o % 8 != 0)));
        assert!(
            cases.iter().all(|c| c.output != Some(Memory::Registered)),
            "outputs are never registered"
        );
    }

    #[test]
    fn per_rank_offsets_differ_between_ranks_and_stay_in_range() {
        let offset = Offset::PerRank(99);
        let offsets: Vec<usize> = (0..8).map(|rank| offset.on(rank)).collect();
        assert!(offsets.iter().all(|&o| o <= MAX_OFFSET));
        assert!(offsets.windows(2).any(|w| w[0] != w[1]));
        assert_eq!(offset.on(3), offset.on(3));
    }
}
