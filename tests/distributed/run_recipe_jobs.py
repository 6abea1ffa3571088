"""Run by tests/distributed/test_parallel_recipes.py: several runs of recipes/finetune_accelerate.py in one process, so
one launch (python, or `torchrun --nproc_per_node 2` for the sharded runs) pays the start-up cost once.

    run_recipe_jobs.py JOBS.json

JOBS.json holds {"ids": path of token ids, "jobs": [{"argv": [...], "tag": name, "remove": [folders],
"record_blocks": bool}, ...]}; rank 0 deletes a job's "remove" folders (e.g. a later checkpoint, to resume from an
earlier one) first; with "record_blocks" every rank of a sharded run writes the blocks it trained on to
OUTPUT/blocks-<tag>-rank<R>.json. After each run rank 0
renames OUTPUT/results.json to OUTPUT/results-<tag>.json; a sharded run also leaves the logits of the trained,
still sharded model on the ids in OUTPUT/sharded-logits-<tag>.pt, for comparison with final/."""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.state import AcceleratorState

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "finetune_accelerate.py"


def load_recipe():
    spec = importlib.util.spec_from_file_location("finetune_accelerate", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def record_sharded_logits(recipe, ids: torch.Tensor, tag: str) -> None:
    """Wrap the recipe's final save: in a sharded run every rank runs the model on ``ids`` first (a collective
    forward)."""
    original = recipe.finish

    def finish(job, model, tokenizer, args, results):
        if isinstance(job, recipe.ShardedAtLoad):
            model.eval()
            with torch.no_grad():
                logits = model(ids).logits
            if dist.get_rank() == 0:
                torch.save(logits, Path(args.output_dir) / f"sharded-logits-{tag}.pt")
        original(job, model, tokenizer, args, results)

    recipe.finish = finish


def record_training_blocks(recipe, output_dir: Path, tag: str) -> None:
    """Wrap the recipe's loss: every process writes the token blocks it trained on to
    OUTPUT/blocks-<tag>-rank<R>.json when the run ends."""
    original, seen = recipe.training_loss, []

    def training_loss(model, batch, teacher, args):
        seen.extend(batch["input_ids"].tolist())
        return original(model, batch, teacher, args)

    recipe.training_loss = training_loss
    original_finish = recipe.finish

    def finish(job, model, tokenizer, args, results):
        rank = dist.get_rank() if dist.is_initialized() else 0
        (output_dir / f"blocks-{tag}-rank{rank}.json").write_text(json.dumps(seen))
        original_finish(job, model, tokenizer, args, results)

    recipe.finish = finish


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    ids = torch.load(spec["ids"])
    for job in spec["jobs"]:
        if not dist.is_initialized() or dist.get_rank() == 0:
            for folder in job.get("remove", []):
                shutil.rmtree(folder)
        if dist.is_initialized():
            dist.barrier()
        recipe = load_recipe()
        output_dir = Path(job["argv"][job["argv"].index("--output-dir") + 1])
        record_sharded_logits(recipe, ids, job["tag"])
        if job.get("record_blocks"):
            record_training_blocks(recipe, output_dir, job["tag"])
        sys.argv = [str(RECIPE), *job["argv"]]
        recipe.main()
        AcceleratorState._reset_state(reset_partial_state=True)  # the next unsharded run builds its own
        if not dist.is_initialized() or dist.get_rank() == 0:
            (output_dir / "results.json").rename(output_dir / f"results-{job['tag']}.json")
        if dist.is_initialized():
            dist.barrier()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
