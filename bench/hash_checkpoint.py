"""What checkpoint.py's content hash costs per save (checkpoint.py Deviations 4): every file of a checkpoint
hashed once right after it is written, so read from the page cache, as checkpoint._seal does after its fsync.

    OMP_NUM_THREADS=1 python bench/hash_checkpoint.py outputs/run/checkpoints/checkpoint-1   # a real checkpoint
    OMP_NUM_THREADS=1 python bench/hash_checkpoint.py --hunyuan15 /tmp/hy15                  # HunyuanVideo-1.5 LoRA sizes

--hunyuan15 writes the three large files of a HunyuanVideo-1.5 LoRA checkpoint (56.6 M float32 parameters:
the adapter 226 MB, AdamW's optimizer.bin 453 MB, the anchor 226 MB) into the scratch folder first (905 MB)."""
import hashlib
import os
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import safetensors.torch
import torch


def chunked(name):
    def run(path):
        h = hashlib.new(name)
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()
    return run


def file_digest(name):
    def run(path):
        with open(path, "rb") as f:
            return hashlib.file_digest(f, name).hexdigest()
    return run


def crc32(path):
    c = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            c = zlib.crc32(block, c)
    return c


CANDIDATES = {"sha256 (1 MiB reads)": chunked("sha256"), "sha256 file_digest": file_digest("sha256"),
              "blake2b (1 MiB reads)": chunked("blake2b"), "blake2b file_digest": file_digest("blake2b"),
              "md5 (1 MiB reads)": chunked("md5"), "sha1 (1 MiB reads)": chunked("sha1"), "crc32 (zlib)": crc32}


def bench(folder, repeats):
    files = [os.path.join(d, n) for d, _, ns in os.walk(folder) for n in ns]
    size = sum(os.path.getsize(p) for p in files)
    for p in files:  # warm the page cache, as right after the save
        open(p, "rb").read()
    print(f"{folder}: {len(files)} files, {size / 1e6:.1f} MB")

    def timed(fn):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return sorted(times)[len(times) // 2]

    for name, hash_one in CANDIDATES.items():
        t = timed(lambda: [hash_one(p) for p in files])
        print(f"  {name:24s} {t * 1e3:8.1f} ms  {size / t / 1e9:5.2f} GB/s")
    for workers in (2, 4, 8):  # what checkpoint._sha256 does: one file per thread (hashlib releases the GIL)
        def threaded():
            with ThreadPoolExecutor(min(workers, len(files))) as pool:
                list(pool.map(CANDIDATES["sha256 (1 MiB reads)"], files))
        if workers <= (os.cpu_count() or 1):
            print(f"  sha256, {workers} threads       {timed(threaded) * 1e3:8.1f} ms")


if __name__ == "__main__":
    if sys.argv[1] == "--hunyuan15":
        folder = sys.argv[2]
        os.makedirs(folder, exist_ok=True)
        w = torch.randn(56_600_000, generator=torch.Generator().manual_seed(0))
        t = time.perf_counter()
        safetensors.torch.save_file({"w": w}, os.path.join(folder, "pytorch_lora_weights.safetensors"))
        torch.save({"exp_avg": w, "exp_avg_sq": w.square()}, os.path.join(folder, "optimizer.bin"))
        torch.save({"anchor": w}, os.path.join(folder, "anchor.pt"))
        for name in os.listdir(folder):
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            os.fsync(fd), os.close(fd)
        print(f"writing + fsync of the three files: {time.perf_counter() - t:.2f} s")
        bench(folder, repeats=3)
    else:
        for folder in sys.argv[1:]:
            bench(folder, repeats=5)
