// runtime.h: the emulator's kernel registry and launch entry (cuda/emu/README.md).
#pragma once
#include <cstddef>
#include <string>
#include <utility>

#include "emu.h"

namespace qlr_emu {
// A kernel entry: its C name and a trampoline that calls it with cuLaunchKernel's parameter
// array (each element points at one argument, laid out as the host passed it).
struct Kernel {
    const char* file;
    const char* name;
    void* fn;
    void (*call)(void* fn, void** params);
};
struct Launch {
    const Kernel* kernel;
    Dim grid, block;
    size_t smem;
    void** params;
};
void register_kernel(const Kernel* k);
const Kernel* find_kernel(const char* name);
// Runs the whole grid; returns "" or what went wrong.
std::string run(const Launch& l);
// The order blocks and the ready threads of a block run in (runtime.cpp). The default is
// Forward, or Reverse when the environment has QLR_EMU_SCHEDULE=reverse.
enum class Schedule { Forward, Reverse };
void set_schedule(Schedule s);

template <typename... A, size_t... I>
void call_with(void* fn, void** p, std::index_sequence<I...>) {
    reinterpret_cast<void (*)(A...)>(fn)(*static_cast<A*>(p[I])...);
}
template <typename... A> void call(void* fn, void** p) {
    call_with<A...>(fn, p, std::index_sequence_for<A...>{});
}
// `static Registrar r("file.cu", "name", &ns::name);` in a generated kernels_<file>.cpp.
struct Registrar {
    Kernel k;
    template <typename... A> Registrar(const char* file, const char* name, void (*fn)(A...)) {
        k = Kernel{file, name, reinterpret_cast<void*>(fn), &call<A...>};
        register_kernel(&k);
    }
};
}  // namespace qlr_emu
