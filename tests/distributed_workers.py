"""Real ``torch.distributed`` (gloo, CPU) worker processes for the tests.

Spawned processes import this module by name, so it holds only importable functions.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from accumulation_models import loss_of, make_batches, make_model
from torch.nn.parallel import DistributedDataParallel

from flora import GradientAccumulator


def run_workers(fn: Callable[..., None], world: int, *args: object, timeout: float = 180) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` spawned processes; fail on error/timeout."""
    folder = Path(str(args[0]))  # every worker's first argument is its folder
    for stale in [*folder.glob("done_*"), folder / "rendezvous"]:  # from an earlier run
        stale.unlink(missing_ok=True)  # (a reused FileStore file can hang the next group)
    ctx = mp.start_processes(
        fn, args=(world, *args), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"distributed workers did not finish in {timeout} s")
    except mp.ProcessExitedException as err:
        written = sorted(x.name for x in folder.iterdir()) if folder.is_dir() else []
        raise RuntimeError(f"{err}; files in the worker folder: {written}") from err


def _done(rank: int, tmpdir: str) -> None:
    """Mark that this worker finished everything (results written, process group destroyed)
    and leave at once: with torch 2.13 + gloo, interpreter teardown after
    destroy_process_group aborted ("terminate called without an active exception") or hung
    in about 1 run in 10, always after the work was done, so the worker skips it."""
    (Path(tmpdir) / f"done_{rank}").touch()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _init(rank: int, world: int, tmpdir: str) -> None:
    faulthandler.dump_traceback_later(90, exit=True)  # a hung worker shows where, then exits
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmpdir}/rendezvous", rank=rank, world_size=world
    )


def ddp_accumulation(
    rank: int, world: int, tmpdir: str, steps: int, cycles: int, distribution: str = "gaussian"
) -> None:
    """DDP + GradientAccumulator: micro-batch i of cycle c on rank r is global batch
    ``(c * steps + i) * world + r``; saves parameters and all-reduced bytes per cycle."""
    _init(rank, world, tmpdir)
    try:
        sent: list[int] = []
        real_all_reduce = dist.all_reduce

        def counting_all_reduce(tensor, *args, **kwargs):
            sent.append(tensor.numel() * tensor.element_size())
            return real_all_reduce(tensor, *args, **kwargs)

        dist.all_reduce = counting_all_reduce
        model = make_model()
        ddp = DistributedDataParallel(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
        try:
            GradientAccumulator(ddp, steps, rank=4, optimizer=opt, step_in_backward=True)
            sib_error = ""
        except ValueError as err:
            sib_error = str(err)
        try:
            GradientAccumulator(ddp, steps, rank=4, exact_rows=True)
            rows_error = ""
        except ValueError as err:
            rows_error = str(err)
        acc = GradientAccumulator(ddp, steps, rank=4, seed=1, distribution=distribution)
        batches = make_batches(cycles * steps * world)
        per_cycle = []
        for c in range(cycles):
            sent.clear()
            for i in range(steps):
                with acc.micro_batch():
                    (loss_of(ddp, batches[(c * steps + i) * world + rank]) / steps).backward()
                if i < steps - 1:
                    assert not sent, "communication before the end of the cycle"
            assert acc.sync_gradients
            per_cycle.append(sum(sent))
            opt.step()
            opt.zero_grad()
        if rank == 0:
            torch.save(
                {
                    "params": {n: p.detach().clone() for n, p in model.named_parameters()},
                    "bytes_per_cycle": per_cycle,
                    "reported": acc.last_communicated_bytes,
                    "plan_bytes": acc.plan().state_bytes,
                    "naive_bytes": acc.plan().uncompressed_bytes,
                    "sib_error": sib_error,
                    "rows_error": rows_error,
                },
                Path(tmpdir) / "result.pt",
            )
        dist.barrier()
    finally:
        dist.all_reduce = real_all_reduce
        dist.destroy_process_group()
    _done(rank, tmpdir)


def ddp_comm_hook(rank: int, world: int, tmpdir: str, mode: str, steps: int) -> None:
    """DDP training with flora_comm_hook (mode: plain, off, full_rank, compressed); saves the
    parameters, the bytes each step all-reduced and, per step, the largest difference between
    the hooked gradient and up(down(mean gradient)) computed independently."""
    from flora.distributed import FloraCommState, flora_comm_hook

    _init(rank, world, tmpdir)
    try:
        model = make_model()
        twin = make_model()  # a copy without DDP for the independent expectation
        ddp = DistributedDataParallel(model)
        state = None
        if mode != "plain":
            kwargs = {"off": {"compress": False}, "full_rank": {"rank": 64}}.get(mode, {"rank": 4})
            state = FloraCommState(ddp, seed=2, **kwargs)
            ddp.register_comm_hook(state, flora_comm_hook)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
        batches = make_batches(steps * world)
        sent, errors = [], []
        for step in range(steps):
            twin.load_state_dict(model.state_dict())
            batch = batches[step * world + rank]
            loss_of(ddp, batch).backward()
            if state is not None:
                sent.append(state.last_communicated_bytes)
                twin.zero_grad()
                loss_of(twin, batch).backward()
                worst = 0.0
                for p, q in zip(model.parameters(), twin.parameters(), strict=True):
                    mean = q.grad.clone()
                    dist.all_reduce(mean)
                    mean /= world
                    proj = state.projection(p, step)
                    if proj is not None:
                        d = state.decisions[id(p)]
                        m2 = mean.reshape(d.matrix_shape)
                        c = proj @ m2 if d.side == "left" else m2 @ proj.T
                        mean = (proj.T @ c if d.side == "left" else c @ proj).reshape(p.shape)
                    worst = max(worst, float((p.grad - mean).abs().max()))
                errors.append(worst)
            opt.step()
            opt.zero_grad()
        if rank == 0:
            torch.save(
                {
                    "params": {n: p.detach().clone() for n, p in model.named_parameters()},
                    "sent": sent,
                    "errors": errors,
                    "compressed_bytes": state.compressed_bytes() if state else 0,
                    "full_bytes": sum(4 * p.numel() for p in model.parameters()),
                },
                Path(tmpdir) / f"{mode}.pt",
            )
        dist.barrier()  # no rank tears down while another still communicates
    finally:
        dist.destroy_process_group()
    _done(rank, tmpdir)


def _flora_setup():
    from flora import Flora

    model = make_model()
    opt = Flora(model.named_parameters(), lr=1e-2, rank=4, kappa=2)
    return model, opt


def _train_steps(model, opt, batches):
    for b in batches:
        loss_of(model, b).backward()
        opt.step()
        opt.zero_grad()


def _dcp_save(model, opt, path: str) -> None:
    """DCP-save model and optimizer state (this rank's part of it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)


def _dcp_load(model, opt, path: str) -> None:
    """DCP-load what ``_dcp_save`` wrote, at any world size, into ``model`` and ``opt``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def dcp_roundtrip(rank: int, world: int, tmpdir: str, direction: str) -> None:
    """``save``: 3 DDP steps at this world size, then DCP-save model and optimizer (and a
    torch.save reference on rank 0). ``load``: DCP-load what a single process saved, then
    write the loaded optimizer state for comparison."""

    _init(rank, world, tmpdir)
    try:
        model, opt = _flora_setup()
        ddp = DistributedDataParallel(model)
        if direction == "save":
            _train_steps(ddp, opt, make_batches(3))  # same batches on every rank
            _dcp_save(model, opt, f"{tmpdir}/dcp_world{world}")
            if rank == 0:
                torch.save(opt.state_dict(), f"{tmpdir}/reference.pt")
        else:
            _dcp_load(model, opt, f"{tmpdir}/dcp_world1")
            _train_steps(ddp, opt, make_batches(5)[3:])
            if rank == 0:
                torch.save(
                    {n: p.detach().clone() for n, p in model.named_parameters()},
                    f"{tmpdir}/continued_world{world}.pt",
                )
        dist.barrier()
    finally:
        dist.destroy_process_group()
    _done(rank, tmpdir)


FSDP_OPTIMIZERS = (
    "adamw", "adamw_factored", "flora", "flora_linear", "flora_subspace", "adamw_subspace",
    "flora_gradient", "flora_gradient_fp32", "adamw_fira", "adamw_fira_gradient",
    "sgd_gradient", "lion_gradient", "flora_bf16_moments", "adamw_fira_int8_moments",
)  # fmt: skip
DATA_WORLD = 2  # the global batch of step t is batches[2t] + batches[2t + 1], at any world size


def make_fsdp_optimizer(kind: str, named_params, **extra):
    """The optimizers the FSDP2 tests compare with single-device training."""
    from flora import Flora, FloraAdamW, FloraLion, FloraSGD

    common = dict(lr=1e-2, rank=4, kappa=2, weight_decay=0.1, **extra)
    if kind in ("sgd_gradient", "lion_gradient"):  # their default gradient basis
        cls = FloraSGD if kind.startswith("sgd") else FloraLion
        return cls(named_params, **common)
    if kind.endswith("_subspace"):  # the subspace momentum with an orthonormal projection
        common.update(momentum_variant="subspace", distribution="orthonormal")
    if kind.endswith("_gradient"):  # the gradient basis (a range finder over shards)
        common.update(distribution="gradient")
    if kind.endswith("_gradient_fp32"):  # ... stored in float32 (the default is bf16)
        common.update(distribution="gradient", basis_dtype=None)
    if kind.endswith("_bf16_moments"):  # moments rounded stochastically into bf16
        common.update(moment_dtype=torch.bfloat16)
    if kind.endswith("_int8_moments"):  # the compressed momentum in 8-bit blocks per row
        common.update(moment_dtype=torch.int8)
    if kind.startswith("adamw"):  # Adam's moments in the subspace (fira, the default), or
        # per coordinate (the other kinds), each tested explicitly
        common["preconditioner"] = "subspace" if kind.startswith("adamw_fira") else "elementwise"
    if kind.startswith("flora"):  # flora_linear: the unfactored (linear-memory) base
        return Flora(named_params, factor_second_moment=kind != "flora_linear", **common)
    return FloraAdamW(named_params, factor_second_moment=kind == "adamw_factored", **common)


def global_batch(batches, step: int, rank: int, world: int):
    """This rank's part of step ``step``'s global batch (all of it at world size 1)."""
    parts = batches[step * DATA_WORLD : (step + 1) * DATA_WORLD]
    mine = parts[rank * DATA_WORLD // world : (rank + 1) * DATA_WORLD // world]
    return torch.cat([b[0] for b in mine]), torch.cat([b[1] for b in mine])


def _fsdp_model():
    from torch.distributed.fsdp import fully_shard

    model = make_model(dtype=torch.float64)  # float64: equality is not masked by rounding
    for layer in (model.emb, model.conv, model.fc, model.head):
        fully_shard(layer)
    fully_shard(model)
    return model


def _fsdp_train(model, opt, batches, steps: range, rank: int, world: int) -> list[int]:
    """Train; the number of ``all_reduce`` calls inside each ``opt.step()``."""
    counts, real = [], dist.all_reduce

    def counted(*args, **kwargs):
        counts[-1] += 1
        return real(*args, **kwargs)

    for step in steps:
        loss_of(model, global_batch(batches, step, rank, world)).backward()
        counts.append(0)
        dist.all_reduce = counted
        try:
            opt.step()
        finally:
            dist.all_reduce = real
        opt.zero_grad()
    return counts


def _full_state(opt) -> dict[str, dict[str, object]]:
    """The optimizer state by parameter name, DTensors gathered to full tensors."""
    out = {}
    for _, name, p in opt._named_params():
        out[name] = {
            k: v.full_tensor().clone() if hasattr(v, "full_tensor") else v
            for k, v in opt.state[p].items()
        }
    return out


def fsdp2_train(rank: int, world: int, tmpdir: str, steps: int) -> None:
    """FSDP2 (fully_shard per layer and at the root) with each of ``FSDP_OPTIMIZERS``.
    Saves the full parameters, this rank's state bytes and local state shapes."""
    _init(rank, world, tmpdir)
    try:
        batches = make_batches(steps * DATA_WORLD)
        for kind in FSDP_OPTIMIZERS:
            model = _fsdp_model()
            opt = make_fsdp_optimizer(kind, model.named_parameters())
            reduces = _fsdp_train(model, opt, batches, range(steps), rank, world)
            full = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
            local_shapes = {
                n: {k: tuple(v._local_tensor.shape) for k, v in opt.state[p].items()
                    if isinstance(v, torch.Tensor)}
                for n, p in model.named_parameters()
            }  # fmt: skip
            torch.save(
                {
                    "params": full,
                    "state_bytes": opt.state_bytes(),
                    "shapes": local_shapes,
                    "all_reduces": reduces,
                },
                Path(tmpdir) / f"fsdp_{kind}_rank{rank}.pt",
            )
        dist.barrier()
    finally:
        dist.destroy_process_group()
    _done(rank, tmpdir)


#: bf16 weights without float32 masters, each update rounded by these (flora.rounding)
ROUNDED_KINDS = ("adamw_stochastic", "adamw_compensated", "sgd_stochastic")


def _rounded_optimizer(kind: str, named_params):
    """Elementwise updates (compression off): a row shard's float32 update equals the
    same rows of one device's, so bf16 results are equal bit for bit iff the rounding
    draws its bits (stochastic) or keeps its compensation (Kahan) by global position."""
    from flora import FloraAdamW, FloraSGD

    rounding = kind.split("_")[1]
    if kind.startswith("sgd"):
        return FloraSGD(named_params, lr=0.5, momentum=0.9, compress=False, rounding=rounding)
    return FloraAdamW(named_params, lr=1e-2, compress=False, rounding=rounding)


def fsdp2_bf16_rounding(rank: int, world: int, tmpdir: str, steps: int, sharded: bool) -> None:
    """bf16 model and optimizers of ``ROUNDED_KINDS``; every rank trains on the whole batch
    of each step, so FSDP2's averaged gradients are exactly one device's (x + x)/2 = x.
    ``sharded=False`` (world 1): no fully_shard at all. Rank 0 saves the full parameters."""
    from torch.distributed.fsdp import fully_shard

    _init(rank, world, tmpdir)
    try:
        batches = make_batches(steps)
        for kind in ROUNDED_KINDS:
            model = make_model(dtype=torch.bfloat16)
            if sharded:
                for layer in (model.emb, model.conv, model.fc, model.head):
                    fully_shard(layer)
                fully_shard(model)
            opt = _rounded_optimizer(kind, model.named_parameters())
            for step in range(steps):
                loss_of(model, batches[step]).backward()
                opt.step()
                opt.zero_grad()
            full = {
                n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                for n, p in model.named_parameters()
            }
            if rank == 0:
                torch.save(full, Path(tmpdir) / f"rounded_{kind}_world{world}_{sharded}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    _done(rank, tmpdir)


def fsdp2_dcp(
    rank: int, world: int, tmpdir: str, phase: str, kind: str, side: str = "auto"
) -> None:
    """``save``: 3 FSDP2 steps, DCP-save model and optimizer at this world size, then 3 more
    steps. ``load``: DCP-load what the other world size saved, then the same 3 more steps.
    Rank 0 writes the full optimizer state after loading/saving and the final parameters."""

    _init(rank, world, tmpdir)
    try:
        batches = make_batches(6 * DATA_WORLD)
        model = _fsdp_model()
        opt = make_fsdp_optimizer(kind, model.named_parameters(), side=side)
        if phase == "save":
            _fsdp_train(model, opt, batches, range(3), rank, world)
            _dcp_save(model, opt, f"{tmpdir}/dcp_{world}")
        else:
            _dcp_load(model, opt, f"{tmpdir}/dcp_{DATA_WORLD // world}")
        state = _full_state(opt)
        _fsdp_train(model, opt, batches, range(3, 6), rank, world)
        full = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
        if rank == 0:
            torch.save({"state": state, "params": full}, f"{tmpdir}/{phase}_world{world}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    _done(rank, tmpdir)


def replica_mismatch(rank: int, world: int, tmpdir: str) -> None:
    """Settings that differ across ranks, each caught by the settings check: a per-rank seed
    for the accumulator, the DDP hook and the optimizer, and a per-rank accumulation rank
    (which would otherwise abort inside gloo). Saves each error message per rank."""
    from flora import Flora
    from flora.distributed import FloraCommState

    _init(rank, world, tmpdir)
    try:
        model = make_model()
        ddp = DistributedDataParallel(model)
        errors: dict[str, str] = {}
        attempts = {
            "accumulator_seed": lambda: GradientAccumulator(ddp, 2, rank=4, seed=rank),
            "accumulator_rank": lambda: GradientAccumulator(ddp, 2, rank=4 + rank),
            "comm_hook_seed": lambda: FloraCommState(ddp, rank=4, seed=rank),
        }
        for key, attempt in attempts.items():
            try:
                attempt()
                errors[key] = ""
            except ValueError as err:
                errors[key] = str(err)
        opt = Flora(model.named_parameters(), rank=4, seed=rank)
        loss_of(ddp, make_batches(1)[0]).backward()
        try:
            opt.step()
            errors["optimizer_seed"] = ""
        except ValueError as err:
            errors["optimizer_seed"] = str(err)
        same = Flora(model.named_parameters(), rank=4, seed=7)
        same.step()  # equal settings pass (and are checked only once)
        errors["moved"] = str(not torch.equal(model.fc.weight, make_model().fc.weight))
        acc = GradientAccumulator(ddp, 2, rank=4, seed=3)  # equal settings pass
        errors["accumulator_ok"] = repr(acc)
        torch.save(errors, Path(tmpdir) / f"errors_{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    _done(rank, tmpdir)


def fsdp2_from_single_device(rank: int, world: int, tmpdir: str, kind: str) -> None:
    """DCP-load a checkpoint written by a single process (``<tmpdir>/single``) into FSDP2,
    then steps 3..5; rank 0 writes the final parameters, or every rank the load error."""
    _init(rank, world, tmpdir)
    try:
        batches = make_batches(6 * DATA_WORLD)
        model = _fsdp_model()
        opt = make_fsdp_optimizer(kind, model.named_parameters())
        from torch.distributed.checkpoint.api import CheckpointException

        try:
            _dcp_load(model, opt, f"{tmpdir}/single")
        except CheckpointException as err:  # a BaseException, wrapping each rank's error
            torch.save({"error": str(err)}, f"{tmpdir}/from_single_rank{rank}.pt")
        else:
            _fsdp_train(model, opt, batches, range(3, 6), rank, world)
            full = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
            if rank == 0:
                torch.save({"params": full}, f"{tmpdir}/from_single_rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    _done(rank, tmpdir)
