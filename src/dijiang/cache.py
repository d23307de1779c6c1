"""Generation cache: a fixed-size recurrent state per converted layer, a growing KV cache per softmax layer."""
from __future__ import annotations

import torch
from dijiang.hf_compat import Cache, CacheLayerMixin, DynamicLayer, mask_query_length


class DiJiangStateLayer(CacheLayerMixin):
    """A converted layer's cache: the linear-attention state (a tensor, or a dict for the window hybrid).

    Its size does not depend on the number of tokens seen; ``seen_tokens`` keeps the count that HF's mask
    and position code ask for.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, **kwargs):
        super().__init__()
        self.state = None
        self.seen_tokens = 0
        self.full_keys = self.full_values = None  # a head hybrid's exact heads: [B, S, n, d], growing

    def update_full_heads(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new keys/values of a head hybrid's exact heads; every one so far ([B, S, n, d])."""
        if self.full_keys is None:
            self.full_keys, self.full_values = keys, values
        else:
            self.full_keys = torch.cat([self.full_keys, keys], dim=1)
            self.full_values = torch.cat([self.full_values, values], dim=1)
        return self.full_keys, self.full_values

    def lazy_initialization(self, key_states=None, value_states=None) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise ValueError("a converted (linear-attention) layer keeps a recurrent state, not keys and values")

    def update_state(self, state, num_tokens: int) -> None:
        self.state = state
        self.seen_tokens += num_tokens
        self.is_initialized = True

    def get_mask_sizes(self, query_length, *args) -> tuple[int, int]:
        return self.seen_tokens + mask_query_length(query_length), 0

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state, self.seen_tokens = None, 0
        self.full_keys = self.full_values = None

    def _map_state(self, fn) -> None:
        if isinstance(self.state, dict):
            self.state = {key: fn(value) for key, value in self.state.items()}
        elif self.state is not None:
            self.state = fn(self.state)
        if self.full_keys is not None:
            self.full_keys, self.full_values = fn(self.full_keys), fn(self.full_values)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_state(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_state(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_state(lambda t: t[indices, ...])

    def offload(self):
        self._map_state(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        pass

    def state_bytes(self) -> int:
        """The recurrent state's bytes, and a head hybrid's exact heads' keys and values (which grow)."""
        tensors = list(self.state.values()) if isinstance(self.state, dict) else [self.state]
        tensors += [self.full_keys, self.full_values]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class DiJiangCache(Cache):
    """One cache layer per decoder layer: DiJiangStateLayer where converted, DynamicLayer where softmax."""

    def __init__(self, converted_layers, num_layers: int):
        converted = set(converted_layers)
        layers = [DiJiangStateLayer() if i in converted else DynamicLayer() for i in range(num_layers)]
        super().__init__(layers=layers)

    @classmethod
    def for_model(cls, model) -> "DiJiangCache":
        config = model.config
        return cls(config.dijiang_layers, config.get_text_config(decoder=True).num_hidden_layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length() if layer_idx < len(self.layers) else 0

    def state_bytes(self) -> int:
        """Bytes held by converted layers (constant in the context length, but for a head hybrid's exact heads)."""
        return sum(layer.state_bytes() for layer in self.layers if isinstance(layer, DiJiangStateLayer))


def cache_bytes(cache) -> int:
    """Bytes of a generation cache: DiJiang states plus softmax keys/values."""
    total = 0
    for layer in cache.layers:
        if hasattr(layer, "state_bytes"):
            total += layer.state_bytes()
        else:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
    return total
