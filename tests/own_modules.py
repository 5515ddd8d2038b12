"""Small user modules for tests/test_own_module.py, as source text (each is written to a file of
its own, as a user would): good ones of several shapes and the bad-input table's."""

from __future__ import annotations

HEADER = "import torch\nfrom torch import nn\n\n"

#: a bag of embeddings that takes only some of the data's facts and no attention mask
BAG = HEADER + '''
class Bag(nn.Module):
    def __init__(self, vocab_size, num_labels, width=16):
        super().__init__()
        self.embed = nn.EmbeddingBag(vocab_size, width)
        self.out = nn.Linear(width, num_labels)

    def forward(self, input_ids):
        return self.out(self.embed(input_ids))
'''

#: returns hidden states [B, T, H] (no num_labels in its constructor): MaaS adds the head
HIDDEN = HEADER + '''
class Hidden(nn.Module):
    def __init__(self, vocab_size, hidden=8):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden)

    def forward(self, input_ids, attention_mask):
        return self.embed(input_ids)
'''

#: an image module: forward(x) -> logits
CONV = HEADER + '''
class Conv(nn.Module):
    def __init__(self, in_channels, num_labels, image_size):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU(),
                                 nn.Flatten(), nn.Linear(4 * image_size * image_size, num_labels))

    def forward(self, x):
        return self.net(x)
'''

BAD = {
    "not_a_module": HEADER + "def NotAModule(vocab_size, num_labels):\n    return None\n",
    "wrong_signature": HEADER + '''
class Three(nn.Module):
    def __init__(self, vocab_size, num_labels):
        super().__init__()
        self.out = nn.Linear(1, num_labels)

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.out(input_ids[:, :1].float())
''',
    "wrong_shape": HEADER + '''
class Wide(nn.Module):
    def __init__(self, vocab_size, num_labels):
        super().__init__()
        self.embed = nn.EmbeddingBag(vocab_size, 5)

    def forward(self, input_ids, attention_mask):
        return self.embed(input_ids)
''',
    "nan_loss": HEADER + '''
class Nan(nn.Module):
    def __init__(self, vocab_size, num_labels):
        super().__init__()
        self.embed = nn.EmbeddingBag(vocab_size, num_labels)

    def forward(self, input_ids, attention_mask):
        return self.embed(input_ids) * float("nan")
''',
    "forward_raises": HEADER + '''
class Boom(nn.Module):
    def __init__(self, vocab_size, num_labels):
        super().__init__()
        self.out = nn.Linear(4, num_labels)

    def forward(self, input_ids, attention_mask):
        raise RuntimeError("kaboom in forward")
''',
    "import_raises": HEADER + 'raise ImportError("no module named sentencepiece_fake")\n',
}
