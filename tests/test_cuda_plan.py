"""The CUDA kernels' planning and bookkeeping, and CUDA-only edge cases.

Without a GPU: a small C++ program compiled against csrc/cuda/launch_plan.h (plain
C++, shared with the kernels) checks the warp slices, the row bookkeeping
(row_fate, RowCombiner, combine_chunks) driven by a lane-by-lane host model of
the kernel's warp row walk (WarpRows in csrc/cuda/allocate_kernel.cu), the
histogram slot search and the upload packing.  Integer-valued inputs make every
sum exact, so the model's row sums must equal the direct ones bit for bit: a row
lost, counted twice or split wrongly at a warp or chunk boundary shows up.

With a GPU: the CUDA ops against the CPU ops on the cases the shared tests do not
reach (many histogram slots, every kind of row length around warps and chunks,
class groups, streams, run-to-run bit identity).
"""
import os
import shutil
import subprocess

import pytest
import torch

import lca_ext
from lca_ext import reference
from conftest import HAVE_GPU
from helpers import abs_scale, assert_allocation_equal, assert_sums_close, make_step

CHUNK = lca_ext.build_info()["chunk_size"]
CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")

needs_gpu = pytest.mark.skipif(not HAVE_GPU, reason="needs a GPU and lca_ext built with CUDA")


def test_cuda_kernels_registered_when_built_with_cuda():
    if not lca_ext.build_info()["cuda"]:
        pytest.skip("lca_ext built without CUDA")
    for op in ("accumulate_", "allocate", "allocate_classes", "sign_changes_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lca_ext::{op}", "CUDA"), op


_MODEL = r"""
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "cuda/launch_plan.h"

using namespace lca_ext;
using namespace lca_ext::cuda;

static int failures = 0;
#define CHECK(cond, ...)                                                   \
  do {                                                                     \
    if (!(cond)) {                                                         \
      if (failures++ < 20) {                                               \
        std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);        \
        std::printf(__VA_ARGS__);                                          \
        std::printf("\n");                                                 \
      }                                                                    \
    }                                                                      \
  } while (0)

// Lane-by-lane model of WarpRows (csrc/cuda/allocate_kernel.cu): each
// collective (butterfly, shuffles, scan) over arrays of 32 lanes.
struct ModelWarpRows {
  int64_t row_len, lo, hi;
  double* out;
  RowPartial *head, *tail;
  uint32_t rl32;
  long long carry_row;
  int64_t carry_end;
  double carry_sum, lane_acc[32];
  bool pending;

  void begin(int64_t rl, int64_t l, int64_t h, double* o, RowPartial* hd, RowPartial* tl) {
    row_len = rl; lo = l; hi = h; out = o; head = hd; tail = tl;
    rl32 = row_len < kWarpSize ? uint32_t(row_len) : uint32_t(kWarpSize);
    carry_row = lo / row_len;
    carry_end = (carry_row + 1) * row_len;
    carry_sum = 0.0;
    for (double& a : lane_acc) a = 0.0;
    pending = false;
  }
  void flush(long long row, double s) const {
    switch (row_fate(row, row_len, lo, hi)) {
      case kRowOwned: out[row] = s; break;
      case kRowHead: *head = RowPartial{row, s}; break;
      default: *tail = RowPartial{row, s}; break;
    }
  }
  static double butterfly(const double* v) {
    double w[32], t[32];
    for (int l = 0; l < 32; ++l) w[l] = v[l];
    for (int off = 16; off > 0; off >>= 1) {
      for (int l = 0; l < 32; ++l) t[l] = w[l] + w[l ^ off];
      for (int l = 0; l < 32; ++l) w[l] = t[l];
    }
    return w[0];
  }
  void fold() {
    if (pending) {
      carry_sum += butterfly(lane_acc);
      for (double& a : lane_acc) a = 0.0;
      pending = false;
    }
  }
  void window(int64_t win, const double* xin) {
    const int64_t last = win + 31 < hi ? win + 31 : hi - 1;
    const int lv = int(last - win);
    double x[32];
    for (int l = 0; l < 32; ++l) x[l] = l <= lv ? xin[l] : 0.0;
    if (last < carry_end) {
      for (int l = 0; l < 32; ++l) lane_acc[l] += x[l];
      pending = true;
      return;
    }
    fold();
    long long key[32];
    for (int l = 0; l < 32; ++l) {
      const int64_t d = win + l - carry_end;
      if (l <= lv) CHECK(d < 32, "d=%lld", (long long)d);
      key[l] = d < 0 ? carry_row : carry_row + 1 + (long long)(uint32_t(d) / rl32);
      if (l <= lv) CHECK(key[l] == (win + l) / row_len, "key of %lld", (long long)(win + l));
      if (l > lv) key[l] = 0x7fffffffffffffffLL;
    }
    double s[32];
    for (int l = 0; l < 32; ++l) s[l] = x[l];
    for (int off = 1; off < 32; off <<= 1) {
      double up[32];
      long long kup[32];
      for (int l = 0; l < 32; ++l) { up[l] = l >= off ? s[l - off] : s[l]; kup[l] = l >= off ? key[l - off] : key[l]; }
      for (int l = 0; l < 32; ++l) if (l >= off && kup[l] == key[l]) s[l] += up[l];
    }
    bool seg_end[32];
    for (int l = 0; l < 32; ++l) {
      const long long next = l < 31 ? key[l + 1] : key[l];
      seg_end[l] = l <= lv && (l == lv || next != key[l]);
    }
    if (key[0] != carry_row) {
      flush(carry_row, carry_sum);
      carry_row = key[0];
      carry_sum = 0.0;
    }
    double total[32];
    for (int l = 0; l < 32; ++l) total[l] = key[l] == carry_row ? carry_sum + s[l] : s[l];
    for (int l = 0; l < 32; ++l) if (seg_end[l] && l != lv) flush(key[l], total[l]);
    carry_row = key[lv];
    carry_sum = total[lv];
    carry_end = (carry_row + 1) * row_len;
  }
  void finish() {
    fold();
    flush(carry_row, carry_sum);
  }
};

// The allocate kernel's row path and cleanup, for one tensor list.
static void run_case(const std::vector<int64_t>& rows, const std::vector<int64_t>& row_lens,
                     std::mt19937_64& rng, bool positive) {
  const size_t K = rows.size();
  std::vector<int64_t> numel(K), offset(K);
  std::vector<std::vector<double>> vals(K);
  int64_t total_rows = 0;
  for (size_t k = 0; k < K; ++k) {
    numel[k] = rows[k] * row_lens[k];
    offset[k] = total_rows;
    total_rows += rows[k];
    std::uniform_int_distribution<int> dist(positive ? 1 : -1000, 1000);
    vals[k].resize(numel[k]);
    for (double& v : vals[k]) v = dist(rng);
  }
  const ChunkPlan plan = make_chunk_plan(numel);
  std::vector<ChunkPartial> parts(plan.chunks.size());
  std::vector<double> row_out(total_rows, 0.0);
  for (size_t c = 0; c < plan.chunks.size(); ++c) {
    const Chunk& ch = plan.chunks[c];
    const int64_t k = ch.tensor;
    RowPartial s_head[kWarps], s_tail[kWarps];
    int64_t covered = ch.begin;
    for (int w = 0; w < kWarps; ++w) {
      s_head[w] = s_tail[w] = RowPartial{-1, 0.0};
      int64_t lo, hi;
      warp_slice(ch, w, &lo, &hi);
      CHECK(lo == covered && lo <= hi && hi <= ch.end, "slice %d of chunk %zu", w, c);
      CHECK(lo == hi || (lo - ch.begin) % kWarpSize == 0, "slice start not warp aligned");
      covered = hi;
      if (lo >= hi) continue;
      ModelWarpRows wr;
      wr.begin(row_lens[k], lo, hi, row_out.data() + offset[k], &s_head[w], &s_tail[w]);
      for (int64_t g = lo; g < hi; g += kWarpSize * kUnroll) {
        for (int j = 0; j < kUnroll; ++j) {
          const int64_t win = g + j * kWarpSize;
          if (win >= hi) continue;
          double x[32];
          for (int l = 0; l < 32; ++l) x[l] = win + l < hi ? vals[k][win + l] : 12345.0;
          wr.window(win, x);
        }
      }
      wr.finish();
    }
    CHECK(covered == ch.end, "slices miss the end of chunk %zu", c);
    double sum = 0;
    for (int64_t i = ch.begin; i < ch.end; ++i) sum += vals[k][i];
    ChunkPartial& p = parts[c];
    p.sum = sum;
    for (int q = 0; q < 4; ++q) p.counts[q] = q == 0 ? ch.end - ch.begin : 0;
    RowCombiner comb(row_lens[k], ch.begin, ch.end, row_out.data() + offset[k]);
    for (int w = 0; w < kWarps; ++w) {
      if (s_head[w].row >= 0) comb.add(s_head[w].row, s_head[w].sum);
      if (s_tail[w].row >= 0) comb.add(s_tail[w].row, s_tail[w].sum);
    }
    comb.flush();
    p.head = comb.head;
    p.tail = comb.tail;
  }
  for (size_t k = 0; k < K; ++k) {
    double s;
    int64_t counts[4];
    combine_chunks(parts.data(), plan.first_chunk[k], plan.first_chunk[k + 1], &s, counts,
                   row_out.data() + offset[k]);
    double want = 0;
    for (double v : vals[k]) want += v;
    CHECK(s == want && counts[0] == numel[k], "tensor %zu sum %g want %g", k, s, want);
  }
  for (size_t k = 0; k < K; ++k) {
    for (int64_t r = 0; r < rows[k]; ++r) {
      double want = 0;
      for (int64_t i = 0; i < row_lens[k]; ++i) want += vals[k][r * row_lens[k] + i];
      CHECK(row_out[offset[k] + r] == want, "rows %lld x %lld: row %lld = %g, want %g",
            (long long)rows[k], (long long)row_lens[k], (long long)r,
            row_out[offset[k] + r], want);
    }
  }
}

static void check_histogram_slot(std::mt19937_64& rng) {
  std::vector<std::vector<double>> edge_sets = {
      {-2.0, 0.0, 2.0}, {-1.0, -0.0, 0.5}, {-1e-300, 1e-300}, {0.0, 1.0}};
  std::vector<double> lin;
  for (int i = 0; i <= 300; ++i) lin.push_back(-1.0 + i / 150.0);
  edge_sets.push_back(lin);
  std::normal_distribution<double> nd;
  for (const auto& e : edge_sets) {
    const int64_t n = (int64_t)e.size();
    std::vector<double> xs = {0.0, -0.0, 1e300, -1e300, 5e-324, -5e-324};
    for (double v : e) { xs.push_back(v); xs.push_back(std::nextafter(v, 1e308)); xs.push_back(std::nextafter(v, -1e308)); }
    for (int i = 0; i < 2000; ++i) xs.push_back(nd(rng) * std::exp(4 * nd(rng)));
    for (double x : xs) {
      int64_t want = 0;  // numpy-style: below, [e_j, e_j+1), last bin closed, above
      if (x < e[0]) want = 0;
      else if (x > e[n - 1]) want = n;
      else if (x == e[n - 1]) want = n - 1;
      else { want = 0; while (want < n && e[want] <= x) ++want; }
      const int64_t got = histogram_slot(e.data(), n, x);
      CHECK(got == want, "x=%a slot %lld want %lld (n=%lld)", x, (long long)got, (long long)want, (long long)n);
    }
  }
}

static void check_upload_blob() {
  UploadBlob blob;
  const std::vector<char> a = {1, 2, 3};
  const std::vector<double> b = {1.5, -2.5};
  const std::vector<int64_t> c = {};
  const std::vector<Chunk> d = {Chunk{1, 2, 3}};
  const size_t oa = blob.add(a), ob = blob.add(b), oc = blob.add(c), od = blob.add(d);
  CHECK(oa % 16 == 0 && ob % 16 == 0 && oc % 16 == 0 && od % 16 == 0, "alignment");
  CHECK(ob >= oa + 3 && od >= ob + 16 && blob.bytes().size() == od + sizeof(Chunk), "offsets");
  double b1;
  std::memcpy(&b1, blob.bytes().data() + ob + 8, 8);
  Chunk d0;
  std::memcpy(&d0, blob.bytes().data() + od, sizeof(Chunk));
  CHECK(b1 == -2.5 && d0.tensor == 1 && d0.begin == 2 && d0.end == 3, "contents");
}

int main() {
  std::mt19937_64 rng(12345);
  const int64_t C = kChunkSize;
  const std::vector<int64_t> lens = {1, 2, 3, 5, 7, 16, 31, 32, 33, 63, 64, 65, 127, 128, 129,
                                     1000, 4095, 4096, 4097, 8191, 8192, 8193,
                                     C - 1, C, C + 1, 2 * C + 7};
  for (int64_t rl : lens) {
    for (int64_t n_target : {int64_t(1), int64_t(33), int64_t(4099), C - 1, C, C + 1, 3 * C + 17}) {
      const int64_t rows = n_target / rl > 0 ? n_target / rl : 1;
      for (bool positive : {true, false}) run_case({rows}, {rl}, rng, positive);
    }
  }
  // lists: mixed row lengths, tiny and empty tensors, a 0-d tensor (1 x 1)
  run_case({5, 3, 1, 4, 7, 1001, 3}, {3, 1, 1, 0, 13, 131, C + 5000}, rng, true);
  std::vector<int64_t> many_rows, many_lens;
  for (int i = 0; i < 300; ++i) { many_rows.push_back(i % 17 + 1); many_lens.push_back(i % 5 + 1); }
  run_case(many_rows, many_lens, rng, false);
  check_histogram_slot(rng);
  check_upload_blob();
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("OK\n");
  return 0;
}
"""


def _cxx():
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def test_launch_plan_host_model(tmp_path):
    """The row bookkeeping of the CUDA allocate kernel, run on the host."""
    cxx = _cxx()
    if cxx is None:
        pytest.skip("no C++ compiler")
    src = tmp_path / "plan_model.cpp"
    src.write_text(_MODEL)
    exe = tmp_path / "plan_model"
    subprocess.run([cxx, "-std=c++17", "-O2", "-Wall", "-I", CSRC, str(src), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("OK"), run.stdout + run.stderr


# ---------------------------------------------------------------------------
# GPU cases: the CUDA ops against the CPU ops (counts, histograms and state
# exactly; float64 sums to rounding, as they add in another order).

def _to_cpu(xs):
    return [x.cpu() for x in xs]


ROW_SHAPES = {
    "row_len_1": [(3 * CHUNK + 5,)],
    "row_len_2": [(CHUNK // 2 + 3, 2)],
    "row_len_3": [(CHUNK // 3 + 7, 3)],
    "row_len_31": [(4000, 31)],
    "row_len_32": [(4099, 32)],
    "row_len_33": [(4000, 33)],
    "row_len_4097": [(40, 4097)],
    "row_len_chunk": [(3, CHUNK)],
    "row_len_2chunks": [(2, 2 * CHUNK + 7)],
    "mixed": [(5, 3), (), (0,), (7, 1), (1001, 131), (2, CHUNK + 5000), (33,)],
}


@needs_gpu
@pytest.mark.parametrize("shapes", ROW_SHAPES.values(), ids=ROW_SHAPES.keys())
def test_cuda_row_layouts_match_cpu(shapes):
    b, a, g = make_step(shapes, device="cuda", seed=31)
    edges = lca_ext.signed_log_edges(1e-6, 1e-1, 6, device="cuda")
    got = lca_ext.allocate(b, a, g, row_sums=True, bin_edges=edges)
    want = lca_ext.allocate(_to_cpu(b), _to_cpu(a), _to_cpu(g), row_sums=True,
                            bin_edges=edges.cpu())
    assert_allocation_equal(got, want, abs_scale(b, a, g))


@needs_gpu
def test_cuda_histogram_with_many_slots():
    """More slots than fit in shared memory: counted with global atomics."""
    b, a, g = make_step([(300, 301), (CHUNK + 3,)], device="cuda", seed=32)
    edges = torch.linspace(-0.05, 0.05, 10001, dtype=torch.float64)
    got = lca_ext.allocate(b, a, g, bin_edges=edges.cuda()).histogram.cpu()
    want = reference.allocate(_to_cpu(b), _to_cpu(a), _to_cpu(g), bin_edges=edges).histogram
    assert torch.equal(got, want)


@needs_gpu
def test_cuda_state_matches_cpu_bitwise():
    shapes = [(64, 33), (CHUNK + 11,), ()]
    for pdt, gdt in [(torch.float32, torch.float32), (torch.bfloat16, torch.float16),
                     (torch.float64, torch.float32), (torch.float16, torch.float64)]:
        b, a, g = make_step(shapes, pdt, gdt, device="cuda", seed=33)
        states = {}
        for dev in ("cuda", "cpu"):
            cum = [torch.full(s, 0.5, dtype=torch.float32, device=dev) for s in shapes]
            cum64 = [torch.full(s, 0.5, dtype=torch.float64, device=dev) for s in shapes]
            hs = [torch.zeros(s, dtype=torch.int32, device=dev) for s in shapes]
            out = [torch.empty(s, dtype=torch.float32, device=dev) for s in shapes]
            bb, aa, gg = [[x.to(dev) for x in xs] for xs in (b, a, g)]
            lca_ext.allocate(bb, aa, gg, cum_lca=cum, helped_steps=hs, lca_out=out)
            lca_ext.allocate(bb, aa, gg, cum_lca=cum64)
            states[dev] = [x.cpu() for x in cum + cum64 + hs + out]
        for x, y in zip(states["cuda"], states["cpu"]):
            assert torch.equal(x, y), (pdt, gdt)


@needs_gpu
def test_cuda_bit_identical_runs_and_streams():
    shapes = [(300, 1001), (CHUNK * 3 + 17,), (5, 7), ()] + [(64, 33)] * 40
    b, a, g = make_step(shapes, device="cuda", seed=34)
    edges = lca_ext.signed_log_edges(1e-8, 1e-1, 10, device="cuda")
    class_g = [torch.stack([x, -0.5 * x, 2 * x] * 4) for x in g]  # 12 classes: 2 groups

    def run():
        res = lca_ext.allocate(b, a, g, row_sums=True, bin_edges=edges)
        cls = lca_ext.allocate_classes(b, a, class_g)
        return [t.clone() for t in list(res) + list(cls)]

    first = run()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side = run()
    torch.cuda.current_stream().wait_stream(side)
    for other in (run(), on_side):
        for x, y in zip(first, other):
            assert torch.equal(x, y)


@needs_gpu
@pytest.mark.parametrize("num_classes", [0, 1, 8, 9, 17])
def test_cuda_classes_groups_match_cpu(num_classes):
    shapes = [(17, 9), (CHUNK + 2,), (), (0,)]
    b, a, _ = make_step(shapes, torch.bfloat16, device="cuda", seed=35)
    gen = torch.Generator().manual_seed(36)
    g = [torch.randn((num_classes, *s), generator=gen).cuda() for s in shapes]
    got = lca_ext.allocate_classes(b, a, g)
    want = lca_ext.allocate_classes(_to_cpu(b), _to_cpu(a), _to_cpu(g))
    assert got.sums.shape == (num_classes, len(shapes))
    assert torch.equal(got.counts.cpu(), want.counts)
    if num_classes:
        scale = max(abs_scale(_to_cpu(b), _to_cpu(a), [x[c].cpu() for x in g])
                    for c in range(num_classes))
        assert_sums_close(got.sums, want.sums, scale)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=str)
def test_cuda_sign_changes_match_cpu(dtype):
    gen = torch.Generator().manual_seed(37)
    shapes = [(CHUNK + 3,), (7, 9), (), (0,)]
    state = {dev: ([torch.zeros(s, dtype=torch.int8, device=dev) for s in shapes],
                   [torch.zeros(s, dtype=torch.int32, device=dev) for s in shapes])
             for dev in ("cuda", "cpu")}
    prev = [torch.zeros(s, dtype=dtype) for s in shapes]
    for step in range(4):
        x = [torch.randn(s, generator=gen).to(dtype) * (torch.rand(s, generator=gen) > 0.3)
             for s in shapes]
        if step == 2:
            x[1][0, 0] = float("nan")
        for dev, (last, ch) in state.items():
            base = [p.to(dev) for p in prev] if step % 2 else None
            lca_ext.sign_changes_(last, ch, [t.to(dev) for t in x], base)
        prev = x
    for got, want in zip(sum(state["cuda"], []), sum(state["cpu"], [])):
        assert torch.equal(got.cpu(), want)
