// The fiber scheduler behind cuda_emulation.h.
#include "cuda_emulation.h"

#include <c10/util/Exception.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <unordered_map>
#include <string>
#include <vector>

#include "../kernel_common.h"

// switch_stacks(&save, load): saves the callee-saved registers and the SSE/x87
// control words on the current stack, stores its pointer in save, and resumes
// the stack `load` (saved the same way, or prepared by prepare_stack). A few
// instructions, where ucontext's swapcontext makes a system call per switch.
extern "C" void alphanet_emulation_switch_stacks(void** save, void* load);
asm(R"(
  .pushsection .text
  .p2align 4
  .type alphanet_emulation_switch_stacks, @function
alphanet_emulation_switch_stacks:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size alphanet_emulation_switch_stacks, .-alphanet_emulation_switch_stacks
  .popsection
)");

namespace alphanet::emulation {
namespace {

constexpr int kWarpSize = 32;
constexpr unsigned int kMaxBlockThreads = 1024;
constexpr size_t kMaxDynamicShared = 48 * 1024;  // without the opt-in attribute
constexpr size_t kStackBytes = 128 * 1024;

std::atomic<bool> emulation_on{false};
std::atomic<uint64_t> schedule_seed{0};

enum class State { Ready, AtBlockBarrier, AtWarpBarrier, Done };

struct Fiber {
  void* stack_pointer = nullptr;
  Coordinates coordinates;
  int warp = 0, lane = 0, shuffle_phase = 0;
  int vote = 0;  // at a block barrier: the thread's predicate; after it: the OR over the block
  unsigned int warp_mask = 0;  // at a warp barrier: the lanes it names
  State state = State::Ready;
};

// A launch's dynamic shared memory: `bytes` (rounded up to 16) that end where
// an inaccessible page begins. A kernel that reads or writes past the shared
// memory its launch asked for then faults, as on a GPU, where a heap buffer
// would let it carry on.
class GuardedShared {
 public:
  explicit GuardedShared(size_t bytes) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE)), used = (bytes + 15) / 16 * 16;
    const size_t pages = (used + page - 1) / page * page;
    mapping_bytes_ = pages + page;
    void* base = mmap(nullptr, mapping_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(base != MAP_FAILED, "CUDA emulation: could not map ", mapping_bytes_, " bytes of shared memory");
    mapping_ = static_cast<unsigned char*>(base);
    if (mprotect(mapping_ + pages, page, PROT_NONE) != 0) {
      munmap(mapping_, mapping_bytes_);
      TORCH_CHECK(false, "CUDA emulation: could not guard shared memory");
    }
    data_ = mapping_ + pages - used;
  }
  ~GuardedShared() { munmap(mapping_, mapping_bytes_); }
  GuardedShared(const GuardedShared&) = delete;
  GuardedShared& operator=(const GuardedShared&) = delete;
  unsigned char* data() const { return data_; }

 private:
  unsigned char* mapping_ = nullptr;
  unsigned char* data_ = nullptr;
  size_t mapping_bytes_ = 0;
};

struct Launch {
  explicit Launch(size_t shared_bytes) : shared(shared_bytes) {}
  std::vector<Fiber> fibers;
  unsigned char* stacks = nullptr;  // kStackBytes per fiber
  std::vector<unsigned char> shuffle_buffers;  // per warp: 2 x 32 x 8 bytes
  GuardedShared shared;  // 16-byte aligned
  void* scheduler_stack_pointer = nullptr;
  Fiber* running = nullptr;
  const std::function<void()>* body = nullptr;
  std::string error;
};

// One launch at a time per host thread; kernels never launch kernels.
thread_local Launch* current = nullptr;

// Dynamic shared memory each kernel opted in to (cudaFuncSetAttribute's
// MaxDynamicSharedMemorySize), by kernel.
std::mutex opt_in_mutex;
std::unordered_map<const void*, size_t> opt_ins;

size_t opted_in_shared(const void* kernel) {
  const std::lock_guard<std::mutex> lock(opt_in_mutex);
  const auto found = opt_ins.find(kernel);
  return found == opt_ins.end() ? 0 : found->second;
}

Fiber& running_fiber() {
  TORCH_CHECK(current != nullptr && current->running != nullptr,
              "CUDA emulation: a device function was called outside a kernel");
  return *current->running;
}

void suspend(State state) {
  Fiber& fiber = running_fiber();
  fiber.state = state;
  alphanet_emulation_switch_stacks(&fiber.stack_pointer, current->scheduler_stack_pointer);
}

[[noreturn]] void fiber_entry() {
  (*current->body)();
  for (;;) suspend(State::Done);
}

// A fresh fiber stack that switch_stacks resumes into fiber_entry, with the
// caller's control words and the stack aligned as at a function's entry.
void* prepare_stack(unsigned char* base, size_t bytes) {
  auto* top = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(base + bytes) & ~uintptr_t{15});
  uint64_t* sp = top - 9;
  std::memset(sp, 0, 9 * sizeof(uint64_t));
  uint32_t control[2] = {0, 0};
  asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(control[0]), "=m"(control[1]));
  std::memcpy(sp, control, sizeof(control));
  sp[7] = reinterpret_cast<uint64_t>(&fiber_entry);  // popped by ret; sp[8] stands for its return address
  return sp;
}

uint64_t next_random(uint64_t& state) {
  state ^= state << 13;
  state ^= state >> 7;
  state ^= state << 17;
  return state;
}

// Releases the threads waiting at a barrier every live thread of its scope
// has reached; false if none could be released (a deadlock), or if a warp
// barrier names a lane that has exited or does not exist (launch.error says so).
bool release_barriers(Launch& launch) {
  std::vector<Fiber>& fibers = launch.fibers;
  bool released = false;
  const int warps = static_cast<int>((fibers.size() + kWarpSize - 1) / kWarpSize);
  for (int w = 0; w < warps; ++w) {
    const auto begin = fibers.begin() + w * kWarpSize;
    const auto end = fibers.begin() + std::min<size_t>(fibers.size(), (w + 1) * kWarpSize);
    const bool all_at_warp_barrier = std::all_of(begin, end, [](const Fiber& f) {
      return f.state == State::AtWarpBarrier || f.state == State::Done;
    });
    if (!all_at_warp_barrier) continue;
    for (auto f = begin; f != end; ++f) {
      if (f->state != State::AtWarpBarrier) continue;
      for (int lane = 0; lane < kWarpSize; ++lane) {
        if (!(f->warp_mask >> lane & 1u) || (begin + lane < end && begin[lane].state != State::Done)) continue;
        launch.error = "a warp-synchronous call names lane " + std::to_string(lane) + " of warp " +
                       std::to_string(w) + ", which has exited or does not exist";
        return false;
      }
    }
    for (auto f = begin; f != end; ++f) {
      if (f->state == State::AtWarpBarrier) {
        f->state = State::Ready;
        released = true;
      }
    }
  }
  if (released) return true;
  const bool all_at_block_barrier = std::all_of(fibers.begin(), fibers.end(), [](const Fiber& f) {
    return f.state == State::AtBlockBarrier || f.state == State::Done;
  });
  if (!all_at_block_barrier) return false;
  int any = 0;
  for (const Fiber& f : fibers) {
    if (f.state == State::AtBlockBarrier) any |= f.vote;
  }
  for (Fiber& f : fibers) {
    if (f.state == State::AtBlockBarrier) {
      f.state = State::Ready;
      f.vote = any;
      released = true;
    }
  }
  return released;
}

// Fiber stacks, kept for the next launch. Pages are only committed where a
// fiber's stack actually reaches.
unsigned char* fiber_stacks(uint64_t threads) {
  struct Mapping {
    void* base = nullptr;
    size_t bytes = 0;
    ~Mapping() {
      if (base != nullptr) munmap(base, bytes);
    }
  };
  thread_local Mapping mapping;
  const size_t bytes = threads * kStackBytes;
  if (mapping.bytes < bytes) {
    if (mapping.base != nullptr) munmap(mapping.base, mapping.bytes);
    mapping.base = nullptr;
    mapping.bytes = 0;
    void* base = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    TORCH_CHECK(base != MAP_FAILED, "CUDA emulation: could not map ", bytes, " bytes of fiber stacks");
    mapping.base = base;
    mapping.bytes = bytes;
  }
  return static_cast<unsigned char*>(mapping.base);
}

void run_block(Launch& launch, uint64_t& random_state) {
  std::vector<Fiber>& fibers = launch.fibers;
  for (size_t i = 0; i < fibers.size(); ++i) {
    Fiber& f = fibers[i];
    f.state = State::Ready;
    f.shuffle_phase = 0;
    f.stack_pointer = prepare_stack(launch.stacks + i * kStackBytes, kStackBytes);
  }
  std::vector<size_t> order(fibers.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  for (;;) {
    if (random_state != 0) {
      for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[next_random(random_state) % i]);
    }
    for (size_t i : order) {
      if (fibers[i].state != State::Ready) continue;
      launch.running = &fibers[i];
      alphanet_emulation_switch_stacks(&launch.scheduler_stack_pointer, fibers[i].stack_pointer);
      launch.running = nullptr;
      if (!launch.error.empty()) return;
    }
    if (std::all_of(fibers.begin(), fibers.end(), [](const Fiber& f) { return f.state == State::Done; })) return;
    if (!release_barriers(launch)) {
      if (launch.error.empty()) launch.error = "deadlock: the threads of a block wait at different barriers";
      return;
    }
  }
}

}  // namespace

bool enabled() { return emulation_on.load(); }

void configure(bool on, uint64_t seed) {
  schedule_seed.store(seed);
  emulation_on.store(on);
}

const Coordinates& coordinates() { return running_fiber().coordinates; }

int lane() { return running_fiber().lane; }

void sync_block() { sync_block_or(0); }

int sync_block_or(int predicate) {
  running_fiber().vote = predicate != 0;
  suspend(State::AtBlockBarrier);
  return running_fiber().vote;
}

void sync_warp(unsigned int mask) {
  running_fiber().warp_mask = mask;
  suspend(State::AtWarpBarrier);
}

unsigned char* next_shuffle_buffer() {
  Fiber& fiber = running_fiber();
  unsigned char* buffer =
      current->shuffle_buffers.data() + (static_cast<size_t>(fiber.warp) * 2 + fiber.shuffle_phase) * kWarpSize * 8;
  fiber.shuffle_phase ^= 1;
  return buffer;
}

void fault(const char* message) {
  running_fiber();
  current->error = message;
  for (;;) suspend(State::Done);  // the scheduler sees the error and resumes no thread of this launch
}

void allow_dynamic_shared(const void* kernel, size_t bytes) {
  TORCH_CHECK(bytes <= kMaxOptInShared, "CUDA emulation: ", bytes,
              " bytes of dynamic shared memory exceed the opt-in limit of ", kMaxOptInShared);
  const std::lock_guard<std::mutex> lock(opt_in_mutex);
  opt_ins[kernel] = bytes;
}

unsigned char* dynamic_shared() {
  running_fiber();
  return current->shared.data();
}

void run(const void* kernel, dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& thread_body) {
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  TORCH_CHECK(threads >= 1 && threads <= kMaxBlockThreads && block.z <= 64,
              "CUDA emulation: invalid block shape (", block.x, ", ", block.y, ", ", block.z, ")");
  TORCH_CHECK(grid.x >= 1 && grid.x <= 0x7fffffffu && grid.y >= 1 && grid.y <= 65535 && grid.z >= 1 &&
                  grid.z <= 65535,
              "CUDA emulation: invalid grid shape (", grid.x, ", ", grid.y, ", ", grid.z, ")");
  const size_t limit = std::max(kMaxDynamicShared, opted_in_shared(kernel));
  TORCH_CHECK(shared_bytes <= limit, "CUDA emulation: ", shared_bytes, " bytes of dynamic shared memory exceed ",
              limit == kMaxDynamicShared ? "the default limit of " : "the kernel's opted-in limit of ", limit);
  TORCH_CHECK(current == nullptr, "CUDA emulation: a kernel launched another kernel");

  Launch launch(shared_bytes);
  launch.body = &thread_body;
  launch.fibers.resize(threads);
  launch.stacks = fiber_stacks(threads);
  launch.shuffle_buffers.assign(((threads + kWarpSize - 1) / kWarpSize) * 2 * kWarpSize * 8, 0);
  for (uint64_t i = 0; i < threads; ++i) {
    Coordinates& c = launch.fibers[i].coordinates;
    c.thread = dim3(static_cast<unsigned int>(i % block.x), static_cast<unsigned int>(i / block.x % block.y),
                    static_cast<unsigned int>(i / (static_cast<uint64_t>(block.x) * block.y)));
    c.block_dim = block;
    c.grid_dim = grid;
    launch.fibers[i].warp = static_cast<int>(i / kWarpSize);
    launch.fibers[i].lane = static_cast<int>(i % kWarpSize);
  }
  uint64_t random_state = schedule_seed.load();
  current = &launch;
  for (unsigned int z = 0; z < grid.z && launch.error.empty(); ++z) {
    for (unsigned int y = 0; y < grid.y && launch.error.empty(); ++y) {
      for (unsigned int x = 0; x < grid.x && launch.error.empty(); ++x) {
        for (Fiber& f : launch.fibers) f.coordinates.block = dim3(x, y, z);
        std::memset(launch.shared.data(), 0xff, shared_bytes);  // uninitialised on a GPU: make reliance on zeros show
        run_block(launch, random_state);
      }
    }
  }
  current = nullptr;
  TORCH_CHECK(launch.error.empty(), "CUDA emulation: ", launch.error);
}

}  // namespace alphanet::emulation
