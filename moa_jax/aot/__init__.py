"""Compile-for-target: the real train step compiled with libtpu or XLA:GPU on a CPU host (no device).

  targets.py   target names (v5p:2x2x2, h100:8), chips' HBM and peak FLOP/s, compile-only devices
  hlo.py       matmul FLOPs of an optimized HLO module, while loops counted per trip
  compiled.py  compile, memory against HBM, collectives, roofline step time, the --compile_only report
  gpu_specs/   XLA GpuTargetConfigProto texts for H100 SXM, H200, B200
"""
