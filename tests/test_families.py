"""Every MoE family through the generic experts-interface path (issue 17 items 1, 3, 4, 7).

Each family's tiny model is built from its own Transformers config class
(``hiermoe_hf.tiny_families``). On 4 gloo ranks as 2x2, with ``hd2`` or ``a2a`` (alternating over
the families), the patched model is checked against the unpatched Transformers model in one process
on the global batch (each rank's slice: logits, loss, aux loss of the first step; AdamW over the
global batch, loss averaged over the 4 slices: every parameter after 2 steps, one forced expert swap
between them), and its ``save_pretrained`` output loads in plain Transformers and equals the trained
model. float64 (the loop runs the local experts: ``grouped_mm`` has no float64 kernel; the fp32
grouped path is checked against Transformers in ``test_grouped_experts.py``): in fp32, AdamW's
per-element normalisation turns summation-order noise of near-zero gradients into 1e-4 parameter
differences (``test_ep_groups.py``), which would hide a real error; in float64 the tolerance is 1e-5
relative with ~1e-7 measured. Parameter elements whose first reference gradient is rounding noise
(``_signal``: some of DeepSeek-V4's float32 hyper-connection entries, unused embedding rows) are
left out of the parameter check: AdamW turns that noise into +-lr steps of random sign, in any two
runs that sum in different orders. Parameters a family keeps in float32 inside the float64 model
(DeepSeek-V4's hyper-connections) are checked at 1e-3: two float32 AdamW runs differ by that much
(6.7e-4 measured after 2 steps; 1.3e-4 after 3 in ``test_ep_groups.py``), their logits and loss stay
within 1e-5.

Compositions (item 4) on three unlike families (gpt-oss: biases, transposed, clamped interleaved
gate; Nemotron-H: no gate, hybrid Mamba; Mixtral): ``overlap_chunks=2``, ``ep_size=2``, FSDP2 on the
dense part (``shard_dense``), gradient checkpointing, ``stats`` (every run) and greedy ``generate``
with ranks finishing at different steps.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
import torch.distributed as dist

import hiermoe_hf
from hiermoe_hf.runtime.registry import moe_layers
from hiermoe_hf.tiny_families import (
    TOKENS,
    available,
    build_family_model,
    model_class,
    tiny_family_config,
)

PER_RANK, SEQ, STEPS, LR, RTOL = 2, 6, 2, 1e-2, 1e-5
FP32_ADAM_RTOL = 1e-3  # parameters a family keeps in float32 inside a float64 model (see the docstring)
# The families (first paragraph) and the others the generic path claims; image-text models
# are their *ForConditionalGeneration classes on text-only input (vision tower built, not patched).
FAMILIES = [
    "qwen3_moe", "deepseek_v3", "kimi_k2", "qwen3_5_moe_text", "qwen3_5_moe", "gpt_oss", "gemma4_text", "gemma4",
    "glm4_moe", "glm_moe_dsa", "glm4_moe_lite", "deepseek_v32", "deepseek_v4", "qwen3_next", "minimax_m2",
    "nemotron_h", "qwen3_vl_moe", "mixtral", "ernie4_5_moe", "qwen2_moe", "olmoe",
]
STRATEGIES = ("hd2", "a2a")
COMPOSED = ["gpt_oss", "nemotron_h", "mixtral"]
VARIANTS = {"overlap": dict(topology="2x2", overlap_chunks=2), "ep2": dict(topology="1x2", ep_size=2),
            "checkpointing": dict(topology="2x2"), "fsdp2": dict(topology="2x2")}


def _config(family: str):
    """Kimi K2 ships DeepSeek-V3's architecture under its own model_type: a DeepseekV3Config renamed."""
    if family == "kimi_k2":
        config = tiny_family_config("deepseek_v3")
        config.model_type = "kimi_k2"
        return config
    return tiny_family_config(family)


def _skip_missing(family: str) -> None:
    if not available("deepseek_v3" if family == "kimi_k2" else family):
        import transformers

        pytest.skip(f"Transformers {transformers.__version__} has no {family}")


def _batch(step: int, world: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(300 + step)
    return torch.randint(*TOKENS, (world * PER_RANK, SEQ), generator=g)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def _signal(grad: torch.Tensor) -> torch.Tensor:
    """Elements of a gradient above its own rounding noise: |g| > 1e-5 max|g| and > 1e-13 (a module
    kept in float32 inside a float64 model, DeepSeek-V4's hyper-connections, has ~1e-7 relative noise)."""
    return grad.abs() > max(1e-5 * float(grad.abs().max()), 1e-13)


def _model(family: str):
    model = build_family_model(_config(family), seed=5, dtype=torch.float64).train()
    model.set_experts_implementation("eager")  # Transformers' own experts: no float64 grouped_mm
    return model


@functools.cache
def _reference(family: str, world: int):
    """Unpatched, one process: per-slice (logits, loss, aux) of step 0; parameters after STEPS AdamW steps."""
    model = _model(family)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    first, signal = [], {}
    for step in range(STEPS):
        total = 0.0
        for s in _batch(step, world).split(PER_RANK):
            out = model(input_ids=s, labels=s)
            if step == 0:
                aux = getattr(out, "aux_loss", None)
                first.append((out.logits.detach(), out.loss.detach(), None if aux is None else aux.detach()))
            (out.loss / world).backward()
            total += float(out.loss)
        if step == 0:  # AdamW turns a gradient of pure rounding noise into +-lr steps of random sign
            signal = {n: torch.ones_like(p, dtype=torch.bool) if p.grad is None else _signal(p.grad)
                      for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
    return first, {n: p.detach().clone() for n, p in model.named_parameters()}, signal


def family_job(family: str, strategy: str, variant: str | None, save_dir: str | None, reference=None) -> dict:
    """STEPS AdamW steps of the patched model on this rank's slice with a forced swap after the first;
    errors against ``_reference`` (``reference``: computed once by the test process, else here);
    optionally saves and (rank 0) reloads in plain Transformers."""
    from hiermoe_hf.swap.executor import execute_swaps

    W, r = dist.get_world_size(), dist.get_rank()
    first, ref_params, signal = reference or _reference(family, W)
    model = _model(family)
    if variant == "checkpointing":  # non-reentrant recompute: each MoE forward runs again in backward
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    extra = VARIANTS[variant] if variant else dict(topology="2x2")
    hiermoe_hf.patch(model, hiermoe_hf.HierMoEConfig(dispatch=strategy, **extra))
    if variant == "fsdp2":  # the dense part (biases and norms of the experts modules included) sharded
        hiermoe_hf.shard_dense(model)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    names = list(moe_layers(model))
    E = moe_layers(model)[names[0]][1].placement.num_experts
    err = {"layers": len(names)}
    for step in range(STEPS):
        x = _batch(step, W).split(PER_RANK)[r]
        out = model(input_ids=x, labels=x)
        if step == 0:
            logits, loss, aux = first[r]
            err["logits"], err["loss"] = _rel(out.logits, logits), _rel(out.loss, loss)
            got_aux = getattr(out, "aux_loss", None)
            assert (got_aux is None) == (aux is None), "aux loss present in one model only"
            err["aux"] = 0.0 if aux is None else _rel(got_aux, aux)
        out.loss.backward()
        if step == 0:  # stats: one entry per patched block, this rank's tokens, every selection counted
            st = hiermoe_hf.stats(model)
            err["stats"] = sorted(st) == sorted(names) and all(
                v["tokens"] == x.numel() and int(sum(v["load_per_rank"])) == x.numel() * out_k(model)
                for v in st.values()
            )
        hiermoe_hf.all_reduce_gradients(model)
        opt.step()
        if step == 0:
            execute_swaps(model, [(names[0], 0, E - 1), (names[-1], 1, E // 2)], opt)  # across nodes and ranks
        opt.zero_grad()
    saved = {}
    for layout in ("hub", "fused") if save_dir is not None else ():
        try:  # every rank raises alike (before any collective) for a layout item 5 has not made writable
            model.save_pretrained(os.path.join(save_dir, layout), save_original_format=layout == "hub")
            saved[layout] = None
        except ValueError as e:
            saved[layout] = f"save: {e}"
    trained = _gather_full(model) if variant == "fsdp2" else dict(hiermoe_hf.unpatch(model).named_parameters())
    for key, dtype in (("params", torch.float64), ("params_fp32", torch.float32)):
        err[key], err[f"worst_{key}"] = max(
            ((_rel(p[signal[n]], ref_params[n][signal[n]]), n) for n, p in trained.items()
             if signal[n].any() and p.dtype == dtype), default=(0.0, None),
        )
    err["noise_elements"] = sum(int((~m).sum()) for m in signal.values())
    if save_dir is not None and r == 0:
        for layout, failed in saved.items():
            if failed:
                err[f"load_{layout}"] = failed
                continue
            try:
                folder = os.path.join(save_dir, layout)
                loaded = model_class(model.config).from_pretrained(folder, dtype=torch.float64)
                got = dict(loaded.named_parameters())
                same_keys = got.keys() == trained.keys()
                err[f"load_{layout}"] = max(_rel(got[n], p) for n, p in trained.items()) if same_keys else 1.0
            except Exception as e:  # noqa: BLE001  (reported with the family's name by the assertion)
                err[f"load_{layout}"] = f"{type(e).__name__}: {str(e)[:300]}"
    dist.barrier()
    return err


def out_k(model) -> int:
    """Top-k of the model's routing (the tiny configs all use tiny_families.K)."""
    from hiermoe_hf.tiny_families import K

    return K


def generate_job(family: str) -> list:
    """Greedy generate of the patched model (eval) on this rank's slice: (patched, unpatched) tokens."""
    W, r = dist.get_world_size(), dist.get_rank()
    x = _batch(0, W).split(PER_RANK)[r][:, :4]
    ref = _model(family).eval()
    ref.config.output_router_logits = False  # Transformers 5.17's aux loss breaks generate with a cache
    want = ref.generate(x, max_new_tokens=3 + r, do_sample=False)  # ranks finish at different steps
    model = _model(family).eval()
    model.config.output_router_logits = False
    hiermoe_hf.patch(model, hiermoe_hf.HierMoEConfig(topology="2x2", dispatch="hd2"))
    got = model.generate(x, max_new_tokens=3 + r, do_sample=False)
    return [got.tolist(), want.tolist()]


def _gather_full(model) -> dict:
    """Every parameter of a patched, FSDP2-sharded model in full (ep_size = world): dense DTensors
    gathered, experts all-gathered and put in logical order."""
    from torch.distributed.tensor import DTensor

    params = model.named_parameters()
    full = {n: p.detach().full_tensor() if isinstance(p, DTensor) else p.detach() for n, p in params}
    for experts, layer in moe_layers(model).values():
        for pname in layer.param_names:
            local = getattr(experts, pname).detach()
            parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, local.contiguous())
            key = next(n for n, p in model.named_parameters() if p is getattr(experts, pname))
            full[key] = torch.cat(parts)[layer.placement.phys_of_E]
    return full


def _check(results: list[dict], where: str) -> None:
    for r, err in enumerate(results):
        assert err["stats"], f"stats do not describe the last forward: rank {r}, {where}"
        for key in ("logits", "loss", "aux", "params"):
            assert err[key] <= RTOL, (key, f"rank {r}, {where}: {err}")
        assert err["params_fp32"] <= FP32_ADAM_RTOL, ("params_fp32", f"rank {r}, {where}: {err}")


# Families whose Hub key layout ``save_pretrained`` (save_original_format=True) does not write yet:
# per-expert key layouts other than Qwen's gate_proj/up_proj/down_proj are issue 17 item 5 (branch
# issue17-ckpt). Filled from what this module measured; the fused layout loads for every family.
@pytest.mark.parametrize("family", FAMILIES)
def test_family_equals_transformers_on_the_global_batch(ranks, family, tmp_path):
    _skip_missing(family)
    # The exchange does not depend on the family: every other family runs a2a, the rest hd2 (the
    # strategies' algebra on every topology is test_dispatcher.py's; both meet unlike families here).
    strategy = STRATEGIES[FAMILIES.index(family) % 2]
    # the one-process reference in the test process: once, not on each of the 4 ranks sharing the cores
    res = ranks(4).run(family_job, family, strategy, None, str(tmp_path), _reference(family, 4))
    _check(res, f"{family} {strategy}")
    assert res[0]["layers"] >= 1
    assert res[0]["load_fused"] == pytest.approx(0.0, abs=RTOL), res[0]["load_fused"]
    assert res[0]["load_hub"] == pytest.approx(0.0, abs=RTOL), res[0]["load_hub"]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("family", COMPOSED)
def test_compositions(ranks, family, variant):
    _skip_missing(family)
    _check(ranks(4).run(family_job, family, "auto", variant, None, _reference(family, 4)), f"{family} {variant}")


@pytest.mark.parametrize("family", COMPOSED)
def test_generate(ranks, family):
    _skip_missing(family)
    for r, (got, want) in enumerate(ranks(4).run(generate_job, family)):
        assert got == want, f"rank {r}: {got} != {want}"
