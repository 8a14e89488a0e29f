"""Dispatch: routing, layout validation, and CPU layouts giving the same statistics as the GPU one."""

import pytest
import torch
from vllm_kvevict.kernels import dispatch, reference
from vllm_kvevict.kernels.paged import CPU, CPU_T, PagedKV


def to_cpu_layout(kv: PagedKV, layout: str) -> PagedKV:
    """The same blocks stored the way vLLM's CPU backend does ([nb, Hkv, 2*bs, D], keys maybe transposed)."""
    nb, bs, hkv, d = kv.key.shape
    raw = torch.zeros(nb, hkv, 2 * bs, d, dtype=kv.key.dtype)
    keys = kv.key.cpu().permute(0, 2, 1, 3)  # [nb, Hkv, bs, D]
    raw[:, :, :bs] = keys if layout == CPU else keys.transpose(2, 3).reshape(nb, hkv, bs, d)
    raw[:, :, bs:] = kv.value.cpu().permute(0, 2, 1, 3)
    return PagedKV.from_cpu(raw, layout)


@pytest.mark.parametrize("layout", [CPU, CPU_T])
def test_cpu_layouts_give_the_gpu_layout_statistics(paged_case, layout):
    case = paged_case(16, 2, 3, 32, [37, 5, 16])
    case = type(case)(**{k: (v.cpu() if torch.is_tensor(v) else v) for k, v in vars(case).items()})
    gpu = PagedKV(case.key_cache, case.value_cache)
    cpu = to_cpu_layout(gpu, layout)
    args = (case.block_table, case.seq_lens)
    same = lambda a, b: torch.testing.assert_close(a, b, atol=0, rtol=0, equal_nan=True)  # noqa: E731
    for r, n in enumerate(case.seq_lens.tolist()):  # what the hooks' decode statistic reads
        for x, y in zip(gpu.gather(case.block_table[r], n), cpu.gather(case.block_table[r], n)):
            same(x, y)
    qw = torch.randn(3, 6, 4, 32, generator=case.gen)
    for x, y in zip(dispatch.window_attention(qw, gpu, *args), dispatch.window_attention(qw, cpu, *args)):
        same(x, y)
    for x, y in zip(dispatch.key_bounds(gpu, *args), dispatch.key_bounds(cpu, *args)):
        same(x, y)
    gram = reference.wo_gram(torch.randn(40, 6 * 32, generator=case.gen), 6)
    same(dispatch.value_proj_norm(gram, gpu, *args), dispatch.value_proj_norm(gram, cpu, *args))


def test_auto_picks_torch_without_cuda_tensors(paged_case):
    case = paged_case(16, 2, 1, 32, [5])
    on_cpu = torch.zeros(1)
    assert dispatch.pick_backend("auto", on_cpu) == "torch"
    assert dispatch.pick_backend("triton", on_cpu) == "triton"
    with pytest.raises(ValueError, match="backend must be"):
        dispatch.pick_backend("cuda", on_cpu)
    if not torch.cuda.is_available():
        assert dispatch.pick_backend("auto", case.query) == "torch"


def test_triton_path_refuses_what_it_cannot_read(paged_case):
    case = paged_case(16, 2, 3, 32, [20, 7])
    gpu = PagedKV(case.key_cache, case.value_cache)
    args = (case.block_table, case.seq_lens)
    cpu = to_cpu_layout(PagedKV(case.key_cache.cpu(), case.value_cache.cpu()), CPU_T)
    with pytest.raises(ValueError, match="CPU backend's.*use backend='torch'"):
        dispatch.key_bounds(cpu, case.block_table.cpu(), case.seq_lens.cpu(), backend="triton")
    with pytest.raises(ValueError, match="int32"):
        dispatch.key_bounds(gpu, case.block_table.long(), case.seq_lens, backend="triton")
    small = PagedKV(case.key_cache.view(-1, 8, 2, 32), case.value_cache.view(-1, 8, 2, 32))
    with pytest.raises(ValueError, match="block_size 8"):
        dispatch.window_attention(case.query[:, :, None], small, *args, backend="triton")
    # the CPU backend's whole [nb, Hkv, 2*bs, D] tensor handed over as if it were a GPU cache
    whole = torch.zeros(4, 2, 32, 32)
    with pytest.raises(ValueError, match="is the cache in the layout it claims"):
        dispatch.window_attention(case.query.cpu()[:, :, None], PagedKV(whole, whole),
                                  case.block_table.cpu(), case.seq_lens.cpu(), backend="torch")


@pytest.mark.usefixtures("needs_triton")
def test_forced_triton_equals_torch(paged_case, dtype, tol):
    """Each entry point routes to its kernel and agrees with the reference path."""
    case = paged_case(32, 2, 3, 32, [45, 3], dtype=dtype)
    kv = PagedKV(case.key_cache, case.value_cache)
    args = (case.block_table, case.seq_lens)
    close = tol.close
    qw = case.query[:, :, None].repeat(1, 1, 4, 1)
    got = dispatch.window_attention(qw, kv, *args, probs=False, backend="triton")
    want = dispatch.window_attention(qw, kv, *args, probs=False, backend="torch")
    assert got.probs is None and want.probs is None
    close(got.block_sum, want.block_sum)
    bounds = dispatch.key_bounds(kv, *args, backend="triton")
    for x, y in zip(bounds, dispatch.key_bounds(kv, *args, backend="torch")):
        assert torch.equal(x, y)
    ids, counts = case.block_table[0, :2], torch.tensor([32, 13], dtype=torch.int32, device=kv.key.device)
    for x, y in zip(dispatch.block_key_bounds(kv, ids, counts, backend="triton"),
                    dispatch.block_key_bounds(kv, ids, counts, backend="torch")):
        assert torch.equal(x, y)
    nb = (case.seq_lens + 31) // 32
    close(dispatch.quest_scores(case.query, *bounds, nb, backend="triton"),
          dispatch.quest_scores(case.query, *bounds, nb, backend="torch"))
    gram = reference.wo_gram(torch.randn(40, 6 * 32, generator=case.gen).to(kv.key.device), 6)
    close(dispatch.value_proj_norm(gram, kv, *args, backend="triton"),
          dispatch.value_proj_norm(gram, kv, *args, backend="torch"))
