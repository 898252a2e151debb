"""The PyTorch side of experiments/bench_peers.py: HF `generate` and a TRM update written as verl / TRL do.

Bench only (the `bench` extra: torch, transformers); trm_jax never imports this. Everything here is eager
PyTorch on CPU in float32, with the thread count set by the caller (equal to XLA's, see bench_peers.py).

`TorchTRMUpdate` is one RL step the way the PyTorch stacks write it (TRL GRPOTrainer._compute_loss,
verl dp_actor.update_policy + rollout-correction sequence masks), with trm_jax's default hyper-parameters:
  1. logits = model(prompt + response, attention_mask, logits_to_keep=T+1).logits[:, :-1]   (TRL; only the
     response positions are unembedded; transformers' default attention = sdpa)
  2. logp_t = logits.gather(y_t) - logsumexp(logits)   (TRL selective_log_softmax, verl logprobs_from_logits)
     entropy_t of softmax(logits), no grad (the logged `entropy`, as trm_jax logs it)
  3. no grad: log rho = logp - rollout_logp; k2 = (log rho)^2 / 2, k3 = rho - 1 - log rho (rho clipped at
     e^{+-20} as trm_jax); M_i = [max_t k2 <= delta] * [mean_t k3 <= delta_avg] (verl seq_max_k2 AND
     seq_mean_k3 = TRM-Max & TRM-Avg with the co-released estimators)
  4. GRPO advantages over all non-empty members of each group (std ddof 1, eps 1e-6), then rejected rows
     weighted 0 (verl: advantages before the rollout-correction mask; trm_jax's rl.group_stats=all)
  5. PPO clip against the rollout log-probs (clip-higher 0.2 / 0.28), token weights M_i * mask,
     loss = sum / number of sequences (trm_jax's seq_total aggregation)
  6. loss.backward(); clip_grad_norm_(1.0); AdamW(lr 1e-4, betas (0.9, 0.999), eps 1e-8, wd 0).step()
"""
from __future__ import annotations

import numpy as np
import torch


def set_threads(n: int) -> None:
  torch.set_num_threads(int(n))


def load_model(path: str):
  """transformers.AutoModelForCausalLM from a local directory, float32, default attention (sdpa)."""
  import transformers  # noqa: PLC0415
  return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def generate(model, prompt: np.ndarray, T: int, *, greedy: bool, eos_id: int = 2, pad_id: int = 0) -> np.ndarray:
  """[B,T] new tokens of `model.generate` (exactly T: min_new_tokens = max_new_tokens); sampling at
  temperature 1 with top-k / top-p off, or greedy."""
  ids = torch.as_tensor(prompt, dtype=torch.long)
  kw = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
  with torch.inference_mode():
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=T, min_new_tokens=T,
                         eos_token_id=eos_id, pad_token_id=pad_id, **kw)
  assert out.shape[1] == prompt.shape[1] + T, out.shape
  return out[:, prompt.shape[1]:].numpy()


def grpo(rewards: torch.Tensor, valid: torch.Tensor, G: int, eps: float = 1e-6) -> torch.Tensor:
  """A_i = (R_i - mean_g R) / (std_g R + eps) over the valid members of i's group (ddof 1); invalid -> 0."""
  r, v = rewards.view(-1, G), valid.view(-1, G)
  n = v.sum(-1, keepdim=True)
  mean = (r * v).sum(-1, keepdim=True) / n.clamp(min=1.0)
  centred = (r - mean) * v
  std = ((centred ** 2).sum(-1, keepdim=True) / (n - 1.0).clamp(min=1.0)).sqrt()
  return (centred / (std + eps)).reshape(-1)


class TorchTRMUpdate:
  """One eager PyTorch TRM + PPO + AdamW step on a batch of numpy arrays (see the module docstring)."""

  def __init__(self, model, batch: dict, *, G: int, delta: float, delta_avg: float, clip_low: float = 0.2,
               clip_high: float = 0.28, lr: float = 1e-4, grad_clip: float = 1.0, entropy: bool = True):
    self.model = model.train()  # no dropout in Qwen3; train() only for the autograd path
    self.opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    t = lambda k, dt: torch.as_tensor(np.asarray(batch[k]), dtype=dt)
    self.prompt, self.response = t("prompt", torch.long), t("response", torch.long)
    self.attn = torch.cat([t("prompt_mask", torch.long), (t("response_mask", torch.float32) > 0).long()], 1)
    self.mask, self.old_logp = t("response_mask", torch.float32), t("rollout_logp", torch.float32)
    self.rewards = t("rewards", torch.float32)
    self.G, self.delta, self.delta_avg = G, delta, delta_avg
    self.clip_low, self.clip_high, self.grad_clip, self.entropy = clip_low, clip_high, grad_clip, entropy

  def __call__(self) -> dict:
    T = self.response.shape[1]
    ids = torch.cat([self.prompt, self.response], 1)
    logits = self.model(input_ids=ids, attention_mask=self.attn, logits_to_keep=T + 1).logits[:, :-1].float()
    lse = torch.logsumexp(logits, -1)
    logp = torch.gather(logits, -1, self.response[..., None]).squeeze(-1) - lse
    mask = self.mask
    with torch.no_grad():
      metrics = {}
      if self.entropy:
        p = torch.softmax(logits, -1)
        ent = lse - (p * logits).sum(-1)
        metrics["entropy"] = float((ent * mask).sum() / mask.sum().clamp(min=1.0))
      log_rho = torch.where(mask > 0, logp - self.old_logp, torch.zeros_like(logp))
      clipped = log_rho.clamp(-20.0, 20.0)
      k2 = 0.5 * log_rho ** 2
      k3 = (clipped.exp() - 1.0 - clipped).clamp(min=0.0)
      n_tok = mask.sum(-1)
      k2_max = torch.where(mask > 0, k2, torch.full_like(k2, -float("inf"))).amax(-1)
      k3_mean = (k3 * mask).sum(-1) / n_tok.clamp(min=1.0)
      seq_mask = ((k2_max <= self.delta) & (k3_mean <= self.delta_avg)).float()
      valid = seq_mask * (n_tok > 0).float()
      adv = grpo(self.rewards, (n_tok > 0).float(), self.G)
      weights = mask * seq_mask[:, None]
    ratio = torch.exp(torch.where(weights != 0, logp - self.old_logp, torch.zeros_like(logp)))
    a = adv[:, None]
    pg_clipped = -a * ratio.clamp(1.0 - self.clip_low, 1.0 + self.clip_high)
    pg = torch.maximum(-a * ratio, pg_clipped)
    loss = torch.where(weights != 0, pg * weights, torch.zeros_like(pg)).sum() / logp.shape[0]
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
    self.opt.step()
    with torch.no_grad():
      kept = weights != 0
      clip_frac = ((pg_clipped > -a * ratio) & kept).sum() / kept.sum().clamp(min=1)
      scale = float((pg * weights).abs().sum() / logp.shape[0])  # the size of the summed terms
      accept = valid.sum() / (n_tok > 0).float().sum().clamp(min=1.0)
    metrics.update(loss=float(loss.detach()), loss_scale=max(scale, 1e-12), grad_norm=float(grad_norm),
                   clip_frac=float(clip_frac), accept_rate=float(accept), seq_mask=seq_mask.numpy().copy())
    return metrics
