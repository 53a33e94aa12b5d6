"""``python -m tests.distributed.gather_check <zero3|fsdp> <folder> [lora]``: 2 CPU ranks (started by
alignexp's launcher) train the tiny policy two steps under ZeRO-3 or FSDP2 through ``alignexp.pipeline.fit``,
then check what the pipeline relies on, and rank 0 writes ``<folder>/result.json``:

* during training the parameters really are sharded (ZeRO-3 partitions; FSDP2 DTensor shards smaller than
  the whole), and a probe gathers them independently (all at once with ``GatheredParameters``, or
  ``get_model_state_dict(full_state_dict=True)``);
* after the fit the policy is a plain module whose weights equal the probe's gathered ones;
* the saved folder is non-empty, equals them too, reloads with ``from_pretrained`` and gives the same logits;
* generation after the fit works on every rank, each on its own prompts with different lengths (no
  collective in the decode loop, so no deadlock), and the ranks finish together.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch

from alignexp.args import HardwareArgs, OptimArgs
from alignexp.distributed import all_gather, barrier, is_main, rank
from alignexp.lightning_modules.datamodule import RankingDataset, make_loader
from alignexp.lightning_modules.preference import PreferenceModule
from alignexp.models.backbone import ModelArgs, build_model
from alignexp.models.logprobs import EncodedExample, pack
from alignexp.models.tokenizer import build_byte_tokenizer
from alignexp.pipeline.fit import fit, save_policy
from alignexp.sampling.engine import SamplingParams, generate
from alignexp.scale.launch import launched

ARCH = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False}


class Probe(L.Callback):
    """Whether the policy's parameters are sharded while training, and their whole values gathered by a
    second route, when training ends."""

    def __init__(self):
        self.sharded, self.gathered = False, {}

    def on_train_end(self, trainer: L.Trainer, module) -> None:
        policy = module.policy
        params = dict(policy.named_parameters())
        if hasattr(next(iter(params.values())), "ds_tensor"):  # ZeRO-3
            import deepspeed

            self.sharded = all(p.ds_tensor.numel() < p.ds_numel for p in params.values())
            with deepspeed.zero.GatheredParameters(list(params.values())):
                self.gathered = {k: p.data.detach().cpu().clone() for k, p in params.items()}
        else:  # FSDP2
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            from torch.distributed.tensor import DTensor

            self.sharded = all(isinstance(p, DTensor) and p.to_local().numel() < p.numel() for p in params.values())
            full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
            self.gathered = {k: v.detach().cpu().clone() for k, v in full.items() if k in params}


def main() -> None:
    kind, folder, lora = sys.argv[1], Path(sys.argv[2]), "lora" in sys.argv[3:]
    sharded = {"zero3": {"strategy": "deepspeed", "zero_stage": 3, "zero_persistence_threshold": 0},
               "fsdp": {"strategy": "fsdp"}}[kind]
    hw = HardwareArgs(name=kind, accelerator="cpu", devices=2, precision="32-true", threads=1, **sharded)
    torch.set_num_threads(1)
    with launched(hw):
        tokenizer = build_byte_tokenizer()
        policy = build_model(ModelArgs(arch=ARCH), tokenizer)
        if lora:
            from alignexp.models.lora import LoraArgs, apply_lora

            policy = apply_lora(policy, LoraArgs(r=4, dropout=0.0))
        generator = torch.Generator().manual_seed(0)
        encoded = [EncodedExample(torch.randint(3, 250, (5 + i % 3,), generator=generator).tolist(),
                                  [torch.randint(3, 250, (4,), generator=generator).tolist() for _ in range(2)])
                   for i in range(16)]
        refs = [torch.tensor([-30.0, -31.0]) for _ in encoded]
        loader = make_loader(RankingDataset(encoded, refs), 4, tokenizer.pad_token_id, shuffle=True, seed=0)
        module = PreferenceModule(policy, "dpo", {"beta": 0.1}, OptimArgs(lr=5e-2))
        probe = Probe()
        fit(module, loader, hw=hw, logger={}, out=folder, stage="train", max_steps=2, max_epochs=1,
            enable_progress_bar=False, callbacks=[probe])
        plain = module.policy
        after = {k: v.detach().cpu() for k, v in plain.named_parameters()}
        equal_gathered = set(after) == set(probe.gathered) and all(torch.equal(after[k], probe.gathered[k])
                                                                    for k in after)
        save_policy(plain, tokenizer, folder / "policy")
        from transformers import AutoModelForCausalLM

        reloaded = AutoModelForCausalLM.from_pretrained(folder / "policy", dtype=torch.float32)
        saved = dict(reloaded.named_parameters())
        from alignexp.models.lora import merged_state_dict

        merged = {k: v.cpu() for k, v in merged_state_dict(plain).items() if k in saved}
        batch = pack(encoded[:4], pad_id=tokenizer.pad_token_id)
        with torch.no_grad():
            logits_saved = reloaded(input_ids=batch.input_ids).logits
            logits_plain = plain(input_ids=batch.input_ids).logits
        prompts = [[5 + rank()] * (3 + 4 * rank() + i) for i in range(3)]  # different on each rank
        outputs = generate(plain, prompts, SamplingParams(temperature=1.0, max_new_tokens=5 + 7 * rank()),
                           eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, seeds=[1, 2, 3])
        generated = all_gather(sum(len(g.token_ids) for g in outputs))
        initial = build_model(ModelArgs(arch=ARCH), tokenizer)
        trained = any(not torch.equal(merged[k], v) for k, v in initial.state_dict().items() if k in merged)
        barrier()
        if is_main():
            result = {"sharded_while_training": probe.sharded, "plain_equals_gathered": equal_gathered,
                      "plain_after_fit": not any(hasattr(p, "ds_tensor") or type(p).__name__ == "DTensor"
                                                 for p in plain.parameters()),
                      "saved_tensors": len(saved), "saved_elements": sum(p.numel() for p in saved.values()),
                      "saved_equals_merged": set(saved) == set(merged) and all(
                          torch.equal(saved[k].detach(), merged[k]) for k in saved),
                      "logits_max_abs_diff": float((logits_saved - logits_plain).abs().max()),
                      "trained": trained, "generated_tokens_per_rank": generated}
            (folder / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
