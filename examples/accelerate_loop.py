"""ML-FOP-SOAP in an accelerate gradient-accumulation loop: a tiny random Llama, two streams, CPU.

The dataset mixes its streams, as a real one does; StreamBatchSampler batches it into
single-stream micro-batches in the data's proportions in every optimizer step, with the same
stream sequence on every process. The lines that differ from an ordinary accelerate loop are
marked with ``# mlfop``. Run: ``python examples/accelerate_loop.py`` (needs ``accelerate`` and
``transformers``); ``torchrun --nproc_per_node 2 examples/accelerate_loop.py`` runs it on two
CPU processes (gloo), each folding the same streams over its own examples.
"""

import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

import mlfop
from mlfop.integrations.accelerate import StreamFolding, prepare_stream_loader  # mlfop

torch.set_num_threads(1)  # tiny tensors: more threads only spin-wait on a small CPU
torch.manual_seed(0)
config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
model = LlamaForCausalLM(config)

# Every example names its stream; about one in three is an image example, in random order.
examples = []
for i in range(64):
    ids = torch.randint(0, 64, (16,))
    stream = "image" if torch.rand(()) < 1 / 3 else "text"
    examples.append({"input_ids": ids, "labels": ids.clone(), "stream": stream})  # mlfop

accelerator = Accelerator(cpu=True, gradient_accumulation_steps=4)
sampler = mlfop.StreamBatchSampler(mlfop.stream_column(examples), 4, accumulation_steps=4)  # mlfop: ranks from
loader = prepare_stream_loader(accelerator, torch.utils.data.DataLoader(examples, batch_sampler=sampler))  # Accelerator
optimizer = mlfop.MLFOPSOAP(model.parameters(), streams=("image", "text"), lr=3e-3, heads=model)  # mlfop
model, optimizer = accelerator.prepare(model, optimizer)
folding = StreamFolding(optimizer)  # mlfop

steps, combined = 0, {}
for epoch in range(2):
    sampler.set_epoch(epoch)  # mlfop: a new order each epoch, the same on every process
    for batch in loader:
        with accelerator.accumulate(model):
            stream = folding.pop_stream(batch)  # mlfop: takes "stream" out of the batch
            loss = model(**batch).loss
            accelerator.backward(loss)
            folding.fold(stream)  # mlfop: right after the backward
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            if accelerator.sync_gradients:
                steps += 1
                combined = folding.optimizer.diagnostics() or combined  # empty after a one-stream step
                accelerator.print(f"step {steps}: loss {loss.item():.4f}, grad norm {float(grad_norm):.4f}")
accelerator.save_state("mlfop-accelerate-example")  # after a real step: nothing is pending
accelerator.print("trained", steps, "steps; last two-stream step's weights and conflicts:", combined)
