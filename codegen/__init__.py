"""Kernels for the qcompile ops, one kernel family per module, imported lazily by the ops: Triton for CUDA,
C++ for CPU.

* ``lowbit.linear_4bit``, ``lowbit.linear_affine``   the low-bit family (decode per format): GEMV/split-K and GEMM
* ``int8_weight_only.int8_weight_only``  int8 weight, float activations
* ``llm_int8.linear_int8``               LLM.int8() with outlier decomposition (and ``int8_vectorwise_quant``)
* ``w8a8_dynamic.w8a8_dynamic``          per-token asymmetric int8 activations x int8 weights
* ``autotune``                           config spaces, M buckets, pruner, persistent winner cache, and
                                         ``run_kernel``, through which every launch goes (CUDA device guard)
* ``cpu_lowbit.linear_4bit``, ``cpu_lowbit.linear_affine``, ``cpu_lowbit.decode_4bit``
                                         the CPU kernels (``cpu_lowbit.cpp``): fused low-bit linears at
                                         decode sizes, the exact 4-bit decode; ``cpu_build`` compiles them
                                         at first use (None, and the torch reference, without a compiler)

Triton decides at decoration time whether kernels run in its CPU interpreter, so ``TRITON_INTERPRET=1``
must be set before these modules are imported; the entry points raise a ValueError naming the problem
when tensors and kernels disagree (CPU tensors with compiled kernels or the reverse).

Inductor: the ops call these functions from an opaque ``torch.library`` custom op, so inductor
schedules around each call as one extern kernel: it fuses the producers/consumers on either side
(e.g. an RMSNorm before, a SiLU*mul or residual add after) into its own kernels, but cannot fuse
into these kernels (no prologue/epilogue fusion into a user kernel) and does not autotune them.
Exposing them through ``torch.library.triton_op`` + ``wrap_triton`` would let inductor see the
Triton source and launch them directly (no Python dispatch; CUDA-graph friendly), but still not fuse
pointwise ops into them; it also fails under ``TRITON_INTERPRET=1`` when traced (fake tensors have
no data pointer), which is why the interpreter path must stay the opaque custom op. The LLM.int8()
path needs no host sync (the outlier count stays on the device), so it is CUDA-graph capturable.
"""
