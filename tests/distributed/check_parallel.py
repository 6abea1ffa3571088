"""Run by tests/distributed/test_parallel_model.py under `torchrun --nproc_per_node 2` (CPU, gloo): loads the prepared
checkpoints with Transformers' tensor parallelism (mode `tp`) or FSDP2 (mode `fsdp`) and writes what each rank
saw to <mode>-rank<N>.json."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule
from transformers import AutoModelForCausalLM, DistributedConfig

import hf_glu  # noqa: F401  (registers the GLU classes)


def local_bytes(model: torch.nn.Module) -> int:
    """Parameter bytes this rank holds (a sharded parameter counts its local shard only)."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def tensor_parallel(root: Path, ids: torch.Tensor) -> dict:
    report = {}
    for name, folder, kernel in (("glu_eager", "glu", "eager"), ("glu_triton", "glu", "triton"),
                                 ("neox_eager", "neox", "eager")):  # fmt: skip
        model = AutoModelForCausalLM.from_pretrained(
            root / folder, distributed_config=DistributedConfig(tp_size=2), glu_kernel=kernel,
            attn_implementation="eager",
        )  # fmt: skip
        model.eval()
        with torch.no_grad():
            logits = model(ids).logits
        expected = torch.load(root / folder / "logits.pt")
        entry = {"max_abs_diff": (logits - expected).abs().max().item(), "param_bytes": local_bytes(model)}
        if kernel == "triton":  # torch.compile of the sharded model, fused elementwise part included
            with torch.no_grad():
                compiled = torch.compile(model, backend="aot_eager")(ids).logits
            entry["compiled_max_abs_diff"] = (compiled - expected).abs().max().item()
        if folder == "glu":
            entry["gate_weight_is_dtensor"] = hasattr(model.transformer.h[0].mlp.gate_proj.weight, "to_local")
            model.train()
            model(ids, labels=ids).loss.backward()
            grad = full(model.transformer.h[0].mlp.gate_proj.weight.grad)
            entry["grad_max_abs_diff"] = (grad - torch.load(root / "glu" / "gate_grad.pt")).abs().max().item()
        report[f"tp_{name}"] = entry
    return report


def fully_sharded(root: Path, ids: torch.Tensor) -> dict:
    model = AutoModelForCausalLM.from_pretrained(
        root / "glu", distributed_config=DistributedConfig(fsdp_size=2), attn_implementation="eager"
    )
    units = [n for n, m in model.named_modules() if isinstance(m, FSDPModule)]
    # The optimizer first: a forward leaves the "keep_full_weight" units unsharded, and parameters() would then
    # hand it the unsharded copies, which the next reshard discards (FSDP2's rule, not ours).
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.eval()
    with torch.no_grad():
        logits = model(ids).logits
    expected = torch.load(root / "glu" / "logits.pt")
    fsdp = {"units": units, "max_abs_diff": (logits - expected).abs().max().item(), "param_bytes": local_bytes(model)}
    model.save_pretrained(root / "glu_fsdp_saved")  # Transformers' own save of a sharded model: every rank calls it
    model.train()
    losses = []
    for _ in range(3):  # every rank takes the same batch: the averaged gradient is the single-process one
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    fsdp["losses"] = losses
    fsdp.update(resume_from_sharded_checkpoint(root, ids))
    fsdp_fused = fused_under_fsdp(root, ids)
    neox = AutoModelForCausalLM.from_pretrained(
        root / "neox", distributed_config=DistributedConfig(fsdp_size=2), attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        logits = neox(ids).logits
    neox.save_pretrained(root / "neox_fsdp_saved")
    return {
        "fsdp_fused": fsdp_fused,
        "fsdp_tied": {name: tied_head_training(root / name, ids) for name in ("glu_tied", "gpt_neo_tied")},
        "fsdp": fsdp,
        "fsdp_neox": {
            "units": [n for n, m in neox.named_modules() if isinstance(m, FSDPModule)],
            "max_abs_diff": (logits - torch.load(root / "neox" / "logits.pt")).abs().max().item(),
        },
    }


def fused_under_fsdp(root: Path, ids: torch.Tensor) -> dict:
    """The fused kernels (Triton interpreter) inside FSDP2 units: FSDP2 hands each unit's forward unsharded plain
    weights, so the whole-MLP op runs there; the same logits and two SGD steps' losses as one process."""
    model = AutoModelForCausalLM.from_pretrained(
        root / "glu", distributed_config=DistributedConfig(fsdp_size=2), attn_implementation="eager",
        glu_kernel="triton",
    )  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.eval()
    with torch.no_grad():
        logits = model(ids).logits
    model.train()
    losses = [_step(model, optimizer, ids) for _ in range(2)]
    return {"max_abs_diff": (logits - torch.load(root / "glu" / "logits.pt")).abs().max().item(), "losses": losses}


def tied_head_training(folder: Path, ids: torch.Tensor) -> dict:
    """Three AdamW steps of a model whose head is tied to its embedding, with a vocabulary that does not split
    evenly over the two ranks (the case where an untied-then-tied shard went stale)."""
    model = AutoModelForCausalLM.from_pretrained(
        folder, distributed_config=DistributedConfig(fsdp_size=2), attn_implementation="eager"
    ).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    losses = [_step(model, optimizer, ids) for _ in range(3)]
    head, embedding = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    return {"losses": losses, "tied": head is embedding}


def _fsdp_model_and_optimizer(root: Path):
    model = AutoModelForCausalLM.from_pretrained(
        root / "glu", distributed_config=DistributedConfig(fsdp_size=2), attn_implementation="eager"
    ).train()
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def _step(model, optimizer, ids) -> float:
    loss = model(ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def resume_from_sharded_checkpoint(root: Path, ids: torch.Tensor) -> dict:
    """Two steps, a sharded checkpoint (torch.distributed.checkpoint: each rank writes its shards), a third
    step; then a fresh model and optimizer resume from the checkpoint and take the third step again. The
    final weights are gathered into a normal `save_pretrained` folder that one process loads."""
    model, optimizer = _fsdp_model_and_optimizer(root)
    _step(model, optimizer, ids)
    _step(model, optimizer, ids)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(root / "step2"))
    third = _step(model, optimizer, ids)

    resumed, resumed_optimizer = _fsdp_model_and_optimizer(root)
    model_state, optimizer_state = get_state_dict(resumed, resumed_optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(root / "step2"))
    set_state_dict(resumed, resumed_optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    resumed_third = _step(resumed, resumed_optimizer, ids)

    # Every rank takes part in gathering the full weights; rank 0 alone writes them as a from_pretrained folder
    # (config + safetensors), without touching the sharded model, whose methods may start collectives.
    full = get_model_state_dict(resumed, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        resumed.config.save_pretrained(root / "final")
        save_file({k: v.contiguous() for k, v in full.items()}, root / "final" / "model.safetensors",
                  metadata={"format": "pt"})  # fmt: skip
    resumed.eval()
    with torch.no_grad():
        logits = resumed(ids).logits
    torch.save(logits, root / f"final-logits-rank{dist.get_rank()}.pt")
    dist.barrier()
    return {"third_loss": third, "resumed_third_loss": resumed_third}


def main() -> None:
    """One mode per process group: a model sharded one way must not meet the device mesh of another."""
    root, mode = Path(sys.argv[1]), sys.argv[2]
    ids = torch.load(root / "ids.pt")
    report = tensor_parallel(root, ids) if mode == "tp" else fully_sharded(root, ids)
    (root / f"{mode}-rank{dist.get_rank()}.json").write_text(json.dumps(report))
    dist.barrier()


if __name__ == "__main__":
    main()
