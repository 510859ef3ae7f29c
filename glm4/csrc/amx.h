// Intel AMX tiles for the kernels: whether this process may use them, and their configuration.
//
// Built with -march=native on a CPU with AMX-TILE, AMX-BF16 and AMX-INT8 (Sapphire Rapids and later
// Xeons), GLM4_AMX_KERNEL is defined. Linux hands the tiles' state to a process only on request
// (arch_prctl), and each thread must load a tile configuration before its first tile op and
// should release the tiles after its last, so that a context switch need not save 8 KiB of tile
// state.
#pragma once

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AMX_INT8__) && defined(__linux__)
#define GLM4_AMX_KERNEL 1

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>

namespace glm4_amx {

// On unless glm4_set_amx(0) turned it off (glm4.kernels.set_amx): one switch for every source
// file, so that every kernel that has an AMX path takes it, or none does.
inline std::atomic<bool> enabled{true};

// Whether the tiles are on and this process may use them (asked of the kernel once).
inline bool on() {
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    static const bool permitted = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    return permitted && enabled.load(std::memory_order_relaxed);
}

// The 64-byte operand of ldtilecfg (palette 1): per tile its rows and bytes a row.
struct alignas(64) Config {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t bytes_per_row[16] = {};
    uint8_t rows[16] = {};

    Config &tile(int t, int rows_, int bytes) {
        rows[t] = (uint8_t)rows_, bytes_per_row[t] = (uint16_t)bytes;
        return *this;
    }
};

}  // namespace glm4_amx

#endif
