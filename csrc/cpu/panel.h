// Panel streaming shared by the fused CPU ops (hf_pairwise_similarity_kl.cpp, domainstudio_loss.cpp).
//
// View x (N, C, H, W), contiguous, as N samples of R = C*H/2 "hf rows": hf row r of sample n reads
// the two image rows 2r, 2r+1 of the (C*H, W) plane stack (channel boundaries fall between hf
// rows), i.e. the 4*w elements from offset r*4*w of the sample. The R rows are cut into chunks of
// `rows_per_chunk` hf rows; a chunk's N x L panel (L = rows * w) of hf values is built in the
// accumulation dtype, straight from x, and the chunks are split into one contiguous range per
// thread, so every thread streams its own part of x once. The loops over a chunk are the active ISA's
// (loops.h); this header is the driver side (ATen, baseline code).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>

#include "../common.h"
#include "isa.h"

namespace dsfast::cpu {

// Rows per parallel task so that a task touches at least ~32K elements.
inline int64_t grain_rows(int64_t elems_per_row) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, elems_per_row));
}

struct Plan {
  int64_t n, rows, w, rows_per_chunk, chunks, tasks;
  int64_t sample() const { return rows * 4 * w; }  // elements of x per sample
};

// Chunks whose hf panel holds about `panel_bytes`, with a few chunks per thread for load balance.
inline Plan make_plan(const at::Tensor& x, int64_t panel_bytes) {
  Plan p{};
  p.n = x.size(0);
  p.rows = x.size(1) * (x.size(2) / 2);
  p.w = x.size(3) / 2;
  const int64_t elem = x.scalar_type() == at::kDouble ? 8 : 4;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  p.rows_per_chunk = rows_per_chunk(p.n, p.w, p.rows, elem, panel_bytes);
  const int64_t balanced = std::max<int64_t>(1, p.rows / (4 * threads));
  p.rows_per_chunk = std::max<int64_t>(1, std::min(p.rows_per_chunk, balanced));
  p.chunks = (p.rows + p.rows_per_chunk - 1) / p.rows_per_chunk;
  p.tasks = std::min(threads, p.chunks);
  return p;
}

// The loops' view of chunk [r0, r0 + nr) (isa.h), with the buffers' row strides.
inline PanelGeometry geometry(const Plan& p, int64_t r0, int64_t nr, int64_t ldx, int64_t ldp) {
  return {p.n, p.sample(), p.w, r0, nr, ldx, ldp};
}

// Run body(task, chunk_begin, chunk_end) for every task in parallel; ATen ops inside `body`
// see the caller's thread-local state (grad mode, inference mode, dispatch keys).
template <typename F>
void for_each_task(const Plan& p, const F& body) {
  const at::ThreadLocalState state;
  at::parallel_for(0, p.tasks, 1, [&](int64_t tb, int64_t te) {
    at::ThreadLocalStateGuard guard(state);
    for (int64_t t = tb; t < te; ++t) {
      body(t, t * p.chunks / p.tasks, (t + 1) * p.chunks / p.tasks);
    }
  });
}

}  // namespace dsfast::cpu
