"""ML-FOP-SOAP inside transformers.Trainer: a tiny random Llama, two streams, a few seconds on CPU.

The lines that differ from an ordinary Trainer script are marked with ``# mlfop``.
Run: ``python examples/transformers_trainer.py`` (needs ``transformers`` and ``accelerate``).
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from mlfop.integrations.transformers import MLFOPTrainer  # mlfop

torch.set_num_threads(1)  # tiny tensors: more threads only spin-wait on a small CPU
torch.manual_seed(0)
config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
model = LlamaForCausalLM(config)

# Every example names its stream; about one in three is an image example, in random order.
# MLFOPTrainer sees the "stream" column and batches the data with mlfop.StreamBatchSampler:
# single-stream micro-batches, in the data's proportions in every optimizer step.
dataset = []
for i in range(64):
    ids = torch.randint(0, 64, (16,))
    stream = "image" if torch.rand(()) < 1 / 3 else "text"
    dataset.append({"input_ids": ids, "labels": ids.clone(), "stream": stream})  # mlfop

args = TrainingArguments(
    output_dir="mlfop-trainer-example", per_device_train_batch_size=4, gradient_accumulation_steps=4,
    max_steps=4, learning_rate=3e-3, weight_decay=0.01, logging_steps=1, save_strategy="no",
    report_to="none", use_cpu=True, disable_tqdm=True,
)
trainer = MLFOPTrainer(  # mlfop: instead of Trainer
    model=model, args=args, train_dataset=dataset,
    optimizer_kwargs={"streams": ("image", "text"), "heads": model},  # mlfop: ML-FOP-SOAP's own options
)
trainer.train()
print("trained", trainer.state.global_step, "steps; last loss", trainer.state.log_history[-2]["loss"])
print("stream weights and conflicts:", trainer.mlfop_optimizer().diagnostics())
