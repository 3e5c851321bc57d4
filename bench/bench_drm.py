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
import torch
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_section  # bench/ is not a package
from rewardprism.adapt import STRENGTHS

SHARD = 4096
K = 50


def write_spectrum_pairs(folder: Path, n: int, dim: int, seed: int = 0) -> None:
    """n pairs whose differences have covariance Q diag(1/(i+1)) Qᵀ and a mean, shard by shard."""
    from rewardprism.embed import ShardWriter
    from rewardprism.features import FeatureSpec

    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    scale = (1.0 / np.sqrt(np.arange(1, dim + 1)))[:, None] * rotation.T  # (d, d): rows = √λᵢ qᵢᵀ
    mean = rng.standard_normal(dim) * 0.1
    writer = ShardWriter(folder, FeatureSpec("bench", 512, "right", "mean", "joiner"), dim)  # made-up features
    for number, start in enumerate(range(0, n, SHARD)):
        rows = min(SHARD, n - start)
        rejected = rng.standard_normal((rows, dim), dtype=np.float32)
        diff = (rng.standard_normal((rows, dim)) @ scale + mean).astype(np.float32)
        writer.write(number, f"bench-{number}", rejected + diff, rejected, 0)


def timed(fn):
    """(result, CPU seconds, wall seconds): with one thread, CPU time is the work done whatever the load."""
    cpu, wall = time.process_time(), time.perf_counter()
    result = fn()
    return result, time.process_time() - cpu, time.perf_counter() - wall


def compare_with_sklearn(folder: Path) -> dict[str, float]:
    """CPU and wall seconds for each path on the same pairs, and how far components and variances agree."""
    from rewardprism.drm import PreferenceDecomposition
    from rewardprism.embed import EmbeddingSet
    from sklearn.decomposition import PCA

    data = EmbeddingSet(folder)
    streamed, disk_cpu, disk_wall = timed(lambda: PreferenceDecomposition(K).fit_shards(data.shards()))
    chosen, rejected = data.load()
    _, memory_cpu, memory_wall = timed(lambda: PreferenceDecomposition(K).fit(chosen, rejected))
    pca, sklearn_cpu, sklearn_wall = timed(lambda: PCA(K, svd_solver="full").fit(chosen - rejected))
    cosines = np.abs((streamed.components_ * pca.components_).sum(1))
    variance = np.abs(streamed.explained_variance_ / pca.explained_variance_ - 1)
    return {"disk": (disk_cpu, disk_wall), "memory": (memory_cpu, memory_wall),
            "sklearn": (sklearn_cpu, sklearn_wall), "min_cos": float(cosines.min()),
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
    """CPU seconds per user: one vectorized call for all users vs a loop of single-user calls (on a subset)."""
    from rewardprism.adapt import adapt_users, hyre

    rng = np.random.default_rng(0)
    chosen, rejected = rng.standard_normal((users, n, heads)), rng.standard_normal((users, n, heads))
    _, vectorized, _ = timed(lambda: hyre(chosen, rejected))
    _, loop, _ = timed(lambda: [hyre(chosen[u:u + 1], rejected[u:u + 1]) for u in range(loop_users)])
    prior = rng.standard_normal(heads)
    _, default, _ = timed(lambda: adapt_users(chosen[:loop_users], rejected[:loop_users], prior, method="default"))
    return {"vectorized": vectorized / users, "loop": loop / loop_users, "default": default / loop_users}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="pairs")
    parser.add_argument("--dims", type=int, nargs="+", default=[1024, 2048], help="embedding dimensions")
    parser.add_argument("--users", type=int, default=10_000, help="users adapted by HyRe in one call")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):  # one BLAS thread: CPU seconds then measure work, not the neighbours
        run(args)


def run(args: argparse.Namespace) -> None:
    command = "python bench/bench_drm.py " + " ".join(sys.argv[1:])
    lines = [
        (f"One BLAS and one torch thread; CPU seconds (process time) are the measure, wall seconds alongside: the "
         f"machine was shared (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the start)."), "",
        (f"Decomposition (k = {K}) of N = {args.n:,} pairs, differences with eigenvalues 1/(i+1): the streamed "
         "moments + `eigh` (`PreferenceDecomposition`, from the shard files and from arrays in memory) against "
         '`sklearn.decomposition.PCA(svd_solver="full")` on the same arrays. |cos|: the smallest over the 50 '
         "components against scikit-learn's (every gap is at least 1/51 of its eigenvalue)."), "",
        ("| d | streamed from disk | in memory | sklearn full SVD | speed-up (CPU, in memory) | min \\|cos\\| "
         "| max rel. variance error |"), "|---|---|---|---|---|---|---|"]
    memory_rows = []
    with tempfile.TemporaryDirectory(prefix="bench_drm_") as tmp:
        for dim in args.dims:
            folder = Path(tmp) / f"d{dim}"
            write_spectrum_pairs(folder, args.n, dim)
            r = compare_with_sklearn(folder)
            lines.append(f"| {dim} | {_seconds(r['disk'])} | {_seconds(r['memory'])} | {_seconds(r['sklearn'])} | "
                         f"{r['sklearn'][0] / r['memory'][0]:.1f}× | {r['min_cos']:.7f} | {r['max_var_rel']:.1e} |")
            print(lines[-1], flush=True)
            if dim == args.dims[0]:
                memory_rows = [(n, peak_rss_mib(folder, n)) for n in (args.n // 4, args.n // 2, args.n)]
            for path in folder.iterdir():
                path.unlink()
    lines += ["", (f"Peak resident memory of a process decomposing the first N pairs from disk (d = {args.dims[0]}; "
                   "imports included):"), "", "| N | peak RSS |", "|---|---|"]
    lines += [f"| {n:,} | {mib:.0f} MiB |" for n, mib in memory_rows]
    loop_users = min(args.users, 2000)
    h = bench_hyre(args.users, 15, 100, loop_users)
    lines += ["", (f"Adaptation of {args.users:,} users × n = 15 pairs × 100 heads (the loop and the default method "
                   f"timed on {loop_users:,} users), CPU time:"), "", "| | per user | all users |", "|---|---|---|",
              f"| HyRe, one vectorized call | {h['vectorized'] * 1e6:.1f} µs | {h['vectorized'] * args.users:.2f} s |",
              f"| HyRe, a Python loop over users | {h['loop'] * 1e6:.1f} µs | {h['loop'] * args.users:.2f} s |",
              (f"| default (hierarchical BT, {len(STRENGTHS)} strengths), one call | {h['default'] * 1e6:.1f} µs | "
               f"{h['default'] * args.users:.2f} s |"), "",
              f"HyRe vectorized is {h['loop'] / h['vectorized']:.0f}× the loop."]
    print("\n".join(lines[-8:]))
    write_section("drm", command, "\n".join(lines))


def _seconds(cpu_wall: tuple[float, float]) -> str:
    return f"{cpu_wall[0]:.1f} s CPU ({cpu_wall[1]:.0f} s wall)"


if __name__ == "__main__":
    main()
