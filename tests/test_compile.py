"""``trainer.compile``: the compiled core gives eager's loss and gradients, and one compilation
serves every depth, every step's loop LoRA and every batch shape."""

from __future__ import annotations

import torch

from conftest import tiny_model, tiny_recipe


def test_a_compiled_core_gives_eagers_loss_and_a_new_depth_or_batch_does_not_recompile():
    from torch._dynamo.utils import counters

    overrides = {"loop__max_steps": 4, "loop__step_embedding": {"name": "learned"},
                 "loop__loop_lora": {"name": "per_step", "rank": 2}}
    eager = tiny_model(tiny_recipe(**overrides)).train()
    compiled = tiny_model(tiny_recipe(**overrides, trainer__compile=True)).train()
    compiled.load_state_dict(eager.state_dict())  # the same keys: compiled in place
    with torch.no_grad():
        for a, b in zip(eager.loop_lora.parameters(), compiled.loop_lora.parameters()):
            a.add_(0.1 * torch.randn_like(a))  # every step's adapter live
            b.copy_(a)
    ids = torch.randint(4, 32, (4, 12), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    counters.clear()
    for steps, batch in ((4, ids), (3, ids), (2, ids[:2, :9]), (5, ids[:3])):  # 5: past the table, the last adapter
        want = eager(batch, steps=steps).logits.float().pow(2).mean()
        got = compiled(batch, steps=steps).logits.float().pow(2).mean()
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        got.backward()
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert all(p.grad is not None for p in compiled.loop_lora.parameters())
