// Constants shared by the kernels, the workspace layout and the FFI checks; the extension exports
// them to Python as jax_megamoe._C.constants(). Plain C++ (host and device compilers).
#pragma once

namespace jax_megamoe {

// Rows of one GEMM row block (one wgmma m64): the unit of block_expert.
constexpr int kBlockM = 64;
// Each local expert's pool segment starts on a multiple of kExpertAlignM rows, so the GEMMs'
// 128-row tiles (a pair of row blocks sharing one weight tile) never straddle two experts.
// Padding rows have row_src == -1; a block holding only padding names expert -1.
constexpr int kExpertAlignM = 2 * kBlockM;
// Quantization group along K for activations (1x128) and weights (128x128).
constexpr int kQuantBlock = 128;
// Largest top-k: the dispatch gives each slot of a token its own warp lane.
constexpr int kMaxTopk = 32;
// Largest experts per rank: the route kernels keep two or three ints per local expert in shared
// memory (48 KiB for route_alone at this limit; launch/runtime.cu).
constexpr int kMaxLocalExperts = 4096;
// Blocks per budgeted SM of the dispatch and combine grids: enough resident warps to cover NVLink
// and HBM latency without needing the whole device. With one rank, while the tokens number at
// most this many per SM, each has a block and route count and fill are one launch.
constexpr int kRouteBlocksPerSm = 4;
// With one rank and a block per token, while the local experts average at most this many rows
// (half a row block), L1 reads A from the tokens' rows and nothing is copied into the pool: its
// gather warps keep up with tiles of a few rows, not with full ones (measured on DeepSeek-V3's
// shape: docs/design.md §3.2).
constexpr int kGatherRowsPerExpert = kBlockM / 2;
// Seconds a cross-rank wait spins before the call fails (SymmBuffer.create(timeout_s=) and
// JAX_MEGAMOE_TIMEOUT_S override it): long enough for a peer that is compiling or loading.
constexpr int kDefaultTimeoutS = 300;
// Largest persistent grid of the standalone GEMMs (num_ctas): far above one CTA per SM, and small
// enough that their int32 tile-claim counter, which every CTA takes once past the last tile,
// cannot wrap around to a negative tile index.
constexpr int kMaxGemmCtas = 65536;

}  // namespace jax_megamoe
