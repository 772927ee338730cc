"""--sync_bn on the CPU: GlooSyncBatchNorm over 2 real gloo processes equals one BatchNorm over their whole batch."""

import multiprocessing as mp

import torch

from rectrain.training.sync_bn import GlooSyncBatchNorm, convert

SPLIT = (5, 3)  # images per rank: unequal, so the statistics must weigh each rank by its count


def _batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sum(SPLIT), 3, 5, 4, generator=g) * 2 + 1
    return x, torch.randn(x.shape, generator=g), torch.randn(3, generator=g), torch.randn(3, generator=g)


def _bn(weight, bias, momentum):
    bn = torch.nn.BatchNorm2d(3, momentum=momentum)
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    return bn


def _two_steps(bn, x, g):
    """Two training passes (running statistics updated twice); the outputs and gradients of the second."""
    bn(x * 0.5)
    x = x.clone().requires_grad_()
    bn.weight.grad = bn.bias.grad = None
    y = bn(x)
    (y * g).sum().backward()
    return {"y": y.detach(), "dx": x.grad, "dw": bn.weight.grad, "db": bn.bias.grad, "mean": bn.running_mean,
            "var": bn.running_var, "n": bn.num_batches_tracked}


def _rank(rank, init, momentum, queue):
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        x, g, weight, bias = _batch()
        mine = slice(0, SPLIT[0]) if rank == 0 else slice(SPLIT[0], None)
        model = torch.nn.Sequential(_bn(weight, bias, momentum))
        convert(model, torch.device("cpu"))
        assert isinstance(model[0], GlooSyncBatchNorm)
        out = _two_steps(model[0], x[mine], g[mine])
        model.eval()
        out["eval"] = model(x[mine]).detach()  # eval: the running statistics, nothing synchronised
        queue.put((rank, {k: v.numpy() for k, v in out.items()}))  # by value: the process exits before the read
    finally:
        torch.distributed.destroy_process_group()


def _run_ranks(tmp_path, momentum):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [ctx.Process(target=_rank, args=(r, init, momentum, queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = {rank: {k: torch.from_numpy(v) for k, v in out.items()} for rank, out in (queue.get(timeout=120)
                                                                                     for _ in procs)}
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    return got[0], got[1]


def _check(tmp_path, momentum):
    x, g, weight, bias = _batch()
    ref_bn = _bn(weight, bias, momentum)
    ref = _two_steps(ref_bn, x, g)
    ref_bn.eval()
    ref["eval"] = ref_bn(x).detach()
    r0, r1 = _run_ranks(tmp_path, momentum)
    close = dict(rtol=1e-5, atol=1e-5)
    for key in ("y", "dx", "eval"):
        torch.testing.assert_close(torch.cat([r0[key], r1[key]]), ref[key], **close)
    for key in ("dw", "db"):  # each rank's share of the parameter gradient; DDP sums (then averages) them
        torch.testing.assert_close(r0[key] + r1[key], ref[key], **close)
    for key in ("mean", "var", "n"):  # every rank holds the global batch's running statistics
        torch.testing.assert_close(r0[key], ref[key], **close)
        torch.testing.assert_close(r1[key], ref[key], **close)


def test_two_gloo_processes_normalise_train_and_track_statistics_as_one_batchnorm_over_their_whole_batch(tmp_path):
    _check(tmp_path, momentum=0.1)


def test_a_cumulative_average_momentum_none_also_matches(tmp_path):
    _check(tmp_path, momentum=None)


def test_without_a_process_group_it_is_plain_batchnorm():
    x, g, weight, bias = _batch()
    model = torch.nn.Sequential(_bn(weight, bias, 0.1))
    convert(model, torch.device("cpu"))
    ref = _two_steps(_bn(weight, bias, 0.1), x, g)
    for key, value in _two_steps(model[0], x, g).items():
        torch.testing.assert_close(value, ref[key])
