"""ML-FOP-SOAP in a Lightning module: a tiny random Llama, two streams, a few seconds on CPU.

The dataset mixes its streams, as a real one does; StreamBatchSampler batches it into
single-stream micro-batches in the data's proportions in every optimizer step. The lines that
differ from an ordinary Lightning script are marked with ``# mlfop``.
Run: ``python examples/lightning_module.py`` (needs ``lightning`` and ``transformers``).
"""

import lightning as L
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import mlfop
from mlfop.integrations.lightning import MLFOPFolding  # mlfop

torch.set_num_threads(1)  # tiny tensors: more threads only spin-wait on a small CPU
torch.manual_seed(0)
ACCUMULATE = 4

# Every example names its stream; about one in three is an image example, in random order.
examples = []
for i in range(64):
    ids = torch.randint(0, 64, (16,))
    stream = "image" if torch.rand(()) < 1 / 3 else "text"
    examples.append({"input_ids": ids, "labels": ids.clone(), "stream": stream})  # mlfop


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

    def train_dataloader(self):  # mlfop: built here, after Lightning set up the processes (ranks)
        sampler = mlfop.StreamBatchSampler(mlfop.stream_column(examples), 4, accumulation_steps=ACCUMULATE)
        return torch.utils.data.DataLoader(examples, batch_sampler=sampler)

    def configure_optimizers(self):  # mlfop: ML-FOP-SOAP with the streams' names
        return mlfop.MLFOPSOAP(self.parameters(), streams=("image", "text"), lr=3e-3, heads=self.model)


module = LitLlama()
trainer = L.Trainer(
    accelerator="cpu", devices=1, max_steps=8, accumulate_grad_batches=ACCUMULATE, gradient_clip_val=1.0,
    callbacks=[MLFOPFolding()],  # mlfop: folds each micro-batch after its backward, before clipping
    use_distributed_sampler=False,  # mlfop: the sampler gives each rank its own micro-batches
    logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
)
trainer.fit(module)
print("trained", trainer.global_step, "steps; last loss", float(trainer.callback_metrics["loss"]))
print("stream weights and conflicts:", MLFOPFolding.mlfop_optimizer(trainer).diagnostics())
