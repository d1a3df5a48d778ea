// Chunked push: a one-shot all-reduce for large messages, with one flag
// per chunk and no barrier. Appended to push.cu before compilation
// (docs/design.md, "Chunked push").
//
// The message is cut into chunks; block b takes chunks b, b+G, b+2G, ...
// Each rank writes its chunk into a slot of every peer's receive ring,
// then, once every peer's copy of the same chunk has landed in its own
// ring, sums them in rank order with its own input and writes the output.
// Only stores cross NVLink (they reach higher bandwidth than loads:
// ../shared/GPU.md), and each block sends up to LR_CHUNK_AHEAD chunks
// ahead of the one it reduces, so the transfer overlaps the reduction.
//
// Rings live in each rank's scratch: one per (sender, block), of
// LR_CHUNK_SLOTS slots. Two counters per (block, peer) in the signal
// region (barrier.cu, ChunkSignal) order a slot's reuse:
// - ready: written by the sender after the chunk's data (a release), the
//   number of chunks it has put in this block's ring here;
// - freed: written by the receiver after reading the chunk (a release),
//   the number of the sender's chunks it has finished with.
// A sender writes its chunk number s into slot s % LR_CHUNK_SLOTS only
// once the receiver freed chunk s - LR_CHUNK_SLOTS. Chunk numbers count
// on across calls (ChunkSignal::sequence, by block): every rank launches
// the same grid and chunk count, so all ranks agree on them.
//
// Nothing reads this rank's input but this rank, and peers write only into
// scratch: no start barrier (a slot is written only once freed), no end
// barrier (the input is free once this kernel ends), and the input may be
// the output (each chunk is read for sending before its sum is written).
// A kernel that uses scratch with barriers (two-stage) after this one
// starts only after its start barrier, which every rank reaches only after
// it read every chunk sent to it; one before this one ends with a barrier
// that every rank reaches only after it finished with scratch.

// The "barrier" a fault names when a chunked push waited in vain for a
// peer: its chunk to arrive, or a slot to be freed.
#define LR_CHUNK_DATA_WAIT 97u
#define LR_CHUNK_SLOT_WAIT 98u

struct ChunkedArgs {
  BarrierArgs bar;     // peers' signal regions, fault report, deadline
  const char* input;   // this rank's input (16-byte aligned)
  char* output;        // this rank's output (16-byte aligned)
  u64 count;           // elements
  u64 chunk_packets;   // packets per chunk (the last may be shorter)
  u64 slot_bytes;      // bytes between ring slots (at least a chunk)
};

// Packets each thread moves per step: loads issued before stores.
#define LR_CHUNK_UNROLL 4

// Where the slot for chunk number `sequence` of `sender`'s ring of block
// `block` starts in `receiver`'s scratch. Rings are numbered by the
// sender's place among the receiver's peers.
static __device__ __forceinline__ Pack* lr_ring_slot(const ChunkedArgs& a, int receiver,
                                                     int sender, u64 sequence) {
  const u64 place = (u64)(sender < receiver ? sender : sender - 1);
  const u64 ring = place * LR_CHUNK_BLOCKS + blockIdx.x;
  const u64 slot = ring * LR_CHUNK_SLOTS + sequence % LR_CHUNK_SLOTS;
  return (Pack*)(lr_scratch(a.bar, receiver) + slot * a.slot_bytes);
}

// Thread `peer`'s wait until the counter at `at` (written by rank `peer`)
// reaches `target`. Past the deadline it records the fault (`what` names
// the wait) and sets `timed_out`.
static __device__ __forceinline__ void lr_wait_for_count(const BarrierArgs& a, u64* at, u64 target,
                                                         u32 peer, u32 what, bool& timed_out) {
  u64 start = 0;
  u32 spins = 0;
  for (;;) {
    const u64 seen = lr_load_acquire(at);
    if (seen >= target) return;
    if ((++spins & LR_SPIN_MASK) == 0u && lr_past_deadline(start, a.timeout_ns)) {
      lr_record_fault(a, peer, what, (u32)target, (u32)seen);
      timed_out = true;
      return;
    }
  }
}

// Every thread of the block: one thread per peer waits for its counter
// (`counter(peer)`, in this rank's signal region) to reach `target`.
// Returns false in every thread if some peer did not get there in time.
template <int W, typename Counter>
static __device__ __forceinline__ bool lr_wait_peers(const ChunkedArgs& a, Counter counter,
                                                     u64 target, u32 what) {
  bool timed_out = false;
  const u32 peer = threadIdx.x;
  if (peer < W && peer != a.bar.rank) {
    lr_wait_for_count(a.bar, counter(peer), target, peer, what, timed_out);
  }
  return !__syncthreads_or(timed_out);
}

// Every thread of the block, after its part of a chunk: one thread per
// peer tells it `value` through `counter(peer)` (in the peer's region), as
// a release, so that what the block did before is done when it is seen.
template <int W, typename Counter>
static __device__ __forceinline__ void lr_tell_peers(const ChunkedArgs& a, Counter counter,
                                                     u64 value) {
  __syncthreads();
  const u32 peer = threadIdx.x;
  if (peer < W && peer != a.bar.rank) lr_store_release(counter(peer), value);
}

// Runs over the `n` packets from packet `first` that this thread takes,
// LR_CHUNK_UNROLL at a time: `load(j, at, k)` for each packet of a batch,
// then `store(j, at, k)` for each, so that a thread has several loads in
// flight before it stores: j is the packet's index in the message, `at`
// its index in the chunk, k its place in the batch.
template <typename Load, typename Store>
static __device__ __forceinline__ void lr_chunk_packets(u64 first, u64 n, Load load, Store store) {
  for (u64 i = threadIdx.x; i < n; i += (u64)LR_THREADS * LR_CHUNK_UNROLL) {
#pragma unroll
    for (int k = 0; k < LR_CHUNK_UNROLL; ++k) {
      const u64 at = i + (u64)k * LR_THREADS;
      if (at < n) load(first + at, at, k);
    }
#pragma unroll
    for (int k = 0; k < LR_CHUNK_UNROLL; ++k) {
      const u64 at = i + (u64)k * LR_THREADS;
      if (at < n) store(first + at, at, k);
    }
  }
}

template <typename D, int W>
static __device__ __forceinline__ void lr_chunked_push(const ChunkedArgs& a) {
  // Before the sequence and the counters: the previous call's work.
  lr_wait_for_previous_kernel();
  const int rank = (int)a.bar.rank;
  ChunkSignal* own = &a.bar.peers.rank[rank]->chunks;
  const u64 first_sequence = own->sequence[blockIdx.x];
  const u64 packs = (a.count + D::PER_PACK - 1) / D::PER_PACK;
  const u64 chunks = (packs + a.chunk_packets - 1) / a.chunk_packets;
  const u64 mine = blockIdx.x < chunks ? (chunks - blockIdx.x + gridDim.x - 1) / gridDim.x : 0;
  // Chunk k of this block: its first packet and length.
  const auto chunk_first = [&](u64 k) { return (blockIdx.x + k * gridDim.x) * a.chunk_packets; };
  const auto chunk_length = [&](u64 k) {
    const u64 left = packs - chunk_first(k);
    return left < a.chunk_packets ? left : a.chunk_packets;
  };
  const auto ready = [&](u32 peer) { return &own->ready[blockIdx.x][peer]; };
  const auto freed = [&](u32 peer) { return &own->freed[blockIdx.x][peer]; };
  const auto peer_ready = [&](u32 peer) { return &a.bar.peers.rank[peer]->chunks.ready[blockIdx.x][rank]; };
  const auto peer_freed = [&](u32 peer) { return &a.bar.peers.rank[peer]->chunks.freed[blockIdx.x][rank]; };

  // Sends chunk k: waits until every peer freed its slot, writes the data
  // there, then says it is ready.
  const auto send = [&](u64 k) {
    const u64 sequence = first_sequence + k;
    if (sequence >= LR_CHUNK_SLOTS &&
        !lr_wait_peers<W>(a, freed, sequence - LR_CHUNK_SLOTS + 1, LR_CHUNK_SLOT_WAIT)) {
      return false;
    }
    Pack* slots[W];
#pragma unroll
    for (int r = 0; r < W; ++r) slots[r] = r != rank ? lr_ring_slot(a, r, rank, sequence) : nullptr;
    Pack data[LR_CHUNK_UNROLL];
    lr_chunk_packets(
        chunk_first(k), chunk_length(k),
        [&](u64 j, u64, int b) { data[b] = lr_load_packet<D>(a.input, j, a.count); },
        [&](u64, u64 at, int b) {
#pragma unroll
          for (int r = 0; r < W; ++r) {
            if (r != rank) slots[r][at] = data[b];
          }
        });
    lr_tell_peers<W>(a, peer_ready, sequence + 1);
    return true;
  };

  // Reduces chunk k: waits until every peer's copy is here, sums in rank
  // order into the output, then frees the slots.
  const auto reduce = [&](u64 k) {
    const u64 sequence = first_sequence + k;
    if (!lr_wait_peers<W>(a, ready, sequence + 1, LR_CHUNK_DATA_WAIT)) return false;
    const Pack* slots[W];
#pragma unroll
    for (int r = 0; r < W; ++r) slots[r] = r != rank ? lr_ring_slot(a, rank, r, sequence) : nullptr;
    Pack data[LR_CHUNK_UNROLL][W];
    lr_chunk_packets(
        chunk_first(k), chunk_length(k),
        [&](u64 j, u64 at, int b) {
#pragma unroll
          for (int r = 0; r < W; ++r) {
            data[b][r] = r != rank ? slots[r][at] : lr_load_packet<D>(a.input, j, a.count);
          }
        },
        [&](u64 j, u64, int b) {
          lr_store_packet<D>(a.output, j, a.count, lr_reduce<D, W>(data[b]));
        });
    lr_tell_peers<W>(a, peer_freed, sequence + 1);
    return true;
  };

  for (u64 step = 0; step < mine + LR_CHUNK_AHEAD; ++step) {
    if (step < mine && !send(step)) return;
    // The last phase: every chunk of this block is sent.
    if (step + 1 == mine) lr_launch_dependents(a.bar);
    if (step >= LR_CHUNK_AHEAD && !reduce(step - LR_CHUNK_AHEAD)) return;
  }
  if (threadIdx.x == 0) own->sequence[blockIdx.x] = first_sequence + mine;
}

// `__grid_constant__`: as for the kernels of allreduce.cu.
#define LR_CHUNKED_KERNELS(NAME, D, W)                                                          \
  extern "C" __global__ void __launch_bounds__(LR_THREADS)                                     \
      linkreduce_chunked_push_##NAME##_w##W(const __grid_constant__ ChunkedArgs a) {           \
    lr_chunked_push<D, W>(a);                                                                  \
  }

LR_FOR_WORLDS(LR_CHUNKED_KERNELS, f32, F32)
LR_FOR_WORLDS(LR_CHUNKED_KERNELS, f16, F16)
LR_FOR_WORLDS(LR_CHUNKED_KERNELS, bf16, BF16)
