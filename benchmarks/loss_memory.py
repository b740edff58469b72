"""Peak memory and time of the plain vs the chunked InfoNCE loss, forward + backward, on CPU.

    python benchmarks/loss_memory.py                      # 4,096 and 16,384 both, chunked at 65,536
    python benchmarks/loss_memory.py --batches 4096 --big 0   # quick run

Every case runs in a fresh subprocess so one case's allocations cannot hide another's peak.
Peak memory = the process's peak resident set size (``VmHWM``) during forward + backward minus
its resident size just before (features already created); ``VmHWM`` is reset right before the
loss through ``/proc/self/clear_refs`` (Linux), with a sampling thread as a fallback. torch's CPU
allocations are invisible to ``tracemalloc``, hence the OS view. Gradients of the features count
in both columns. Time = best of ``--repeats`` forward + backward passes after a small warm-up.

    python benchmarks/loss_memory.py --objectives            # multi-positive and SigLIP rows (issue 16)

``--objectives`` measures, against the plain losses in the same run: multi-positive InfoNCE
(groups of 4 ids) dense vs ``ClipLoss`` and chunked vs ``ChunkedClipLoss``; then SigLIP's peak
memory per rank at 1, 2 and 4 gloo ranks (fixed local batch), all-gather vs neighbour exchange.

Targets (issue 3): at 16,384 the chunked loss uses <= 1/10 of the plain loss's peak memory at
<= 1.5x its time, and it runs at 65,536 on a 24 GiB machine where the plain loss cannot (the plain
loss's need there is estimated from its measured bytes-per-logit at 16,384 and the case skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

GiB = 1024**3
MiB = 1024**2


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


class _PeakRSS:
    """Peak RSS over a block: kernel high-water mark if resettable, else a 2 ms sampling thread."""

    def __enter__(self) -> _PeakRSS:
        self.base = _rss_bytes("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.kernel = True
        except OSError:
            self.kernel = False
            self.sampled = self.base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.sampled = max(self.sampled, _rss_bytes("VmRSS"))
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        if self.kernel:
            self.peak = _rss_bytes("VmHWM")
        else:
            self._stop.set()
            self._thread.join()
            self.peak = self.sampled
        self.delta = max(0, self.peak - self.base)


def run_case(impl: str, batch: int, dim: int, chunk: int, repeats: int, seed: int) -> dict:
    """One measurement, in this process (called in the child)."""
    import torch
    import torch.nn.functional as F

    from clipforge.losses import ChunkedClipLoss, ClipLoss
    from clipforge.objectives.multipos import MultiPositiveLoss

    ids = None
    if impl == "plain":
        loss_fn = ClipLoss()
    elif impl == "chunked":
        loss_fn = ChunkedClipLoss(chunk_size=chunk)
    else:  # multipos / multipos-chunked: 4 captions per image
        loss_fn = MultiPositiveLoss(chunk_size=chunk if impl == "multipos-chunked" else None)
        ids = torch.arange(batch) // 4
    # Warm-up on a small batch: thread pools, kernels, allocator; not counted.
    small = F.normalize(torch.randn(256, dim), dim=-1).requires_grad_()
    loss_fn(small, small.detach().clone().requires_grad_(), torch.tensor(10.0, requires_grad=True)).backward()

    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=gen), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(batch, dim, generator=gen), dim=-1).requires_grad_()
    scale = torch.tensor(14.285, requires_grad=True)  # exp(log(1/0.07)): CLIP's initial temperature

    times = []
    with _PeakRSS() as mem:
        for _ in range(repeats):
            image.grad = text.grad = scale.grad = None
            start = time.perf_counter()
            loss = loss_fn(image, text, scale) if ids is None else loss_fn(image, text, scale, ids=ids)
            loss.backward()
            times.append(time.perf_counter() - start)
    return {
        "impl": impl,
        "batch": batch,
        "peak_bytes": mem.delta,
        "seconds": min(times),
        "loss": float(loss),
        "scale_grad": float(scale.grad),
        "threads": torch.get_num_threads(),
    }


def siglip_rank(rank: int, world: int, init: str, impl: str, n: int, dim: int, repeats: int) -> dict:
    """One rank of the SigLIP measurement: local batch ``n``, ``impl`` gather or neighbour."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from clipforge.objectives.siglip import SigLip

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    loss_fn = SigLip(exchange=impl, rank=rank, world_size=world)
    gen = torch.Generator().manual_seed(rank)
    image = F.normalize(torch.randn(n, dim, generator=gen), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(n, dim, generator=gen), dim=-1).requires_grad_()
    scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    small = image[:64].detach().clone().requires_grad_()
    loss_fn(small, small.detach().clone().requires_grad_(), scale, bias).backward()  # warm-up
    times = []
    with _PeakRSS() as mem:
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            loss = loss_fn(image, text, scale, bias)
            loss.backward()
            times.append(time.perf_counter() - start)
    total = loss.detach().clone()
    dist.all_reduce(total)
    dist.destroy_process_group()
    return {"peak_bytes": mem.delta, "seconds": min(times), "loss": float(total) / world}


def spawn_siglip(impl: str, world: int, n: int, dim: int, repeats: int) -> dict:
    """All ranks of one SigLIP case; returns the largest per-rank peak and the slowest rank's time."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "init")
        cmd = [sys.executable, os.path.abspath(__file__), "--dim", str(dim), "--repeats", str(repeats)]
        procs = [
            subprocess.Popen(
                [*cmd, "--siglip-child", str(r), str(world), init, impl, str(n)],
                stdout=subprocess.PIPE,
                text=True,
                # Big buffers straight from mmap: freed memory leaves the RSS at once, so the peak RSS
                # is the peak of live tensors rather than of glibc's heap fragmentation.
                env={**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"},
            )
            for r in range(world)
        ]
        outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    return {
        "peak_bytes": max(o["peak_bytes"] for o in outs),
        "seconds": max(o["seconds"] for o in outs),
        "loss": outs[0]["loss"],
    }


def objectives_report(args: argparse.Namespace) -> None:
    """Multi-positive vs plain InfoNCE, and SigLIP memory per rank against world size."""
    print(f"multi-positive InfoNCE (groups of 4), float32, embed dim {args.dim}, chunk {args.chunk}, CPU")
    for batch in [] if args.siglip_only else args.batches:
        res = {impl: spawn_case(args, impl, batch, args.repeats) for impl in ("plain", "multipos", "chunked", "multipos-chunked")}
        for r in res.values():
            print(fmt(r), flush=True)
        for new, old in (("multipos", "plain"), ("multipos-chunked", "chunked"), ("multipos-chunked", "plain")):
            mem = res[new]["peak_bytes"] / max(res[old]["peak_bytes"], 1)
            print(f"  -> batch {batch}: {new}/{old} memory {mem:.3f}, time {res[new]['seconds'] / res[old]['seconds']:.2f}x")
    n = args.siglip_local
    print(f"SigLIP, local batch {n} per rank, embed dim {args.dim}, 1 thread per rank (gloo, CPU)")
    base: dict[str, dict] = {}
    for world in (1, 2, 4):
        for impl in ("gather", "neighbour"):
            r = spawn_siglip(impl, world, n, args.dim, args.repeats)
            base.setdefault(impl, r)
            print(
                f"  {impl:9s} {world} rank(s): peak/rank {r['peak_bytes'] / MiB:8.1f} MiB "
                f"({r['peak_bytes'] / max(base[impl]['peak_bytes'], 1):.2f}x its 1-rank peak), "
                f"fwd+bwd {r['seconds']:.3f} s, loss {r['loss']:.6f}",
                flush=True,
            )


def spawn_case(args: argparse.Namespace, impl: str, batch: int, repeats: int) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        impl,
        str(batch),
        "--dim",
        str(args.dim),
        "--chunk",
        str(args.chunk),
        "--repeats",
        str(repeats),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def fmt(result: dict) -> str:
    return (
        f"  {result['impl']:8s} batch {result['batch']:6d}: peak {result['peak_bytes'] / MiB:9.1f} MiB, "
        f"fwd+bwd {result['seconds']:8.2f} s, loss {result['loss']:.6f}, dloss/dscale {result['scale_grad']:.6f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument(
        "--big", type=int, default=65536, help="batch run with the chunked loss only (0: skip)"
    )
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--memory-gib", type=float, default=24.0, help="RAM of the machine, for the 'cannot' check"
    )
    parser.add_argument("--child", nargs=2, metavar=("IMPL", "BATCH"), help=argparse.SUPPRESS)
    parser.add_argument("--objectives", action="store_true", help="multi-positive and SigLIP-per-rank rows")
    parser.add_argument("--siglip-local", type=int, default=2048, help="SigLIP local batch per rank")
    parser.add_argument("--siglip-only", action="store_true", help="with --objectives: only the SigLIP rows")
    parser.add_argument("--siglip-child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.siglip_child:
        rank, world, init, impl, n = args.siglip_child
        print(json.dumps(siglip_rank(int(rank), int(world), init, impl, int(n), args.dim, args.repeats)))
        return 0
    if args.objectives:
        objectives_report(args)
        return 0

    if args.child:
        impl, batch = args.child[0], int(args.child[1])
        print(json.dumps(run_case(impl, batch, args.dim, args.chunk, args.repeats, seed=0)))
        return 0

    print(f"loss forward+backward, float32, embed dim {args.dim}, chunk {args.chunk}, CPU")
    results: dict[tuple[str, int], dict] = {}
    for batch in args.batches:
        for impl in ("plain", "chunked"):
            results[impl, batch] = res = spawn_case(args, impl, batch, args.repeats)
            print(fmt(res), flush=True)
        plain, chunked = results["plain", batch], results["chunked", batch]
        mem_ratio = chunked["peak_bytes"] / max(plain["peak_bytes"], 1)
        time_ratio = chunked["seconds"] / plain["seconds"]
        print(
            f"  -> batch {batch}: chunked/plain memory {mem_ratio:.3f} (1/{1 / max(mem_ratio, 1e-9):.1f}), "
            f"time {time_ratio:.2f}x, |loss diff| {abs(plain['loss'] - chunked['loss']):.2e}",
            flush=True,
        )
        if batch == 16384:
            ok_mem, ok_time = mem_ratio <= 0.1, time_ratio <= 1.5
            print(
                f"  target @16384: memory <= 1/10: {'PASS' if ok_mem else 'FAIL'}; "
                f"time <= 1.5x: {'PASS' if ok_time else 'FAIL'}",
                flush=True,
            )

    if args.big:
        big = args.big
        # Bytes the plain loss needs per logit, measured at the largest plain batch we ran.
        ref_batch = max(b for (impl, b) in results if impl == "plain") if results else None
        if ref_batch:
            per_logit = results["plain", ref_batch]["peak_bytes"] / ref_batch**2
            basis = f"its measured {per_logit:.1f} B per logit at batch {ref_batch}"
        else:
            per_logit = 4 * 4.0
            basis = "an assumed 4 live float32 [B, B] matrices"
        need = per_logit * big**2
        print(
            f"  plain    batch {big:6d}: skipped - would need ~{need / GiB:.0f} GiB ({basis}) "
            f"> {args.memory_gib:.0f} GiB of RAM"
            if need > args.memory_gib * GiB
            else f"  plain    batch {big:6d}: skipped (estimated {need / GiB:.1f} GiB)"
        )
        res = spawn_case(args, "chunked", big, repeats=1)
        print(fmt(res), flush=True)
        print(
            f"  -> chunked at {big}: peak {res['peak_bytes'] / GiB:.2f} GiB "
            f"({'fits' if res['peak_bytes'] < args.memory_gib * GiB else 'DOES NOT FIT'} in {args.memory_gib:.0f} GiB)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
