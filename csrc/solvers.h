// Exact K x K weightings (mmfast/weightings): G [K, K] -> w [K], for K <= kMaxK.
//
// One source for the CPU (csrc/cpu/weightings.cpp, a loop over groups) and the CUDA
// backend (csrc/cuda/weightings.cu, one block per group, the workspace in shared memory):
// plain functions on a caller-given fp64 workspace, no allocation, no library calls.
//
// * fp64 inside whatever the input dtype; G is symmetrised and divided by its trace
//   (left as is when the trace is <= 0) first, so the weights do not depend on the
//   gradients' scale.
// * Exact: active-set methods (Wolfe's min-norm point for MGDA and MMPareto, a
//   Lawson-Hanson bounded QP for UPGrad's projections, a piecewise-exact homotopy for
//   CAGrad), a Jacobi eigendecomposition for IMTL-G's pseudo-inverse, PCGrad's K x K
//   loop. The active sets are solved exactly (Cholesky on the free set), so the result
//   is the optimum to rounding once the set is right; the loops have fixed upper bounds
//   (max_steps, kCagradEvals, kJacobiSweeps) that bound the work per call.
// * Rank decisions where the answer depends on them (IMTL-G's pseudo-inverse drops
//   eigenvalues) use `eps`, the rounding unit of the input's dtype (float32: 2^-24), times
//   K, relative to the largest eigenvalue, as torch.linalg.pinv. The active-set methods'
//   directions d are Lipschitz in G, so their pivot tests only guard against fp64's own
//   rounding (a coarser cutoff would stop them short of the optimum).
// * A G with a NaN or an infinity gives NaN weights; finite input never gives NaN.
#pragma once

#include <cmath>
#include <cstdint>

#include "precision.h"

#ifdef __CUDACC__
#define MMFAST_SHD __host__ __device__ __forceinline__  // no ABI calls: their saved registers spill
#else
#define MMFAST_SHD inline
#endif

namespace mmfast::solve {

constexpr int kMaxK = 32;
constexpr double kEps64 = 0x1p-53;
constexpr double kMmparetoFloor = 0.001;  // SEMANTICS.md's 0.999 / 0.001 clamp

enum Method : int32_t { kMgda = 0, kPcgrad = 1, kCagrad = 2, kImtlg = 3, kUpgrad = 4, kMmpareto = 5 };

// Everything a weighting reads besides G, passed by value (to a CUDA kernel too).
struct Params {
  int32_t method = kMgda;
  int32_t K = 0;
  double eps = kEps64;    // rounding unit of the input dtype: rank cutoffs
  double c = 0.5;         // cagrad
  double norm_eps = 1e-4; // cagrad
  int32_t rescale = 0;    // cagrad: 0 none, 1 / (1 + c^2), 2 / (1 + c)
  double reg_eps = 1e-4;  // upgrad
  double rcond = -1;      // imtlg: eigenvalues <= rcond * max are dropped; < 0: K * eps
  int32_t main = 0;       // mmpareto
  int8_t orders[kMaxK * kMaxK];  // pcgrad: row i = the order of objective i, -1 padded
};

// Doubles of workspace a call needs.
MMFAST_SHD constexpr int workspace(int K) { return 4 * (K + 1) * (K + 1) + 12 * (K + 1); }

// NaN and infinities give NaN here (portable to host and device code).
MMFAST_SHD bool is_finite(double x) { return x - x == 0; }

using Mask = uint64_t;
MMFAST_SHD bool in(Mask m, int k) { return (m >> k) & 1u; }

// Bounds on the active-set loops (each step strictly decreases the objective, so these
// are never reached in exact arithmetic; they bound the work per call).
MMFAST_SHD int max_steps(int K) { return 8 * K + 32; }
constexpr int kCagradEvals = 96;  // QP solves of CAGrad's outer search (bisection on log t)
constexpr int kJacobiSweeps = 64;

// --------------------------------------------------------------------------- linear algebra

// In-place Cholesky of the n x n matrix A (row-major, stride ld) restricted to its lower
// triangle. False when a pivot is <= tol (the matrix is singular to the cutoff).
MMFAST_SHD bool cholesky(double* A, int n, int ld, double tol) {
  for (int j = 0; j < n; ++j) {
    double d = A[j * ld + j];
    for (int k = 0; k < j; ++k) d -= A[j * ld + k] * A[j * ld + k];
    if (!(d > tol)) return false;
    d = sqrt(d);
    A[j * ld + j] = d;
    for (int i = j + 1; i < n; ++i) {
      double s = A[i * ld + j];
      for (int k = 0; k < j; ++k) s -= A[i * ld + k] * A[j * ld + k];
      A[i * ld + j] = s / d;
    }
  }
  return true;
}

// Solves (L L^T) x = b in place (L from cholesky).
MMFAST_SHD void chol_solve(const double* L, int n, int ld, double* b) {
  for (int i = 0; i < n; ++i) {
    double s = b[i];
    for (int k = 0; k < i; ++k) s -= L[i * ld + k] * b[k];
    b[i] = s / L[i * ld + i];
  }
  for (int i = n - 1; i >= 0; --i) {
    double s = b[i];
    for (int k = i + 1; k < n; ++k) s -= L[k * ld + i] * b[k];
    b[i] = s / L[i * ld + i];
  }
}

MMFAST_SHD double max_diag(const double* M, int K, Mask mask) {
  double d = 0;
  for (int k = 0; k < K; ++k)
    if (in(mask, k) && M[k * K + k] > d) d = M[k * K + k];
  return d;
}

// --------------------------------------------------------------------------- min-norm point

// The affine min-norm point of the corral S (n points, indices S[0..n)) of the Gram M,
// with the linear term t b: minimises |sum a_i p_i|^2 + 2 t b^T a, sum a = 1, in the
// coordinates of the differences p_i - p_0 (whose Gram's Cholesky pivots are squared
// distances to the affine span of the points before: the rank test). Writes a (and,
// when a1 is given, the part linear in t: a = a0 + t a1 with t = 1 in a0's place).
// False when the corral is affinely dependent to the cutoff `tol`.
MMFAST_SHD bool affine_point(const double* M, int K, const int* S, int n, const double* b, double t, double* a0,
                             double* a1, double* L, double tol) {
  const int s0 = S[0];
  const int m = n - 1;
  for (int i = 0; i < m; ++i)
    for (int j = 0; j <= i; ++j) {
      const int p = S[i + 1], q = S[j + 1];
      L[i * K + j] = M[p * K + q] - M[p * K + s0] - M[s0 * K + q] + M[s0 * K + s0];
    }
  if (m > 0 && !cholesky(L, m, K, tol)) return false;
  // beta = -A^-1 (r0 + t rb): r0_i = <p_i - p_0, p_0>, rb_i = b_i - b_0
  double r[kMaxK], rb[kMaxK];
  for (int i = 0; i < m; ++i) {
    const int p = S[i + 1];
    r[i] = -(M[p * K + s0] - M[s0 * K + s0]);
    rb[i] = b ? -(b[p] - b[s0]) : 0.0;
  }
  if (a1) {
    chol_solve(L, m, K, r);
    chol_solve(L, m, K, rb);
    double s = 0, s1 = 0;
    for (int i = 0; i < m; ++i) {
      a0[i + 1] = r[i];
      a1[i + 1] = rb[i];
      s += r[i];
      s1 += rb[i];
    }
    a0[0] = 1 - s;
    a1[0] = -s1;
  } else {
    for (int i = 0; i < m; ++i) r[i] += t * rb[i];
    chol_solve(L, m, K, r);
    double s = 0;
    for (int i = 0; i < m; ++i) {
      a0[i + 1] = r[i];
      s += r[i];
    }
    a0[0] = 1 - s;
  }
  return true;
}

// Wolfe's min-norm point algorithm (1976) on a Gram matrix: w = argmin w^T M w over the
// simplex of the indices in `mask` (0 elsewhere), plus the linear term 2 t b^T w when b
// is given. Returns the corral (S, n): the support, affinely independent, on which w is
// the exact affine solution. Start: the vertex of least norm (lowest index in a tie).
// Zero M: that vertex. Returns the steps taken (<= max_steps(K)).
MMFAST_SHD int min_norm(const double* M, int K, Mask mask, const double* b, double t, double eps, double* w,
                        int* S, int& n, double* L) {
  for (int k = 0; k < K; ++k) w[k] = 0;
  n = 0;
  auto value = [&](int k) { return M[k * K + k] + (b ? 2 * t * b[k] : 0.0); };
  int j0 = -1;
  for (int k = 0; k < K; ++k)
    if (in(mask, k) && (j0 < 0 || value(k) < value(j0))) j0 = k;
  if (j0 < 0) return 0;
  S[n++] = j0;
  w[j0] = 1;
  double dmax = 0;
  for (int k = 0; k < K; ++k)
    if (in(mask, k)) dmax = fmax(dmax, fabs(M[k * K + k]) + (b ? 2 * t * fabs(b[k]) : 0.0));
  const double opt_tol = 4 * (K + 1) * kEps64 * dmax;  // fp64 rounding of <x, p_k>
  // fp64's rounding, not the input's: d (the min-norm point) is Lipschitz in G, so a
  // coarser cutoff would only stop short of the optimum.
  const double rank_tol = 4 * (K + 1) * kEps64 * dmax;
  double a[kMaxK], prev = INFINITY;
  int steps = 0;
  for (; steps < max_steps(K); ++steps) {
    // v_k = <p_k, x> (+ t b_k): the gradient / 2; xx = <x, x> (+ ...)
    double xx = 0, obj = 0;
    for (int i = 0; i < n; ++i) {
      const int p = S[i];
      double v = b ? t * b[p] : 0.0;
      for (int q = 0; q < n; ++q) v += M[p * K + S[q]] * w[S[q]];
      xx += w[p] * v;
      obj += w[p] * (v + (b ? t * b[p] : 0.0));
    }
    if (!(obj < prev)) break;  // no progress: rounding level
    prev = obj;
    int j = -1;
    double vj = 0;
    for (int k = 0; k < K; ++k) {
      if (!in(mask, k)) continue;
      double v = b ? t * b[k] : 0.0;
      for (int q = 0; q < n; ++q) v += M[k * K + S[q]] * w[S[q]];
      if (j < 0 || v < vj) {
        j = k;
        vj = v;
      }
    }
    if (xx - vj <= opt_tol) break;  // <p_k - x, x> >= 0 for every k: optimal
    bool member = false;
    for (int i = 0; i < n; ++i) member |= S[i] == j;
    if (member) break;
    S[n++] = j;
    bool added = false;
    for (int minor = 0; minor <= kMaxK; ++minor) {
      if (!affine_point(M, K, S, n, b, t, a, nullptr, L, rank_tol)) {
        // The new point is in the corral's affine span (to the input's rounding): drop it.
        if (minor == 0) {
          --n;
          w[j] = 0;
        }
        added = minor > 0;
        break;
      }
      bool interior = true;
      for (int i = 0; i < n; ++i) interior &= a[i] > 0;
      if (interior) {
        for (int i = 0; i < n; ++i) w[S[i]] = a[i];
        added = true;
        break;
      }
      // Move from w towards a until a weight hits 0; drop the points at 0.
      double theta = 1;
      for (int i = 0; i < n; ++i) {
        const double wi = w[S[i]];
        if (a[i] <= 0) {
          const double th = wi > a[i] ? wi / (wi - a[i]) : 0.0;
          if (th < theta) theta = th;
        }
      }
      int m = 0;
      for (int i = 0; i < n; ++i) {
        const int p = S[i];
        const double wi = w[p] + theta * (a[i] - w[p]);
        if (wi > 0 && !(a[i] <= 0 && wi <= 4 * kEps64)) {
          w[p] = wi;
          S[m++] = p;
        } else {
          w[p] = 0;
        }
      }
      if (m == 0) {  // rounding: keep the best vertex
        S[m++] = j;
        w[j] = 1;
      }
      n = m;
      added = true;
    }
    if (!added) break;
  }
  double s = 0;
  for (int i = 0; i < n; ++i) s += w[S[i]];
  for (int i = 0; i < n; ++i) w[S[i]] /= s;
  return steps;
}

// --------------------------------------------------------------------------- weightings

MMFAST_SHD Mask all_of(int K) { return K >= 64 ? ~Mask{0} : ((Mask{1} << K) - 1); }

MMFAST_SHD void mgda(const double* Gn, int K, double eps, double* w, double* ws) {
  int S[kMaxK], n;
  min_norm(Gn, K, all_of(K), nullptr, 0, eps, w, S, n, ws);
}

// PCGrad, as torchjd: coefficient rows c_i = e_i projected in turn against g_j (order
// orders[i], entries i and -1 skipped) when <g_i^PC, g_j> < 0; w = sum_i c_i.
MMFAST_SHD void pcgrad(const double* Gn, int K, const int8_t* orders, double* w, double* ws) {
  double* c = ws;
  for (int k = 0; k < K; ++k) w[k] = 0;
  for (int i = 0; i < K; ++i) {
    for (int k = 0; k < K; ++k) c[k] = k == i;
    for (int s = 0; s < K; ++s) {
      const int j = orders[i * kMaxK + s];
      if (j < 0 || j == i) continue;
      double ip = 0;
      for (int k = 0; k < K; ++k) ip += Gn[j * K + k] * c[k];
      if (ip < 0) c[j] -= ip / (Gn[j * K + j] > 0 ? Gn[j * K + j] : 1.0);
    }
    for (int k = 0; k < K; ++k) w[k] += c[k];
  }
}

// Cyclic Jacobi eigendecomposition of the symmetric A (destroyed; eigenvalues on its
// diagonal), eigenvectors in the columns of V. Converged when every off-diagonal entry
// is below fp64's rounding relative to its diagonal pair (high relative accuracy).
MMFAST_SHD void jacobi(double* A, int K, double* V) {
  double scale = 0;  // entries below fp64's rounding squared of the largest are zeros
  for (int i = 0; i < K * K; ++i) scale = fmax(scale, fabs(A[i]));
  for (int i = 0; i < K; ++i)
    for (int j = 0; j < K; ++j) V[i * K + j] = i == j;
  for (int sweep = 0; sweep < kJacobiSweeps; ++sweep) {
    bool rotated = false;
    for (int p = 0; p < K; ++p)
      for (int q = p + 1; q < K; ++q) {
        const double apq = A[p * K + q], app = A[p * K + p], aqq = A[q * K + q];
        if (fabs(apq) <= kEps64 * 0.5 * sqrt(fabs(app * aqq)) || fabs(apq) <= kEps64 * kEps64 * scale) {
          A[p * K + q] = A[q * K + p] = 0;
          continue;
        }
        rotated = true;
        const double theta = (aqq - app) / (2 * apq);
        const double t = fabs(theta) > 1e150 ? 0.5 / theta
                                             : (theta >= 0 ? 1.0 : -1.0) / (fabs(theta) + sqrt(theta * theta + 1));
        const double c = 1 / sqrt(t * t + 1), s = t * c;
        for (int k = 0; k < K; ++k) {  // columns p, q
          const double akp = A[k * K + p], akq = A[k * K + q];
          A[k * K + p] = c * akp - s * akq;
          A[k * K + q] = s * akp + c * akq;
        }
        for (int k = 0; k < K; ++k) {  // rows p, q
          const double apk = A[p * K + k], aqk = A[q * K + k];
          A[p * K + k] = c * apk - s * aqk;
          A[q * K + k] = s * apk + c * aqk;
        }
        A[p * K + q] = A[q * K + p] = 0;
        for (int k = 0; k < K; ++k) {
          const double vkp = V[k * K + p], vkq = V[k * K + q];
          V[k * K + p] = c * vkp - s * vkq;
          V[k * K + q] = s * vkp + c * vkq;
        }
      }
    if (!rotated) break;
  }
}

// IMTL-G, as torchjd: v = G^+ sqrt(diag G), w = v / sum(v) (0 when |sum(v)| < 1e-12).
// G^+ drops the eigenvalues with |lambda| <= rcond * max |lambda| (torch.linalg.pinv's
// rule, with rcond = K * eps of the input dtype by default, as torch's).
MMFAST_SHD void imtlg(const double* Gn, int K, double rcond, double* w, double* ws) {
  double* A = ws;
  double* V = ws + K * K;
  double* d = V + K * K;
  for (int i = 0; i < K * K; ++i) A[i] = Gn[i];
  for (int k = 0; k < K; ++k) d[k] = sqrt(Gn[k * K + k] > 0 ? Gn[k * K + k] : 0.0);
  jacobi(A, K, V);
  double lmax = 0;
  for (int k = 0; k < K; ++k) lmax = fmax(lmax, fabs(A[k * K + k]));
  const double cut = rcond * lmax;
  for (int k = 0; k < K; ++k) w[k] = 0;
  for (int e = 0; e < K; ++e) {
    const double lam = A[e * K + e];
    if (!(fabs(lam) > cut) || lam == 0) continue;
    double proj = 0;
    for (int k = 0; k < K; ++k) proj += V[k * K + e] * d[k];
    proj /= lam;
    for (int k = 0; k < K; ++k) w[k] += proj * V[k * K + e];
  }
  double tot = 0;
  for (int k = 0; k < K; ++k) tot += w[k];
  for (int k = 0; k < K; ++k) w[k] = fabs(tot) >= 1e-12 ? w[k] / tot : 0.0;
}

// argmin_{v >= u} v^T Q v (Q positive definite), u >= 0: Lawson-Hanson's active set on
// y = v - u >= 0 (free set P solved exactly by Cholesky). Writes v. Returns the steps.
MMFAST_SHD int box_projection(const double* Q, int K, const double* u, double eps, double* v, double* L) {
  int P[kMaxK], n = 0;
  double y[kMaxK], z[kMaxK], rhs[kMaxK], qu[kMaxK];
  double dmax = 0, umax = 0;
  for (int k = 0; k < K; ++k) {
    y[k] = 0;
    dmax = fmax(dmax, Q[k * K + k]);
    umax = fmax(umax, u[k]);
  }
  for (int k = 0; k < K; ++k) {
    double s = 0;
    for (int j = 0; j < K; ++j) s += Q[k * K + j] * u[j];
    qu[k] = s;
  }
  const double rank_tol = 4 * (K + 1) * kEps64 * dmax;  // Q is positive definite: fp64's rounding
  double prev = INFINITY;
  int steps = 0;
  for (; steps < max_steps(K); ++steps) {
    // gradient / 2 at u + y; the objective
    double f = 0, gmin = 0, vmax = umax;
    int j = -1;
    for (int k = 0; k < K; ++k) vmax = fmax(vmax, u[k] + y[k]);
    for (int k = 0; k < K; ++k) {
      double g = qu[k];
      for (int i = 0; i < n; ++i) g += Q[k * K + P[i]] * y[P[i]];
      f += (u[k] + y[k]) * g;
      bool free = false;
      for (int i = 0; i < n; ++i) free |= P[i] == k;
      if (!free && (j < 0 || g < gmin)) {
        j = k;
        gmin = g;
      }
    }
    if (!(f < prev)) break;
    prev = f;
    if (j < 0 || gmin >= -4 * (K + 1) * kEps64 * dmax * vmax) break;  // KKT: optimal
    P[n++] = j;
    bool moved = false;
    for (int minor = 0; minor <= kMaxK; ++minor) {
      for (int a = 0; a < n; ++a)
        for (int b = 0; b <= a; ++b) L[a * K + b] = Q[P[a] * K + P[b]];
      if (!cholesky(L, n, K, rank_tol)) {
        if (minor == 0) --n;  // j is in the span of the free set (to the input's rounding)
        break;
      }
      for (int a = 0; a < n; ++a) rhs[a] = -qu[P[a]];
      chol_solve(L, n, K, rhs);
      bool positive = true;
      for (int a = 0; a < n; ++a) {
        z[a] = rhs[a];
        positive &= z[a] > 0;
      }
      moved = true;
      if (positive) {
        for (int a = 0; a < n; ++a) y[P[a]] = z[a];
        break;
      }
      double theta = 1;
      for (int a = 0; a < n; ++a) {
        const double ya = y[P[a]];
        if (z[a] <= 0) {
          const double th = ya > z[a] ? ya / (ya - z[a]) : 0.0;
          if (th < theta) theta = th;
        }
      }
      int m = 0;
      for (int a = 0; a < n; ++a) {
        const int p = P[a];
        const double ya = y[p] + theta * (z[a] - y[p]);
        if (ya > 0 && !(z[a] <= 0 && ya <= 4 * kEps64 * vmax)) {
          y[p] = ya;
          P[m++] = p;
        } else {
          y[p] = 0;
        }
      }
      n = m;
      if (n == 0) break;
    }
    if (!moved) break;
  }
  for (int k = 0; k < K; ++k) v[k] = u[k] + y[k];
  return steps;
}

// UPGrad, as torchjd's with its quadprog projector: v_i = argmin_{v >= e_i / K} v^T G' v
// with G' = G / tr(G) + reg_eps I; w = sum_i v_i.
MMFAST_SHD void upgrad(const double* Gn, int K, double reg_eps, double eps, double* w, double* ws) {
  double* Q = ws;
  double* L = ws + K * K;
  for (int i = 0; i < K * K; ++i) Q[i] = Gn[i];
  for (int k = 0; k < K; ++k) Q[k * K + k] += reg_eps;
  double u[kMaxK], v[kMaxK];
  for (int k = 0; k < K; ++k) w[k] = 0;
  for (int i = 0; i < K; ++i) {
    for (int k = 0; k < K; ++k) u[k] = k == i ? 1.0 / K : 0.0;
    box_projection(Q, K, u, eps, v, L);
    for (int k = 0; k < K; ++k) w[k] += v[k];
  }
}

// CAGrad's inner problem, exactly: w* = argmin_{w in simplex} b^T w + r sqrt(w^T G w),
// b = G 1/K, r = c |g_0|. For t > 0 let w(t) solve the QP min w^T G w + 2 t b^T w over
// the simplex (g_w(t) is the projection of -t g_0 onto conv{g_k}, unique): its KKT
// conditions are those of the problem above, times t, exactly when |g_w(t)| = r t. On
// one active set (corral S) w(t) = a0 + t a1 is linear, so |g_w(t)|^2 = r^2 t^2 is a
// quadratic in t: solved in closed form and kept when w(t) and the multipliers are
// feasible there (the exact optimum). The outer search over t: bisection on log t in
// [|g_mgda| / r, 1 / r] (|g_w(t)| lies in [|g_mgda|, 1] for trace-1 G), each point's QP
// by Wolfe's algorithm, its corral's root tried first. No root with g_w != 0 (a
// Pareto-stationary G with c >= 1, or a root below |g_w| = 1e-6): w* = the MGDA point,
// g_w* = 0.
// r = 0 (c = 0 or g_0 = 0): the limit t -> inf: the min-norm point of the face
// argmin b^T w. Returns w* in w; q = |g_w*|.
MMFAST_SHD int cagrad_inner(const double* Gn, int K, const double* b, double r, double g0n, double eps, double* w,
                            double& q, double* ws) {
  double* L = ws;
  int S[kMaxK], n;
  auto norm_of = [&](const double* x) {
    double s = 0;
    for (int i = 0; i < K; ++i) {
      if (x[i] == 0) continue;
      double v = 0;
      for (int j = 0; j < K; ++j) v += Gn[i * K + j] * x[j];
      s += x[i] * v;
    }
    return sqrt(s > 0 ? s : 0.0);
  };
  if (!(r > 0)) {
    double bmin = INFINITY, bmax = 0;
    for (int k = 0; k < K; ++k) {
      bmin = fmin(bmin, b[k]);
      bmax = fmax(bmax, fabs(b[k]));
    }
    Mask face = 0;
    for (int k = 0; k < K; ++k)
      if (b[k] <= bmin + 4 * (K + 1) * kEps64 * bmax) face |= Mask{1} << k;
    min_norm(Gn, K, face, nullptr, 0, eps, w, S, n, L);
    q = norm_of(w);
    return 1;
  }
  min_norm(Gn, K, all_of(K), nullptr, 0, eps, w, S, n, L);
  const double m = norm_of(w);
  if (m < 1e-6 && r >= g0n) {
    // 0 in the hull (to |g_w|'s precision) and c >= 1: F(w) >= |g_w| (r - |g_0|) >= 0 =
    // F at g_w = 0, so g_w = 0 is optimal (c = 1: tied with g_w opposite to g_0; the
    // tie goes to 0, as torchjd's answer).
    q = m;
    return 0;
  }
  double best[kMaxK];
  for (int k = 0; k < K; ++k) best[k] = w[k];
  double a0[kMaxK], a1[kMaxK], x[kMaxK], gx[kMaxK];
  // |g_w| is known to about sqrt(fp64 rounding) (it is the root of an fp64 |g_w|^2), so
  // the search starts at |g_w| = 1e-6 at the least: a root below it is a Pareto-stationary
  // point (weights 0 for any norm_eps >= 1e-6; the point at lo otherwise).
  double lo = fmax(m, 1e-6) / r, hi = 1 / r;
  if (!(hi > lo)) hi = lo;  // |g_mgda| ~ 1: the root is at lo
  const double tol = 1024 * (K + 1) * kEps64;  // feasibility of a piece's root
  double t = lo;
  int evals = 0;
  for (; evals < kCagradEvals; ++evals) {
    min_norm(Gn, K, all_of(K), b, t, eps, x, S, n, L);
    const double f = norm_of(x);
    const bool above = f - r * t > 0;  // phi(t) > 0: the root is beyond t
    if (evals == 0 && !above) {  // the root is at or below lo: keep x(lo)
      for (int k = 0; k < K; ++k) best[k] = x[k];
      break;
    }
    if (above) lo = t;
    else hi = t;
    // This corral's piece: x(t') = a0 + t' a1; |g_x(t')|^2 = A + 2 B t' + C t'^2 = r^2 t'^2.
    if (affine_point(Gn, K, S, n, b, 0, a0, a1, L, 0.0)) {
      double A = 0, B = 0, C = 0;
      for (int i = 0; i < n; ++i)
        for (int j = 0; j < n; ++j) {
          const double g = Gn[S[i] * K + S[j]];
          A += a0[i] * g * a0[j];
          B += a0[i] * g * a1[j];
          C += a1[i] * g * a1[j];
        }
      const double qa = C - r * r, qb = 2 * B, qc = A;
      double roots[2] = {-1, -1};
      if (fabs(qa) > 1e-300) {
        const double disc = qb * qb - 4 * qa * qc;
        if (disc >= 0) {
          const double q1 = -0.5 * (qb + (qb >= 0 ? sqrt(disc) : -sqrt(disc)));
          roots[0] = q1 / qa;
          roots[1] = q1 != 0 ? qc / q1 : -1;
        }
      } else if (qb != 0) {
        roots[0] = -qc / qb;
      }
      for (double root : roots) {
        if (!(root > 0) || !is_finite(root)) continue;
        // feasible at root: weights >= 0 and multipliers (G x + t b)_k - nu >= 0 off S
        double xr[kMaxK];
        for (int k = 0; k < K; ++k) xr[k] = 0;
        bool ok = true;
        for (int i = 0; i < n; ++i) {
          xr[S[i]] = a0[i] + root * a1[i];
          ok &= xr[S[i]] >= -tol;
        }
        if (!ok) continue;
        double nu = 0, gmax = 0;
        for (int k = 0; k < K; ++k) {
          double v = root * b[k];
          for (int j = 0; j < K; ++j) v += Gn[k * K + j] * xr[j];
          gx[k] = v;
          gmax = fmax(gmax, fabs(v));
        }
        for (int i = 0; i < n; ++i) nu += xr[S[i]] * gx[S[i]];
        for (int k = 0; k < K; ++k) ok &= gx[k] - nu >= -tol * (gmax + root);
        if (!ok) continue;
        double s = 0;
        for (int k = 0; k < K; ++k) s += (xr[k] = xr[k] > 0 ? xr[k] : 0.0);
        for (int k = 0; k < K; ++k) w[k] = xr[k] / s;
        q = norm_of(w);
        return evals + 1;
      }
    }
    for (int k = 0; k < K; ++k) best[k] = x[k];
    if (hi <= lo * (1 + 4 * kEps64)) break;
    t = sqrt(lo * hi);
  }
  for (int k = 0; k < K; ++k) w[k] = best[k];
  q = norm_of(w);
  return evals;
}

// CAGrad, as torchjd's (plus an optional rescale): w = 1/K + (r / |g_w*|) w*, or 0 when
// |g_w*| < norm_eps (a Pareto-stationary point).
MMFAST_SHD void cagrad(const double* Gn, int K, const Params& p, double* w, double* ws) {
  double b[kMaxK], ws_w[kMaxK];
  double g0 = 0;
  for (int k = 0; k < K; ++k) {
    double s = 0;
    for (int j = 0; j < K; ++j) s += Gn[k * K + j];
    b[k] = s / K;
    g0 += b[k] / K;
  }
  const double r = p.c * sqrt(g0 > 0 ? g0 : 0.0);
  double q = 0;
  cagrad_inner(Gn, K, b, r, sqrt(g0 > 0 ? g0 : 0.0), p.eps, ws_w, q, ws);
  const double scale = p.rescale == 1 ? 1 / (1 + p.c * p.c) : p.rescale == 2 ? 1 / (1 + p.c) : 1.0;
  const bool keep = q >= p.norm_eps && q > 0;
  for (int k = 0; k < K; ++k) w[k] = keep ? (1.0 / K + r / q * ws_w[k]) * scale : 0.0;
}

// MMPareto for one main objective (mmfast/weightings/mmpareto.py has the definition).
// G: the raw (unnormalised, unsymmetrised) Gram for SEMANTICS.md's closed form; Gn for
// the min-norm point.
MMFAST_SHD void mmpareto(const double* G, const double* Gn, int K, int main, double eps, double* w, double* ws) {
  if (K == 1) {
    w[0] = 1;
    return;
  }
  const double AA = G[main * K + main];
  int n_conf = 0;
  Mask S = Mask{1} << main;
  for (int j = 0; j < K; ++j)
    if (j != main && G[main * K + j] <= 0) {
      ++n_conf;
      S |= Mask{1} << j;
    }
  for (int k = 0; k < K; ++k) w[k] = 1.0 / K;
  if (n_conf == 0) return;
  if (n_conf == 1) {
    int j = 0;
    while (j == main || !in(S, j)) ++j;
    const double AB = G[main * K + j], BB = G[j * K + j];
    const double den = AA + BB - 2 * AB;
    const double wp = AB >= AA ? 1 - kMmparetoFloor : AB >= BB ? kMmparetoFloor : (BB - AB) / (den != 0 ? den : 1.0);
    w[main] = 2.0 / K * wp;
    w[j] = 2.0 / K * (1 - wp);
    return;
  }
  const int size = n_conf + 1;
  double alpha[kMaxK];
  int first = -1;  // the vertex rule: k in S with G_kj >= G_kk for every j in S, main first
  for (int pass = 0; pass < 2 && first < 0; ++pass)
    for (int k = 0; k < K && first < 0; ++k) {
      if (!in(S, k) || (pass == 0) != (k == main)) continue;
      bool vert = true;
      for (int j = 0; j < K; ++j) vert &= !in(S, j) || G[k * K + j] >= G[k * K + k];
      if (vert) first = k;
    }
  if (first >= 0) {
    for (int k = 0; k < K; ++k) alpha[k] = k == first ? 1 - kMmparetoFloor * (size - 1) : in(S, k) ? kMmparetoFloor : 0.0;
  } else {
    int idx[kMaxK], n;
    min_norm(Gn, K, S, nullptr, 0, eps, alpha, idx, n, ws);
  }
  for (int k = 0; k < K; ++k)
    if (in(S, k)) w[k] = static_cast<double>(size) / K * alpha[k];
}

// One group: G (K x K, row-major, any finite or not) -> w, by the weighting M (a template
// parameter so that a CUDA kernel holds one solver: merged, ptxas spills registers).
// ws: workspace(K) doubles.
template <int M>
MMFAST_SHD void weigh_as(const double* G, const Params& p, double* w, double* ws) {
  const int K = p.K;
  double* Gn = ws;
  ws += K * K;
  bool finite = true;
  double tr = 0;
  for (int i = 0; i < K * K; ++i) finite &= is_finite(G[i]);
  if (!finite) {
    for (int k = 0; k < K; ++k) w[k] = NAN;
    return;
  }
  for (int k = 0; k < K; ++k) tr += G[k * K + k];
  const double scale = tr > 0 ? tr : 1.0;
  for (int i = 0; i < K; ++i)
    for (int j = 0; j < K; ++j) Gn[i * K + j] = 0.5 * (G[i * K + j] + G[j * K + i]) / scale;
  if constexpr (M == kMgda) mgda(Gn, K, p.eps, w, ws);
  else if constexpr (M == kPcgrad) pcgrad(Gn, K, p.orders, w, ws);
  else if constexpr (M == kCagrad) cagrad(Gn, K, p, w, ws);
  else if constexpr (M == kImtlg) imtlg(Gn, K, p.rcond >= 0 ? p.rcond : K * p.eps, w, ws);
  else if constexpr (M == kUpgrad) upgrad(Gn, K, p.reg_eps, p.eps, w, ws);
  else mmpareto(G, Gn, K, p.main, p.eps, w, ws);
}

// weigh_as for p.method (the CPU's entry).
MMFAST_SHD void weigh(const double* G, const Params& p, double* w, double* ws) {
  switch (p.method) {
    case kMgda: weigh_as<kMgda>(G, p, w, ws); break;
    case kPcgrad: weigh_as<kPcgrad>(G, p, w, ws); break;
    case kCagrad: weigh_as<kCagrad>(G, p, w, ws); break;
    case kImtlg: weigh_as<kImtlg>(G, p, w, ws); break;
    case kUpgrad: weigh_as<kUpgrad>(G, p, w, ws); break;
    default: weigh_as<kMmpareto>(G, p, w, ws); break;
  }
}

// aggregate_'s MMPareto rescale of tensor t (mmfast/_multi.py has the definition): with
// P its fp64 Gram and w its group's weights, n_t = K sum_k w_k g_k and the coefficients
// are w s_t, s_t = gamma K max(||sum_k g_k|| / ||n_t||, 1), or 0 where n_t is zero by
// the zero rule (precision.h). NaN propagates.
MMFAST_SHD double mmpareto_scale_k(const double* P, const double* w, int K, double gamma) {
  double nn = 0, ss = 0, root = 0;
  for (int i = 0; i < K; ++i) {
    for (int j = 0; j < K; ++j) {
      nn += w[i] * P[i * K + j] * w[j];
      ss += P[i * K + j];
    }
    root += fabs(w[i]) * sqrt(P[i * K + i]);
  }
  nn = K * K * (nn < 0 ? 0.0 : nn);
  ss = ss < 0 ? 0.0 : ss;
  const double terms = K * K * root * root;
  if (terms <= 1.7976931348623157e308 && nn <= kZeroTol * terms) return 0.0;
  const double ratio = sqrt(ss) / sqrt(nn);
  return gamma * K * (ratio < 1.0 ? 1.0 : ratio);
}

}  // namespace mmfast::solve
