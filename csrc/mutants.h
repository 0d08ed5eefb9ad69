// Planted bugs for mutation testing (`tools/mutants kernels`, docs/mutants.md). Building with
// -DSMOG_MUTANT=<id> (setup.py passes $SMOG_MUTANT) swaps one decision of the kernels for a wrong
// one. Without it, as in every production build, SMOG_MUTANT is 0, every SMOG_MUTATED(id) is the
// constant false, and the compiler emits exactly the real code.
#pragma once

#ifndef SMOG_MUTANT
#define SMOG_MUTANT 0
#endif
#define SMOG_MUTATED(id) (SMOG_MUTANT == (id))

// CPU (csrc/cpu): checked on any machine.
#define SMOG_MUTANT_CPU_PORTABLE_TIE 1  // portable running argmax: a tie moves it (> becomes >=)
#define SMOG_MUTANT_CPU_AVX2_TIE 2      // AVX2 running argmax: _CMP_GT_OQ becomes _CMP_GE_OQ
#define SMOG_MUTANT_CPU_AVX512_TIE 3    // AVX-512 running argmax: _CMP_GT_OQ becomes _CMP_GE_OQ
#define SMOG_MUTANT_CPU_LANE_TIE 4      // lane reduction (the merge of the 32 lanes): a tie keeps the larger index
#define SMOG_MUTANT_CPU_EMPTY_GROUP 5   // momentum_update: a group with no member is moved (<= 0 becomes < 0)
// CUDA (csrc/cuda): need a GPU to run.
#define SMOG_MUTANT_CUDA_COLUMN_TIE 11   // a thread's 16-column scan: > becomes >=
#define SMOG_MUTANT_CUDA_SHUFFLE_TIE 12  // the 4-thread shuffle combine: a tie takes the larger index
#define SMOG_MUTANT_CUDA_TILE_TIE 13     // running best over the tiles of a split: > becomes >=
#define SMOG_MUTANT_CUDA_MERGE_TIE 14    // split-K merge: > becomes >= (a later split wins a tie)
#define SMOG_MUTANT_CUDA_MERGE_ORDER 15  // split-K merge in decreasing split order (the last split wins a tie)
#define SMOG_MUTANT_CUDA_EMPTY_GROUP 16  // momentum_update: a group with no member is moved
