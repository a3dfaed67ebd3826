// Gate activations of the CPU kernels, one element at a time (inlined into the row loops).
//
// float32: a branch-free exp (Cody-Waite range reduction and a degree-6 polynomial, about 1 ulp),
// so the loops that call it vectorize; float64 uses libm.
//
// No activation returns a denormal on its clamped ranges: exp_f32 gives +inf above ~88.4, so
// sigmoid there is exactly 0 (and 1, -1 or 1 at the other ends). This matters beyond the
// saturated inputs themselves: the compiler specialises the row loops for the clamped constants
// and evaluates those branches for every vector lane (partial redundancy elimination), so a
// denormal constant such as sigmoid(-88) = 6e-39 made every vector multiply take a slow
// microcode assist (2.5x slower GRU row pass on AVX2/AVX-512 Xeons).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__)
#define FASTBPTT_INLINE inline __attribute__((always_inline))
#else
#define FASTBPTT_INLINE inline
#endif

namespace fastbptt {
namespace cpu {

// exp(x) for x >= -87 (below: exp(-87), a normal float); +inf for x > 88.37
FASTBPTT_INLINE float exp_f32(float x) {
  x = x < -87.0f ? -87.0f : (x > 89.0f ? 89.0f : x);  // 89: the exponent bits below give +inf
  // round(x / ln 2) with the 1.5 * 2^23 trick: exact for |v| < 2^22, vectorizes everywhere
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

FASTBPTT_INLINE float sigmoid_act(float x) { return 1.0f / (1.0f + exp_f32(-x)); }
FASTBPTT_INLINE double sigmoid_act(double x) { return 1.0 / (1.0 + std::exp(-x)); }

FASTBPTT_INLINE float tanh_act(float x) {
  const float a = x < 0.0f ? -x : x;
  const float e = exp_f32(-2.0f * a);
  const float t = (1.0f - e) / (1.0f + e);
  return x < 0.0f ? -t : t;
}
FASTBPTT_INLINE double tanh_act(double x) { return std::tanh(x); }

}  // namespace cpu
}  // namespace fastbptt
