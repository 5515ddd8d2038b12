"""An own PyTorch model for MaaS (``model.module`` in pipelines/sentiment-own-model.yaml): a tiny
transformer encoder trained from scratch. Token embedding + learned positional embedding ->
``nn.TransformerEncoder`` -> mean over the real (unmasked) tokens -> linear head to the classes.

The text family passes ``vocab_size``, ``num_labels``, ``max_length`` and ``pad_token_id`` (the
tokenizer it trained on the training split, and the data's classes); the rest come from the
pipeline file's ``model.init`` (or a trial's ``init.*``). ``forward(input_ids, attention_mask)``
returns logits ``[batch, num_labels]``. Plain torch; nothing MaaS is imported.
"""

import torch
from torch import nn


class TinyTransformer(nn.Module):
    def __init__(self, vocab_size: int, num_labels: int, max_length: int = 128,
                 pad_token_id: int = 0, d_model: int = 64, nhead: int = 4, layers: int = 2,
                 ff: int = 128, dropout: float = 0.1) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=pad_token_id)
        self.pos = nn.Embedding(max_length, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead, ff, dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(d_model, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embed(input_ids) + self.pos(positions)[None, :, :]
        x = self.encoder(x, src_key_padding_mask=attention_mask == 0)
        mask = attention_mask.unsqueeze(-1).to(x.dtype)
        pooled = (self.norm(x) * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return self.head(self.drop(pooled))
