"""A few GRPO-style steps on CPU, the RL loop rolloutd is for: sample n answers per prompt through the daemon,
score them with a rule, take one optimizer step in torch, hand the new weights to the workers with
update_weights, and sample again from the new version.

    python examples/grpo_cpu.py                    # brings up `rolloutd up --model tiny` for the run
    python examples/grpo_cpu.py --address tcp://127.0.0.1:5555   # a daemon already serving the tiny model

The reward is the share of an answer's tokens that are digits, so the mean reward should climb step by
step. The trainer holds its own copy of the model (HF transformers, float32) and sends bfloat16, what the
workers serve; tensors in CPU memory travel by shared memory, never through the broker.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rolloutd import Client  # noqa: E402
from rolloutd.models import prepare  # noqa: E402

PROMPTS = ["Two plus two is", "The answer is", "Count: 0123", "What is the answer?"]


def reward(text: str) -> float:
    return sum(ch.isdigit() for ch in text) / max(1, len(text))


def step_loss(policy, tok, prompts, results) -> tuple[torch.Tensor, float]:
    """GRPO's objective for one batch: each sample's log-likelihood, weighted by its reward's advantage
    within its group (the n samples of one prompt)."""
    losses, rewards = [], []
    for prompt, res in zip(prompts, results):
        r = torch.tensor([reward(s.text) for s in res.samples])
        rewards.extend(r.tolist())
        adv = (r - r.mean()) / (r.std() + 1e-4)
        prompt_ids = tok(prompt, return_tensors="pt").input_ids[0]
        for a, s in zip(adv, res.samples):
            if not s.token_ids:
                continue
            ids = torch.cat([prompt_ids, torch.tensor(s.token_ids)])[None]
            logits = policy(ids).logits[0, len(prompt_ids) - 1:-1]
            logp = torch.log_softmax(logits.float(), -1).gather(1, ids[0, len(prompt_ids):, None]).sum()
            losses.append(-a * logp / len(s.token_ids))
    return torch.stack(losses).mean(), sum(rewards) / len(rewards)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--address", default=None, help="a running daemon's front address (default: start one)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--n", type=int, default=8, help="samples per prompt")
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = prepare("tiny")
    tok = AutoTokenizer.from_pretrained(model_dir)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    opt = torch.optim.Adam(policy.parameters(), lr=args.lr)

    with contextlib.ExitStack() as stack:
        address = args.address
        if address is None:
            from rolloutd.testing import Daemon

            print("starting rolloutd up --model tiny (about 30 s) ...", flush=True)
            address = stack.enter_context(Daemon(model_dir, workers=1, extra=("--max-model-len", "512"))).front
        c = stack.enter_context(Client(address, timeout=300))
        for step in range(args.steps + 1):
            results = c.generate(PROMPTS, n=args.n, temperature=1.0, max_tokens=24, seed=step)
            loss, mean_reward = step_loss(policy, tok, PROMPTS, results)
            print(f"step {step}: weights v{results[0].weight_version}, mean reward {mean_reward:.3f}, "
                  f"e.g. {results[0].samples[0].text!r}", flush=True)
            if step == args.steps:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
            t0 = time.perf_counter()
            # named_parameters, not state_dict: a tied model shares one tensor under two names
            c.update_weights({k: v.detach().to(torch.bfloat16) for k, v in policy.named_parameters()}, step + 1)
            print(f"        update to v{step + 1} took {(time.perf_counter() - t0) * 1e3:.0f} ms", flush=True)


if __name__ == "__main__":
    main()
