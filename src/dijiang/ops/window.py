"""Sliding-window softmax + decayed linear attention hybrid (work in progress)."""

from __future__ import annotations


def window_attention(*args, **kwargs):
    raise NotImplementedError("window_attention is being written")


naive_window_attention = chunk_window_attention = recurrent_window_attention = window_attention
