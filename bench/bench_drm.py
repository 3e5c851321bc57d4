"""DRM performance: the streamed decomposition against scikit-learn's exact PCA, its memory as N grows when
reading from disk, and HyRe over many users in one call against a Python loop.

    python bench/bench_drm.py                                  # the issue's sizes: N = 100k, d = 1024 and 2048
    python bench/bench_drm.py --n 20000 --dims 256 --users 2000  # a quick look

Input: pair differences with a known decaying spectrum (eigenvalues 1/(i+1) along a random rotation, plus a
mean), written as an embedding folder of 4,096-pair shards, so every method reads the same numbers. Writes the
"drm" section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_section  # bench/ is not a package

SHARD = 4096
K = 50


def write_spectrum_pairs(folder: Path, n: int, dim: int, seed: int = 0) -> None:
    """n pairs whose differences have covariance Q diag(1/(i+1)) Qᵀ and a mean, shard by shard."""
    from rewardprism.embed import ShardWriter

    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    scale = (1.0 / np.sqrt(np.arange(1, dim + 1)))[:, None] * rotation.T  # (d, d): rows = √λᵢ qᵢᵀ
    mean = rng.standard_normal(dim) * 0.1
    writer = ShardWriter(folder, "bench", dim)
    for number, start in enumerate(range(0, n, SHARD)):
        rows = min(SHARD, n - start)
        rejected = rng.standard_normal((rows, dim), dtype=np.float32)
        diff = (rng.standard_normal((rows, dim)) @ scale + mean).astype(np.float32)
        writer.write(number, f"bench-{number}", rejected + diff, rejected, 0)


def compare_with_sklearn(folder: Path) -> dict[str, float]:
    """Seconds for each path on the same pairs, and how far the components and variances agree."""
    from rewardprism.drm import PreferenceDecomposition
    from rewardprism.embed import EmbeddingSet
    from sklearn.decomposition import PCA

    data = EmbeddingSet(folder)
    start = time.perf_counter()
    streamed = PreferenceDecomposition(K).fit_shards(data.shards())
    disk = time.perf_counter() - start
    chosen, rejected = data.load()
    start = time.perf_counter()
    PreferenceDecomposition(K).fit(chosen, rejected)
    memory = time.perf_counter() - start
    start = time.perf_counter()
    pca = PCA(K, svd_solver="full").fit(chosen - rejected)
    sklearn = time.perf_counter() - start
    cosines = np.abs((streamed.components_ * pca.components_).sum(1))
    variance = np.abs(streamed.explained_variance_ / pca.explained_variance_ - 1)
    return {"disk": disk, "memory": memory, "sklearn": sklearn, "min_cos": float(cosines.min()),
            "max_var_rel": float(variance.max())}


PEAK = """
import itertools, resource, sys
from rewardprism.drm import PreferenceDecomposition
from rewardprism.embed import EmbeddingSet
shards = itertools.islice(EmbeddingSet(sys.argv[1]).shards(), int(sys.argv[2]))
PreferenceDecomposition(50).fit_shards(shards)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def peak_rss_mib(folder: Path, n: int) -> float:
    """Peak resident memory (MiB) of a fresh process that decomposes the first n pairs from disk."""
    out = subprocess.run([sys.executable, "-c", PEAK, str(folder), str(-(-n // SHARD))], check=True,
                         capture_output=True, text=True)
    return float(out.stdout.split()[-1])


def bench_hyre(users: int, n: int, heads: int, loop_users: int) -> dict[str, float]:
    """Seconds per user: one vectorized call for all users vs a loop of single-user calls (on a subset).

    One torch thread for both: on a shared machine, idle-waiting threads would time the neighbours' load.
    """
    import torch
    from rewardprism.adapt import adapt_users, hyre

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    chosen, rejected = rng.standard_normal((users, n, heads)), rng.standard_normal((users, n, heads))
    start = time.perf_counter()
    hyre(chosen, rejected)
    vectorized = (time.perf_counter() - start) / users
    start = time.perf_counter()
    for u in range(loop_users):
        hyre(chosen[u:u + 1], rejected[u:u + 1])
    loop = (time.perf_counter() - start) / loop_users
    prior = rng.standard_normal(heads)
    start = time.perf_counter()
    adapt_users(chosen[:loop_users], rejected[:loop_users], prior, method="default")
    default = (time.perf_counter() - start) / loop_users
    return {"vectorized": vectorized, "loop": loop, "default": default}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="pairs")
    parser.add_argument("--dims", type=int, nargs="+", default=[1024, 2048], help="embedding dimensions")
    parser.add_argument("--users", type=int, default=10_000, help="users adapted by HyRe in one call")
    args = parser.parse_args()
    command = "python bench/bench_drm.py " + " ".join(sys.argv[1:])
    lines = [f"Load average at the start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.", "",
             (f"Decomposition (k = {K}) of N = {args.n:,} pairs, differences with eigenvalues 1/(i+1): the streamed "
             "moments + `eigh` (`PreferenceDecomposition`, from the shard files and from arrays in memory) against "
             '`sklearn.decomposition.PCA(svd_solver="full")` on the same arrays. |cos|: the smallest over the 50 '
             "components against scikit-learn's (every gap is at least 1/51 of its eigenvalue)."), "",
             ("| d | streamed from disk | in memory | sklearn full SVD | speed-up (in memory) | min \\|cos\\| "
             "| max rel. variance error |"), "|---|---|---|---|---|---|---|"]
    memory_rows = []
    with tempfile.TemporaryDirectory(prefix="bench_drm_") as tmp:
        for dim in args.dims:
            folder = Path(tmp) / f"d{dim}"
            write_spectrum_pairs(folder, args.n, dim)
            r = compare_with_sklearn(folder)
            lines.append(f"| {dim} | {r['disk']:.1f} s | {r['memory']:.1f} s | {r['sklearn']:.1f} s | "
                         f"{r['sklearn'] / r['memory']:.1f}× | {r['min_cos']:.7f} | {r['max_var_rel']:.1e} |")
            print(lines[-1], flush=True)
            if dim == args.dims[0]:
                memory_rows = [(n, peak_rss_mib(folder, n)) for n in (args.n // 4, args.n // 2, args.n)]
            for path in folder.iterdir():
                path.unlink()
    lines += ["", (f"Peak resident memory of a process decomposing the first N pairs from disk (d = {args.dims[0]}; "
              "imports included):"), "", "| N | peak RSS |", "|---|---|"]
    lines += [f"| {n:,} | {mib:.0f} MiB |" for n, mib in memory_rows]
    h = bench_hyre(args.users, 15, 100, loop_users=min(args.users, 2000))
    lines += ["", (f"Adaptation of {args.users:,} users × n = 15 pairs × 100 heads, one torch thread (the loop and "
              f"the default method timed on {min(args.users, 2000):,} users):"), "",
              "| | per user | all users |", "|---|---|---|",
              f"| HyRe, one vectorized call | {h['vectorized'] * 1e6:.1f} µs | {h['vectorized'] * args.users:.2f} s |",
              f"| HyRe, a Python loop over users | {h['loop'] * 1e6:.1f} µs | {h['loop'] * args.users:.2f} s |",
              (f"| default (hierarchical BT, 9 strengths), one call | {h['default'] * 1e6:.1f} µs | "
              f"{h['default'] * args.users:.2f} s |"), "",
              f"HyRe vectorized is {h['loop'] / h['vectorized']:.0f}× the loop."]
    print("\n".join(lines[-8:]))
    write_section("drm", command, "\n".join(lines))


if __name__ == "__main__":
    main()
