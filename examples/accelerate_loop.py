"""ML-FOP-SOAP in an accelerate gradient-accumulation loop: a tiny random Llama, two streams, CPU.

The lines that differ from an ordinary accelerate loop are marked with ``# mlfop``.
Run: ``python examples/accelerate_loop.py`` (needs ``accelerate`` and ``transformers``).
"""

import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

import mlfop
from mlfop.integrations.accelerate import StreamFolding  # mlfop

torch.set_num_threads(1)  # tiny tensors: more threads only spin-wait on a small CPU
torch.manual_seed(0)
config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
model = LlamaForCausalLM(config)

# Each micro-batch comes from one stream: examples in blocks of the batch size per stream.
examples = []
for i in range(64):
    ids = torch.randint(0, 64, (16,))
    examples.append({"input_ids": ids, "labels": ids.clone(), "stream": ("image", "text")[(i // 4) % 2]})  # mlfop
loader = torch.utils.data.DataLoader(examples, batch_size=4)

accelerator = Accelerator(cpu=True, gradient_accumulation_steps=4)
optimizer = mlfop.MLFOPSOAP(model.parameters(), streams=("image", "text"), lr=3e-3, heads=model)  # mlfop
model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
folding = StreamFolding(optimizer)  # mlfop

steps = 0
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
            print(f"step {steps}: loss {loss.item():.4f}, grad norm {float(grad_norm):.4f}")
accelerator.save_state("mlfop-accelerate-example")  # after a real step: nothing is pending
print("trained", steps, "steps; stream weights and conflicts:", folding.optimizer.diagnostics())
