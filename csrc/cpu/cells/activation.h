// Gate activations of the CPU kernels, one element at a time (inlined into the row loops).
//
// float32: a branch-free exp (Cody-Waite range reduction and a degree-6 polynomial, about 1 ulp)
// and a rational tanh, so the loops that call them vectorize; float64 uses libm.
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

// tanh(x) = x P(x^2) / Q(x^2), a rational fit on |x| <= 9.02 (scripts/fit_tanh.py: relative error
// 6.3e-8 in float64; in float32 at most 7 ulp over every float, exact at 0 and at saturation), with the
// input clamped to 9.02, beyond which tanh rounds to 1. About twice as fast as (1 - e) / (1 + e) with
// e = exp(-2|x|), and accurate in relative terms near 0, where that form cancels.
FASTBPTT_INLINE float tanh_act(float x) {
  constexpr float kClamp = 9.02f;
  x = x < -kClamp ? -kClamp : (x > kClamp ? kClamp : x);
  const float s = x * x;
  float p = 1.8325783e-11f;
  p = p * s - 1.28177207e-08f;
  p = p * s + 9.28326032e-06f;
  p = p * s + 0.00292280493f;
  p = p * s + 0.129212678f;
  p = p * s + 1.0f;
  float q = 0.000228363432f;
  q = q * s + 0.0237719307f;
  q = q * s + 0.462545674f;
  q = q * s + 1.0f;
  const float t = x * p / q;
  return t < -1.0f ? -1.0f : (t > 1.0f ? 1.0f : t);  // rounding puts a few values near 9 past 1
}
FASTBPTT_INLINE double tanh_act(double x) { return std::tanh(x); }

}  // namespace cpu
}  // namespace fastbptt
