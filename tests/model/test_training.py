"""Training integrations: Trainer with gradient accumulation, PEFT LoRA with the default targets."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Trainer, default_data_collator

import hf_glu
from hf_glu import GluForCausalLM

from helpers import one_sgd_step_args, ragged_rows, tiny_config


def _train_one_step(tmp_path, model, data, batch, accumulation):
    args = one_sgd_step_args(tmp_path / f"b{batch}a{accumulation}", batch, accumulation)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses[0]


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    data = ragged_rows()
    config = tiny_config(glu_variant="swiglu")
    base = GluForCausalLM(config)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    batch = default_data_collator(data)
    with torch.no_grad():
        full_batch_loss = base(**batch).loss.item()

    full = GluForCausalLM(config)
    full.load_state_dict(state)
    accumulated = GluForCausalLM(config)
    accumulated.load_state_dict(state)
    loss_full = _train_one_step(tmp_path, full, data, batch=4, accumulation=1)
    loss_accumulated = _train_one_step(tmp_path, accumulated, data, batch=2, accumulation=2)

    assert loss_full == pytest.approx(full_batch_loss, rel=1e-4)
    assert loss_accumulated == pytest.approx(full_batch_loss, rel=1e-4)
    for (name, a), b in zip(full.named_parameters(), accumulated.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    assert not torch.equal(full.transformer.h[0].mlp.up_proj.weight, state["transformer.h.0.mlp.up_proj.weight"])


def test_lora_with_default_targets_trains_saves_reloads_and_merges(tmp_path):
    base = GluForCausalLM(tiny_config(glu_variant="geglu"))
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM"))
    targeted = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if hasattr(m, "lora_A")}
    assert targeted == set(hf_glu.LORA_TARGET_MODULES)
    adapted = [n for n, m in model.named_modules() if hasattr(m, "lora_A")]
    assert len(adapted) == model.config.n_layer * len(hf_glu.LORA_TARGET_MODULES)

    ids = torch.randint(1, 101, (4, 16))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(30):
        loss = model(input_ids=ids, labels=ids).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    # Frozen embeddings with GPT-2's small init cap how fast LoRA alone can move the logits.
    assert losses[-1] < losses[0] - 0.3

    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    reloaded = PeftModel.from_pretrained(GluForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained, rtol=0, atol=1e-6)
        merged = reloaded.merge_and_unload()
        assert type(merged) is GluForCausalLM
        torch.testing.assert_close(merged(input_ids=ids).logits, trained, rtol=0, atol=1e-5)
