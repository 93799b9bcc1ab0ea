"""ML-FOP-SOAP in a Lightning module: a tiny random Llama, two streams, a few seconds on CPU.

The lines that differ from an ordinary Lightning script are marked with ``# mlfop``.
Run: ``python examples/lightning_module.py`` (needs ``lightning`` and ``transformers``).
"""

import lightning as L
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import mlfop
from mlfop.integrations.lightning import MLFOPFolding  # mlfop

torch.set_num_threads(1)  # tiny tensors: more threads only spin-wait on a small CPU
torch.manual_seed(0)


class LitLlama(L.LightningModule):
    def __init__(self):
        super().__init__()
        config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)
        self.model = LlamaForCausalLM(config)

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss  # MLFOPFolding already took "stream" out of the batch
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):  # mlfop: ML-FOP-SOAP with the streams' names
        return mlfop.MLFOPSOAP(self.parameters(), streams=("image", "text"), lr=3e-3, heads=self.model)


# Each micro-batch comes from one stream: examples in blocks of the batch size per stream.
examples = []
for i in range(64):
    ids = torch.randint(0, 64, (16,))
    examples.append({"input_ids": ids, "labels": ids.clone(), "stream": ("image", "text")[(i // 4) % 2]})  # mlfop
loader = torch.utils.data.DataLoader(examples, batch_size=4)

module = LitLlama()
trainer = L.Trainer(
    accelerator="cpu", devices=1, max_steps=4, accumulate_grad_batches=4, gradient_clip_val=1.0,
    callbacks=[MLFOPFolding()],  # mlfop: folds each micro-batch after its backward, before clipping
    logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
)
trainer.fit(module, loader)
print("trained", trainer.global_step, "steps; last loss", float(trainer.callback_metrics["loss"]))
print("stream weights and conflicts:", MLFOPFolding.mlfop_optimizer(trainer).diagnostics())
