"""A small torch restatement of MosaicML's MosaicGPT forward pass (MPT-1B).

`anas-awadalla/mpt-1b-redpajama-200b` (OpenFlamingo-3B's LM) runs the
remote code `mosaic_gpt.py` of mosaicml/examples (spring 2023), which
transformers does not ship and which imports composer, omegaconf and
flash-attn. This module restates the parts of it that the published
checkpoint exercises at inference, `attn_impl: torch`, module for module
and under the same parameter names, so that the fixture's state dict is
the published layout and its outputs are MosaicGPT's:

  MosaicGPT.transformer: wte (Embedding), blocks (GPTBlock x n_layers),
      ln_f; logits = F.linear(ln_f(x), wte.weight) (tied, no lm_head);
      `no_bias` removes the `bias` Parameter of every module, LayerNorms
      included (after construction, as MosaicGPT.__init__ does).
  GPTBlock: x += attn(ln_1(x)); x += mlp(ln_2(x)); mlp = mlp_down(
      GELU(approximate='none')(mlp_up(x))).
  MultiheadAttention: qkv = Wqkv(x); with attn_qk_ln, q = q_ln(q) and
      k = k_ln(k) on the full width before the head split; keys/values
      appended to `past_key_value` (the generation cache); scores scaled by
      softmax_scale (default 1/sqrt(d_model / n_heads)), plus the ALiBi
      bias's last key columns, causal mask aligned bottom-right, softmax,
      out_proj.
  ALiBi: a [1, H, 1, max_seq_len] bias (1 - max_seq_len .. 0) * 2^-m_h,
      m_h = h * alibi_bias_max / H (h = 1..H), built once; a padding
      `attention_mask` fills its columns with the dtype's minimum.

Not restated (refused by the importer, or training only): learned
positions (`alibi: false`), `attn_clip_qkv`, `prefix_lm`, sequence ids,
dropout, `embedding_fraction`, `logit_scale`, flash/triton kernels.

Needs torch (the `[parity]` extra); used by make_fixtures.py and
make_open_flamingo.py, never by the tests.
"""

import math
import types

import torch
from torch import nn
import torch.nn.functional as F

# MPT-1B's config.json fields that the forward pass reads, at their
# published values (sizes are overridden per fixture).
MPT_1B = dict(
    architectures=['MosaicGPT'], model_type='mosaic_gpt', d_model=2048,
    n_heads=16, n_layers=24, mlp_ratio=4, max_seq_len=2048, vocab_size=50432,
    alibi=True, alibi_bias_max=8, attn_qk_ln=True, attn_clip_qkv=None,
    attn_impl='torch', softmax_scale=None, no_bias=True, logit_scale=None,
    embedding_fraction=1.0, prefix_lm=False, attn_uses_sequence_id=False,
    low_precision_layernorm=True, init_device='cpu', emb_pdrop=0,
    attn_pdrop=0, resid_pdrop=0, tokenizer_name='EleutherAI/gpt-neox-20b',
    torch_dtype='bfloat16', use_cache=False)


def config(**sizes) -> dict:
  """MPT-1B's config.json with `sizes` (d_model, n_heads, ...) replaced."""
  return dict(MPT_1B, **sizes)


class MultiheadAttention(nn.Module):

  def __init__(self, cfg):
    super().__init__()
    self.d_model, self.n_heads = cfg.d_model, cfg.n_heads
    self.attn_qk_ln = cfg.attn_qk_ln
    self.softmax_scale = cfg.softmax_scale or 1 / math.sqrt(
        cfg.d_model / cfg.n_heads)
    self.Wqkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
    if cfg.attn_qk_ln:
      self.q_ln = nn.LayerNorm(cfg.d_model)
      self.k_ln = nn.LayerNorm(cfg.d_model)
    self.out_proj = nn.Linear(cfg.d_model, cfg.d_model)

  def forward(self, x, past_key_value=None, attn_bias=None,
              is_causal=True):
    qkv = self.Wqkv(x)
    if self.attn_qk_ln:
      dtype = qkv.dtype
      q, k, v = qkv.split(self.d_model, dim=-1)
      qkv = torch.cat([self.q_ln(q).to(dtype), self.k_ln(k).to(dtype), v],
                      dim=-1)
    query, key, value = qkv.chunk(3, dim=2)
    if past_key_value is not None:
      if past_key_value:
        key = torch.cat([past_key_value[0], key], dim=1)
        value = torch.cat([past_key_value[1], value], dim=1)
      past_key_value = (key, value)
    if attn_bias is not None:
      attn_bias = attn_bias[:, :, -query.size(1):, -key.size(1):]
    context = _attention(query, key, value, self.n_heads, self.softmax_scale,
                         attn_bias, is_causal)
    return self.out_proj(context), past_key_value


def _attention(query, key, value, n_heads, softmax_scale, attn_bias,
               is_causal):
  """MosaicGPT's scaled_multihead_dot_product_attention (no dropout)."""
  b, s_q, _ = query.shape
  s_k = key.shape[1]
  q = query.view(b, s_q, n_heads, -1).transpose(1, 2)  # b h s d
  k = key.view(b, s_k, n_heads, -1).permute(0, 2, 3, 1)  # b h d s
  v = value.view(b, s_k, n_heads, -1).transpose(1, 2)  # b h s d
  weight = q.matmul(k) * softmax_scale
  if attn_bias is not None:
    weight = weight + attn_bias
  if is_causal:
    s = max(s_q, s_k)
    causal = weight.new_ones(s, s, dtype=torch.bool).tril().logical_not()
    weight = weight.masked_fill(causal[-s_q:, -s_k:].view(1, 1, s_q, s_k),
                                -float('inf'))
  weight = torch.softmax(weight, dim=-1)
  out = weight.matmul(v)  # b h s d
  return out.transpose(1, 2).reshape(b, s_q, -1)


class GPTMLP(nn.Module):

  def __init__(self, cfg):
    super().__init__()
    self.mlp_up = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model)
    self.mlp_act = nn.GELU(approximate='none')
    self.mlp_down = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model)

  def forward(self, x):
    return self.mlp_down(self.mlp_act(self.mlp_up(x)))


class GPTBlock(nn.Module):

  def __init__(self, cfg):
    super().__init__()
    self.ln_1 = nn.LayerNorm(cfg.d_model)
    self.attn = MultiheadAttention(cfg)
    self.ln_2 = nn.LayerNorm(cfg.d_model)
    self.mlp = GPTMLP(cfg)

  def forward(self, x, past_key_value=None, attn_bias=None,
              attention_mask=None, is_causal=True):
    del attention_mask  # Folded into attn_bias (attn_impl: torch).
    b, past_key_value = self.attn(self.ln_1(x), past_key_value, attn_bias,
                                  is_causal)
    x = x + b
    return x + self.mlp(self.ln_2(x)), past_key_value


def alibi_bias(n_heads, seq_len, alibi_bias_max, dtype=torch.float32):
  """[1, H, 1, seq_len]: (1 - seq_len .. 0) * 2^-(h * max / H)."""
  bias = torch.arange(1 - seq_len, 1, dtype=dtype).view(1, 1, 1, seq_len)
  m = torch.arange(1, n_heads + 1, dtype=dtype) * (alibi_bias_max / n_heads)
  return bias * (1.0 / 2**m.view(1, n_heads, 1, 1))


class MosaicGPT(nn.Module):
  """The LM; `config_dict` as config.json holds it."""

  def __init__(self, config_dict: dict):
    super().__init__()
    cfg = types.SimpleNamespace(**config_dict)
    if not cfg.alibi or cfg.attn_clip_qkv or cfg.prefix_lm:
      raise NotImplementedError('not restated here; see the docstring')
    self.config = cfg
    self.transformer = nn.ModuleDict({
        'wte': nn.Embedding(cfg.vocab_size, cfg.d_model),
        'blocks': nn.ModuleList([GPTBlock(cfg)
                                 for _ in range(cfg.n_layers)]),
        'ln_f': nn.LayerNorm(cfg.d_model)})
    if cfg.no_bias:
      for module in self.modules():
        if isinstance(getattr(module, 'bias', None), nn.Parameter):
          module.register_parameter('bias', None)
    self.register_buffer('attn_bias', alibi_bias(
        cfg.n_heads, cfg.max_seq_len, cfg.alibi_bias_max), persistent=False)

  @torch.no_grad()
  def init_weights(self, std: float = 0.02) -> 'MosaicGPT':
    """N(0, std) embeddings (MosaicGPT's `init_std`), torch's defaults
    elsewhere. torch's own N(0, 1) embeddings would swamp a tiny model's
    blocks, and its tied logits would repeat the last token."""
    self.transformer.wte.weight.normal_(0.0, std)
    return self

  # What OpenFlamingo's factory gives mpt-1b-redpajama-200b
  # (EmbeddingFnMixin) and what it calls (resize_token_embeddings).
  def get_input_embeddings(self):
    return self.transformer.wte

  def set_input_embeddings(self, table):
    self.transformer.wte = table

  def resize_token_embeddings(self, rows: int):
    """New rows are the mean row (OpenFlamingo's checkpoint.pt holds the
    resized table, so their initial values never matter)."""
    old = self.transformer.wte.weight.data
    table = nn.Embedding(rows, old.shape[1])
    with torch.no_grad():
      keep = min(rows, old.shape[0])
      table.weight[:keep] = old[:keep]
      table.weight[keep:] = old.mean(0, keepdim=True)
    self.transformer.wte = table
    self.config.vocab_size = rows
    return table

  def forward(self, input_ids, past_key_values=None, attention_mask=None,
              use_cache=False, **unused):
    del unused  # labels, return_dict, ... (OpenFlamingo passes some).
    x = self.transformer.wte(input_ids)
    attn_bias = self.attn_bias.to(x.dtype)
    if attention_mask is not None:
      s_k = attention_mask.shape[-1]
      attn_bias = attn_bias[:, :, :, -s_k:].masked_fill(
          ~attention_mask.bool().view(-1, 1, 1, s_k),
          torch.finfo(x.dtype).min)
    if use_cache and past_key_values is None:
      past_key_values = [() for _ in range(self.config.n_layers)]
    for i, block in enumerate(self.transformer.blocks):
      past = past_key_values[i] if past_key_values is not None else None
      x, past = block(x, past_key_value=past, attn_bias=attn_bias,
                      attention_mask=None, is_causal=True)
      if past_key_values is not None:
        past_key_values[i] = past
    logits = F.linear(self.transformer.ln_f(x), self.transformer.wte.weight)
    return types.SimpleNamespace(logits=logits,
                                 past_key_values=past_key_values)

  @torch.no_grad()
  def greedy(self, prompt, steps: int):
    """Greedy continuation through the key/value cache, as MosaicGPT's
    `prepare_inputs_for_generation` feeds `generate` (the last token and
    `past_key_values`): [1, P] -> [steps]."""
    out = self(prompt, use_cache=True)
    tokens = []
    for _ in range(steps):
      token = out.logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
      tokens.append(int(token))
      out = self(token, past_key_values=out.past_key_values, use_cache=True)
    return torch.tensor(tokens)
