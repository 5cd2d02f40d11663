"""Single-process parts of scalelm.distributed: layout checks, the seam in one process."""

import pytest
import torch

from scalelm.config import Config, ConfigError, ModelConfig, ParallelConfig
from scalelm.distributed import (
    Layout,
    LayoutError,
    clip_grad_norm,
    grad_sync,
    init_parallel,
    parallelize,
    resolve_layout,
    unwrap_model,
)
from scalelm.model import GPT


def tiny_cfg(**model) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(**{**dict(vocab_size=64, block_size=16, n_layer=4, n_head=4, n_embd=32), **model})
    cfg.train.device = "cpu"
    return cfg


def test_layout_fills_dp_shard_with_the_rest():
    mc = ModelConfig(n_layer=4, n_head=4, n_embd=32)
    assert resolve_layout(ParallelConfig(), mc, 8) == Layout(pp=1, dp_replicate=1, dp_shard=8, tp=1)
    assert resolve_layout(ParallelConfig(tp=2, pp=2), mc, 8) == Layout(pp=2, dp_replicate=1, dp_shard=2, tp=2)
    assert resolve_layout(ParallelConfig(dp_replicate=2, dp_shard=1), mc, 2).dp == 2
    assert resolve_layout(ParallelConfig(), mc, 1) == Layout()


@pytest.mark.parametrize("pc, model, world, needle", [
    (dict(tp=2, dp_shard=2), {}, 2, "needs 4 processes but the world size is 2"),
    (dict(tp=3), {}, 6, "n_head=4 is not divisible by tp=3"),
    (dict(tp=4), dict(n_kv_head=2), 4, "n_kv_head=2 is not divisible by tp=4"),
    (dict(pp=3), dict(n_layer=4), 3, "n_layer=4 is not divisible by 3"),
    (dict(pp=2, pp_schedule="interleaved_1f1b"), dict(n_layer=6), 2, "2 interleaved chunks"),
    (dict(tp=3), dict(n_head=6, n_embd=48), 4, "not divisible by dp_replicate x tp x pp"),
    (dict(sequence_parallel=True), {}, 2, "needs --parallel.tp > 1"),
    (dict(tp=2, sequence_parallel=True), dict(block_size=15), 2, "block_size=15"),
    (dict(pp=2), dict(n_shared_blocks=2), 2, "cannot be split into pipeline stages"),
    (dict(), dict(n_shared_blocks=2), 2, "FSDP2 sharding does not support"),
    (dict(dp_shard=0), {}, 2, "dp_shard must be >= 1"),
])
def test_bad_layouts_are_rejected_with_the_reason(pc, model, world, needle):
    mc = ModelConfig(**{**dict(n_layer=4, n_head=4, n_embd=32), **model})
    with pytest.raises(LayoutError) as e:
        resolve_layout(ParallelConfig(**pc), mc, world)
    assert needle in str(e.value)
    assert isinstance(e.value, ConfigError)  # the CLI prints it and exits 2


def test_single_process_context_has_no_process_group(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    ctx = init_parallel(tiny_cfg())
    assert (ctx.world_size, ctx.dp_world, ctx.dp_rank, ctx.pp, ctx.is_main) == (1, 1, 0, 1, True)
    assert ctx.mesh is None and not ctx.distributed and ctx.device == torch.device("cpu")
    assert not torch.distributed.is_initialized()


def test_single_process_rejects_a_multi_process_layout(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = tiny_cfg()
    cfg.parallel.tp = 2
    with pytest.raises(LayoutError, match="world size 1 is not divisible.*torchrun --nproc_per_node=2"):
        init_parallel(cfg)


def _train(model, batches, steps=3, accum=2):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ctx = init_parallel(tiny_cfg())
    losses = []
    for s in range(steps):
        for m in range(accum):
            x = batches[(s * accum + m) % len(batches)]
            with grad_sync(model, enabled=m == accum - 1):
                loss = model(x, x.roll(-1, 1))[1] / accum
                loss.backward()
        clip_grad_norm(model, 0.5, ctx)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_activation_checkpointing_keeps_names_and_numbers():
    cfg = tiny_cfg(dropout=0.0)
    cfg.train.activation_checkpointing = True
    torch.manual_seed(0)
    ref = GPT(cfg.model).double()
    ac = GPT(cfg.model).double()
    ac.load_state_dict(ref.state_dict())
    ctx = init_parallel(cfg)
    ac = parallelize(ac, cfg, ctx)
    assert unwrap_model(ac) is ac
    assert list(ac.state_dict()) == list(ref.state_dict())  # the wrapper hides its prefix
    batches = [torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    assert _train(ac, batches) == pytest.approx(_train(ref, batches), abs=1e-12)
    for (n, a), b in zip(ac.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0, msg=n)


def test_cli_refuses_a_layout_that_does_not_fit_before_any_work(tmp_path):
    from conftest import run_cli
    from test_data_loader import make_data_dir

    data = make_data_dir(tmp_path / "data")
    p = run_cli("train", "--data", data, "--out", tmp_path / "run", "--model.n_layer=2", "--model.n_head=2",
                "--model.n_embd=16", "--model.block_size=8", "--parallel.tp=2", check=False)
    assert p.returncode == 2 and "torchrun --nproc_per_node=2" in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
