// Switches of the CUDA emulation (cuda_emulation.cpp) that the test module (module.cpp) exposes.
#pragma once

#include <atomic>

namespace coordconv {

// Whether the emulated epilogue takes its 64-bit index arithmetic even where 32-bit fits, so that the
// tests run the form a GPU only takes for samples of 2^31 elements or more.
std::atomic<bool>& emulated_wide_index();

}  // namespace coordconv
