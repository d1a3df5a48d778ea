// The barrier between GPUs: the one place that defines how ranks meet.
//
// Compiled by NVRTC with no CUDA headers: only built-in types and functions
// and inline PTX. The host mirrors the constants and layouts below in
// src/kernels/mod.rs; change both together.

typedef unsigned int u32;
typedef unsigned long long u64;

#define LR_MAX_RANKS 8
#define LR_MAX_BLOCKS 256

// One rank's synchronisation counters, at the start of its signal region.
// counters[parity][block][peer] is written by `peer` and read by the owner.
// Two arrays alternate (by epoch parity) because a fast peer can already be
// at the next barrier while a slow owner still waits on this one.
struct Signal {
  u32 counters[2][LR_MAX_BLOCKS][LR_MAX_RANKS];
  // Per block: the last epoch this block passed. Only the owner touches it.
  u32 epoch[LR_MAX_BLOCKS];
};

// Every rank's signal region, as seen from this rank.
struct SignalPeers {
  Signal* rank[LR_MAX_RANKS];
};

// What a timed-out block leaves for the host (mapped host memory).
struct Fault {
  u32 code;     // 0: none, 1: barrier timeout
  u32 rank;     // the rank that gave up waiting
  u32 peer;     // the rank it waited for
  u32 barrier;  // which barrier of the kernel (0 = start; 99 = push data)
  u32 block;
};

// Everything a kernel needs to synchronise; passed by value.
struct BarrierArgs {
  SignalPeers peers;
  Fault* fault;
  u64 timeout_ns;
  u32 rank;
};

static __device__ __forceinline__ u64 lr_now_ns() {
  u64 t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

static __device__ __forceinline__ void lr_store_relaxed(u32* p, u32 v) {
  asm volatile("st.volatile.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

static __device__ __forceinline__ u32 lr_load_relaxed(u32* p) {
  u32 v;
  asm volatile("ld.volatile.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

static __device__ __forceinline__ void lr_store_release(u32* p, u32 v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

static __device__ __forceinline__ u32 lr_load_acquire(u32* p) {
  u32 v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Several blocks may time out together; any one of their reports is true,
// so plain stores suffice (atomics on host memory need PCIe atomics).
static __device__ void lr_record_fault(const BarrierArgs& a, u32 peer, u32 barrier) {
  volatile Fault* f = a.fault;
  f->rank = a.rank;
  f->peer = peer;
  f->barrier = barrier;
  f->block = blockIdx.x;
  __threadfence_system();
  f->code = 1;
  __threadfence_system();
}

// Block-wide barrier with block `blockIdx.x` of every rank.
//
// Every thread of the block must call it. `epoch` must grow by one per
// barrier of this block (the caller derives it from Signal::epoch read once
// at kernel start). PUBLISH makes the writes this block made before the
// barrier visible to peers that read them after it.
// Returns false (in every thread) if some peer did not arrive in time; the
// fault is then recorded and the caller must leave the kernel.
template <int W, bool PUBLISH>
static __device__ __forceinline__ bool lr_barrier(const BarrierArgs& a, u32 epoch, u32 barrier) {
  // Arrive only once every thread of the block is done with the work before
  // the barrier: a peer that sees the arrival may overwrite what this block
  // still reads, or read what it has not yet written.
  __syncthreads();
  bool timed_out = false;
  if (threadIdx.x < W) {
    u32 parity = epoch & 1u;
    Signal* self = a.peers.rank[a.rank];
    u32* to_peer = &a.peers.rank[threadIdx.x]->counters[parity][blockIdx.x][a.rank];
    u32* from_peer = &self->counters[parity][blockIdx.x][threadIdx.x];
    if (PUBLISH) {
      lr_store_release(to_peer, epoch);
    } else {
      lr_store_relaxed(to_peer, epoch);
    }
    u64 start = 0;
    u32 spins = 0;
    while ((PUBLISH ? lr_load_acquire(from_peer) : lr_load_relaxed(from_peer)) != epoch) {
      // Reading the clock on every spin slows the common, short wait.
      if ((++spins & 1023u) == 0u) {
        u64 now = lr_now_ns();
        if (start == 0) {
          start = now;
        } else if (now - start > a.timeout_ns) {
          lr_record_fault(a, threadIdx.x, barrier);
          timed_out = true;
          break;
        }
      }
    }
  }
  return !__syncthreads_or(timed_out);
}

// Stores the last epoch this block passed, for the next kernel on this rank.
static __device__ __forceinline__ void lr_finish_epochs(const BarrierArgs& a, u32 last_epoch) {
  if (threadIdx.x == 0) a.peers.rank[a.rank]->epoch[blockIdx.x] = last_epoch;
}
