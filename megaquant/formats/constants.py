"""Limits of every number format megaquant emulates, in one place.

Bit layouts (sign bit first, exponent bias in brackets):

* E4M3 ("fn" variant, OCP FP8): 1-4-3 [7]; no infinities, one NaN pattern per sign (S.1111.111);
  largest normal 1.75 * 2^8 = 448, smallest normal 2^-6, smallest subnormal 2^-9.
* E5M2 (OCP FP8, IEEE-like): 1-5-2 [15]; has inf and NaN; largest normal 1.75 * 2^15 = 57344,
  smallest normal 2^-14, smallest subnormal 2^-16.
* E2M1 (FP4 element of NVFP4 and MXFP4): 1-2-1 [1]; 8 magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6}, no
  inf/NaN. A 4-bit code is ``sign << 3 | magnitude_index``.
* E8M0 (MX block scale): 8 exponent bits, bias 127, no sign or mantissa; code 255 is NaN, so the
  representable scales are 2^-127 .. 2^127.

A minifloat with ``m`` mantissa bits and minimum normal exponent ``emin`` has spacing
``2^(max(floor(log2|v|), emin) - m)`` around ``v``; the rounding helpers are written in terms of
(``*_MANT_BITS``, ``*_EMIN``, ``*_MAX``) only.
"""

E4M3_MAX = 448.0
E4M3_MANT_BITS = 3
E4M3_EMIN = -6
E4M3_EMAX = 8  # exponent of the largest normal, the "emax_elem" of the OCP MX spec

E5M2_MAX = 57344.0
E5M2_MANT_BITS = 2
E5M2_EMIN = -14
E5M2_EMAX = 15

E2M1_MAX = 6.0
E2M1_MANT_BITS = 1
E2M1_EMIN = 0
E2M1_EMAX = 2
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # magnitude of 4-bit code i (i = 0..7)

INT8_MAX = 127  # symmetric: -128 is never produced by the quantizer (used as a NaN marker)
INT4_MAX = 7  # symmetric: -8 is never produced

E8M0_BIAS = 127
E8M0_EXP_MIN = -127  # 2^-127 (a float32 subnormal) is the smallest MX scale
E8M0_EXP_MAX = 127
E8M0_NAN = 255

NVFP4_BLOCK_SIZE = 16
NVFP4_SCALE_MIN = 2.0**-9  # smallest positive (subnormal) E4M3 value: block scales never reach 0
MX_BLOCK_SIZE = 32
INT4_BLOCK_SIZE = 128
