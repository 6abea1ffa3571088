"""Conversion fidelity on a trained model: a tiny GPT-2 pretrained briefly on the built-in corpus, then
converted with every variant's ``preserve`` scheme; reports max |Δlogit| and the perplexity ratio on
held-out text, before any fine-tuning.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/conversion_fidelity.py [--steps 300] [--out FILE]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hf_glu import VARIANTS, convert_checkpoint
from hf_glu.bad_input import OneLineParser
from hf_glu.data import builtin_corpus, split_train_eval, train_bpe_tokenizer
from hf_glu.jsonio import strict_json, write_json


def pretrain(steps: int, train_text: str, tokenizer) -> GPT2LMHeadModel:
    ids = tokenizer(train_text, return_tensors="pt").input_ids[0]
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=128, n_embd=128, n_layer=4, n_head=4, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(ids) - 129, (16,), generator=generator)
        batch = torch.stack([ids[s : s + 128] for s in starts])
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.3f}", flush=True)
    return model.eval()


def main() -> None:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default=str(Path(__file__).with_name("conversion_fidelity.json")))
    args = parser.parse_args()
    torch.manual_seed(0)
    train_text, eval_text = split_train_eval(builtin_corpus(400_000), 0.1)
    tokenizer = train_bpe_tokenizer(train_text, vocab_size=2048)
    start = time.perf_counter()
    model = pretrain(args.steps, train_text, tokenizer)
    results = {"steps": args.steps, "pretrain_seconds": round(time.perf_counter() - start, 1), "variants": {}}
    for variant in sorted(VARIANTS):
        report = convert_checkpoint(model, variant, tokenizer=tokenizer, eval_text=eval_text, eval_tokens=4096)
        report = report.conversion_report
        results["variants"][variant] = {
            "max_abs_logit_diff": report["max_abs_logit_diff"],
            "perplexity_source": report["perplexity"]["source"],
            "perplexity_converted": report["perplexity"]["converted"],
            "perplexity_ratio": report["perplexity"]["ratio"],
            "max_unit_bound": max(layer["unit_map"]["bound"] for layer in report["layers"]),
        }
        print(variant, strict_json(results["variants"][variant], indent=None), flush=True)
    write_json(args.out, results)


if __name__ == "__main__":
    main()
