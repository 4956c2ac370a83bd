// runtime.cpp: runs one kernel launch on the CPU (cuda/emu/README.md).
//
// Blocks run one after another on the calling OS thread (so `__shared__` variables can be
// plain statics); each CUDA thread of the block is a fiber on its own stack. A fiber runs until
// it reaches a point where it must wait for others (__syncthreads, a warp collective,
// mma.sync), then the worker's scheduler resumes the next fiber. A barrier opens when every live (not yet returned)
// thread of its scope has arrived; a full round in which no fiber makes progress is a deadlock
// (divergent __syncthreads, a collective some lanes skip) and fails the launch with a message.
#include "runtime.h"

#include <sys/mman.h>
#include <setjmp.h>
#include <unistd.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#include "emu.h"

namespace qlr_emu {
thread_local Thread* cur = nullptr;
thread_local Dim block_idx, block_dim, grid_dim;
thread_local unsigned char* dyn_smem = nullptr;

namespace {
constexpr int kMaxThreads = 1024;
constexpr size_t kDefaultStack = 256 << 10;

// One warp's meeting point. Values of collective `g` live in parity g & 1: a lane can only
// reach collective g + 2 (which reuses the parity) after every lane arrived at g + 1, i.e.
// after every lane has read the results of g.
struct Warp {
    int live = 0, arrived = 0;
    unsigned gen = 0;
    uint64_t val[2][32];
    uint32_t present[2];
    unsigned mma_a[2][32][4], mma_b[2][32][2];
};

// A fiber starts through makecontext/setcontext (once per block) and after that switches with
// _setjmp/_longjmp, which unlike swapcontext do not save and restore the signal mask with a
// system call: a warp collective costs 64 switches, so this is most of the emulator's speed.
struct Fiber {
    ucontext_t ctx;
    jmp_buf jb;
    Thread t;
    bool started = false;
    bool done = false;
};

struct Worker {
    jmp_buf main;
    std::vector<Fiber> fibers;
    std::vector<unsigned char*> stacks;
    std::vector<unsigned char> smem;
    Warp warps[kMaxThreads / 32];
    int live = 0, bar_arrived = 0;
    unsigned bar_gen = 0;
    uint64_t progress = 0;
    int current = -1;
    const Launch* launch = nullptr;
    std::string error;
};
thread_local Worker* self = nullptr;

// QLR_EMU_SCHEDULE=reverse runs the blocks of a grid, and the ready threads of a block in each
// scheduling round, last to first. Between two barriers the threads of a block run one after
// another, so a missing __syncthreads/__syncwarp (thread i reading shared memory that thread j
// writes in the same interval) gives the right answer in one order and a stale value in the
// other; lane E runs the GPU tests in both orders. Likewise for blocks that read what other
// blocks of the same launch write.
Schedule schedule_from_env() {
    const char* e = std::getenv("QLR_EMU_SCHEDULE");
    return e && std::strcmp(e, "reverse") == 0 ? Schedule::Reverse : Schedule::Forward;
}
Schedule schedule = schedule_from_env();

size_t stack_bytes() {
    const char* e = std::getenv("QLR_EMU_STACK_KIB");
    return e ? size_t(std::atoll(e)) << 10 : kDefaultStack;
}

void yield() {
    Worker& w = *self;
    if (!_setjmp(w.fibers[w.current].jb)) _longjmp(w.main, 1);
}

Warp& my_warp() { return self->warps[cur->linear >> 5]; }

// Arrive at the calling warp's meeting point and wait until every live lane has arrived.
// Returns the generation whose slots hold this collective's values.
template <typename Write> unsigned warp_meet(Write write) {
    Warp& w = my_warp();
    const unsigned g = w.gen;
    write(w, g & 1, cur->linear & 31);
    w.present[g & 1] |= 1u << (cur->linear & 31);
    w.arrived++;
    self->progress++;
    if (w.arrived == w.live) {
        w.arrived = 0;
        w.present[(g + 1) & 1] = 0;
        w.gen++;
    } else {
        while (w.gen == g) yield();
    }
    return g;
}

void fiber_main() {
    Worker& w = *self;
    Fiber& f = w.fibers[w.current];
    w.launch->kernel->call(w.launch->kernel->fn, w.launch->params);
    f.done = true;
    w.progress++;
    w.live--;
    Warp& wp = w.warps[f.t.linear >> 5];
    wp.live--;
    // A thread that returns no longer takes part in barriers: open any it was the last for.
    if (w.bar_arrived > 0 && w.bar_arrived == w.live) {
        w.bar_arrived = 0;
        w.bar_gen++;
    }
    if (wp.arrived > 0 && wp.arrived == wp.live) {
        wp.arrived = 0;
        wp.present[(wp.gen + 1) & 1] = 0;
        wp.gen++;
    }
    _longjmp(w.main, 1);  // never returns: its stack is reused by the next block
}

// Runs block `b` of the launch; a deadlock sets `w.error`.
void run_block(Worker& w, const Launch& l, Dim b) {
    const int nt = int(l.block.x * l.block.y * l.block.z);
    block_idx = b;
    block_dim = l.block;
    grid_dim = l.grid;
    if (!w.smem.empty()) {
        // Shared memory starts as garbage on a GPU; all-ones bytes are NaN in f32 and bf16,
        // so a kernel that reads dynamic shared memory before writing it shows it.
        std::memset(w.smem.data(), 0xff, w.smem.size());
    }
    dyn_smem = w.smem.empty() ? nullptr : w.smem.data();
    w.live = nt;
    w.bar_arrived = 0;
    w.bar_gen = 0;
    for (int i = 0; i < (nt + 31) / 32; ++i) {
        Warp& wp = w.warps[i];
        wp.live = std::min(32, nt - 32 * i);
        wp.arrived = 0;
        wp.gen = 0;
        wp.present[0] = wp.present[1] = 0;
    }
    const size_t sb = stack_bytes();
    for (int i = 0; i < nt; ++i) {
        Fiber& f = w.fibers[i];
        f.done = false;
        f.t.linear = i;
        f.t.tid = Dim{unsigned(i % l.block.x), unsigned(i / l.block.x % l.block.y),
                      unsigned(i / (l.block.x * l.block.y))};
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = w.stacks[i];
        f.ctx.uc_stack.ss_size = sb;
        f.ctx.uc_link = nullptr;
        makecontext(&f.ctx, fiber_main, 0);
        f.started = false;
    }
    while (w.live > 0) {
        const uint64_t before = w.progress;
        const bool rev = schedule == Schedule::Reverse;
        for (int j = 0; j < nt; ++j) {
            const int i = rev ? nt - 1 - j : j;
            if (w.fibers[i].done) continue;
            Fiber& f = w.fibers[i];
            w.current = i;
            cur = &f.t;
            if (!_setjmp(w.main)) {
                if (!f.started) {
                    f.started = true;
                    setcontext(&f.ctx);
                }
                _longjmp(f.jb, 1);
            }
        }
        if (w.progress == before) {
            int at_bar = w.bar_arrived, at_warp = 0;
            for (int i = 0; i < (nt + 31) / 32; ++i) at_warp += w.warps[i].arrived;
            char msg[256];
            std::snprintf(msg, sizeof msg,
                          "deadlock: %d live threads, %d waiting at __syncthreads, %d at warp collectives "
                          "(divergent barrier or collective)",
                          w.live, at_bar, at_warp);
            w.error = msg;
            return;
        }
    }
}

std::mutex launch_mutex;

// The one worker (launches are serialised by launch_mutex), with fibers and stacks for `nt`
// threads and `smem` bytes of dynamic shared memory; nullptr if stacks cannot be mapped.
Worker* worker(int nt, size_t smem) {
    static Worker the_worker;
    Worker* w = &the_worker;
    const size_t sb = stack_bytes();
    if (w->fibers.size() < size_t(nt)) w->fibers.resize(nt);
    while (w->stacks.size() < size_t(nt)) {
        // An inaccessible page below each stack: a kernel thread that overflows its stack
        // faults (driver.cpp reports it) instead of writing into its neighbour's.
        const size_t page = size_t(sysconf(_SC_PAGESIZE));
        void* p = mmap(nullptr, sb + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) return nullptr;
        if (mprotect(p, page, PROT_NONE) != 0) return nullptr;
        w->stacks.push_back(static_cast<unsigned char*>(p) + page);
    }
    w->smem.assign(smem, 0);
    w->error.clear();
    return w;
}
}  // namespace

int lane_id() { return cur->linear & 31; }
void set_schedule(Schedule s) { schedule = s; }

void syncthreads() {
    Worker& w = *self;
    const unsigned g = w.bar_gen;
    w.bar_arrived++;
    w.progress++;
    if (w.bar_arrived == w.live) {
        w.bar_arrived = 0;
        w.bar_gen++;
    } else {
        while (w.bar_gen == g) yield();
    }
}

uint64_t warp_exchange(uint64_t v, int src) {
    const unsigned g = warp_meet([v](Warp& w, int p, int lane) { w.val[p][lane] = v; });
    Warp& w = my_warp();
    if (!(w.present[g & 1] >> src & 1)) {
        // Reading a lane that has returned (or does not exist): undefined on the GPU.
        self->error = "warp shuffle reads a lane that is not active";
    }
    return w.val[g & 1][src];
}

bool warp_any(bool p) {
    const unsigned g = warp_meet([p](Warp& w, int par, int lane) { w.val[par][lane] = p; });
    Warp& w = my_warp();
    for (int i = 0; i < 32; ++i)
        if ((w.present[g & 1] >> i & 1) && w.val[g & 1][i]) return true;
    return false;
}

// PTX ISA, mma.m16n8k16 with .bf16: lane = 4·group + t (group = lane / 4, t = lane % 4).
//   A (16×16, row-major) a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..], a[2] = A[g][2t+8..],
//                        a[3] = A[g+8][2t+8..];
//   B (16×8, "col")      b[0] = B[2t..2t+1][g], b[1] = B[2t+8..2t+9][g];
//   C/D (16×8 f32)       d[0..1] = D[g][2t..2t+1], d[2..3] = D[g+8][2t..2t+1];
// each 32-bit register holding two bf16, the lower-index element in the low half.
void mma_m16n8k16_bf16(float* d, const unsigned* a, const unsigned* b) {
    const unsigned g = warp_meet([a, b](Warp& w, int p, int lane) {
        for (int i = 0; i < 4; ++i) w.mma_a[p][lane][i] = a[i];
        for (int i = 0; i < 2; ++i) w.mma_b[p][lane][i] = b[i];
    });
    Warp& w = my_warp();
    if (w.present[g & 1] != 0xffffffffu) self->error = "mma.sync with fewer than 32 active lanes";
    auto bf = [](unsigned reg, int hi) {
        const uint32_t u = (hi ? reg >> 16 : reg & 0xffffu) << 16;
        float f;
        std::memcpy(&f, &u, 4);
        return f;
    };
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; ++l) {
        const int gr = l >> 2, t = l & 3;
        const unsigned* ra = w.mma_a[g & 1][l];
        const unsigned* rb = w.mma_b[g & 1][l];
        for (int h = 0; h < 2; ++h) {
            A[gr][2 * t + h] = bf(ra[0], h);
            A[gr + 8][2 * t + h] = bf(ra[1], h);
            A[gr][2 * t + 8 + h] = bf(ra[2], h);
            A[gr + 8][2 * t + 8 + h] = bf(ra[3], h);
            B[2 * t + h][gr] = bf(rb[0], h);
            B[2 * t + 8 + h][gr] = bf(rb[1], h);
        }
    }
    const int lane = cur->linear & 31, gr = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4; ++i) {
        const int r = gr + (i >= 2 ? 8 : 0), c = 2 * t + (i & 1);
        // bf16 × bf16 is exact in f32; the sum is in k order (the tensor core's order is not
        // specified, so tests hold GPU and emulator to the same summation-order tolerance).
        float s = 0.f;
        for (int k = 0; k < 16; ++k) s += A[r][k] * B[k][c];
        d[i] += s;
    }
}

std::vector<const Kernel*>& registry() {
    static std::vector<const Kernel*> r;
    return r;
}
void register_kernel(const Kernel* k) { registry().push_back(k); }
const Kernel* find_kernel(const char* name) {
    for (const Kernel* k : registry())
        if (std::strcmp(k->name, name) == 0) return k;
    return nullptr;
}

std::string run(const Launch& l) {
    std::lock_guard<std::mutex> guard(launch_mutex);
    const int nt = int(l.block.x * l.block.y * l.block.z);
    if (nt <= 0 || nt > kMaxThreads) return "block of " + std::to_string(nt) + " threads (1..1024 allowed)";
    const size_t nblocks = size_t(l.grid.x) * l.grid.y * l.grid.z;
    if (nblocks == 0) return "empty grid";
    Worker* w = worker(nt, l.smem);
    if (!w) return "cannot map fiber stacks";
    w->launch = &l;
    self = w;
    std::string err;
    for (size_t j = 0; j < nblocks && err.empty(); ++j) {
        const size_t i = schedule == Schedule::Reverse ? nblocks - 1 - j : j;
        const Dim b{unsigned(i % l.grid.x), unsigned(i / l.grid.x % l.grid.y),
                    unsigned(i / (size_t(l.grid.x) * l.grid.y))};
        run_block(*w, l, b);
        if (!w->error.empty()) {
            char where[96];
            std::snprintf(where, sizeof where, " (block %u,%u,%u)", b.x, b.y, b.z);
            err = w->error + where;
        }
    }
    self = nullptr;
    return err;
}
}  // namespace qlr_emu
