"""StaticKV against a plain reference: per-row lists of (key, value) tokens, left-padded on demand.

Random joins (forcing reallocation and moves), decode columns and departures; after every
operation the live window must hold exactly each row's tokens, right-aligned, masked elsewhere.
"""

from __future__ import annotations

import torch

from lorakit.serve.kv_cache import StaticKV

LAYERS, HEADS, DIM = 2, 2, 3


def check(cache: StaticKV, rows: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
    assert cache.rows == len(rows)
    width = cache.end - cache.start
    window = cache.window
    assert window.shape == (len(rows), width)
    assert width == max(len(r) for r in rows)  # no column is padding in every row
    for i, tokens in enumerate(rows):
        real = window[i].nonzero().flatten().tolist()
        assert real == list(range(width - len(tokens), width))
        for layer in range(LAYERS):
            keys = cache.key_buffers[layer][i, :, cache.start + width - len(tokens) : cache.end]
            values = cache.value_buffers[layer][i, :, cache.start + width - len(tokens) : cache.end]
            assert torch.equal(keys, torch.stack([k[layer] for k, _ in tokens], 1))
            assert torch.equal(values, torch.stack([v[layer] for _, v in tokens], 1))


def token(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(LAYERS, HEADS, DIM, generator=g), torch.randn(LAYERS, HEADS, DIM, generator=g)


def test_joins_steps_and_departures_keep_every_row_exact():
    g = torch.Generator().manual_seed(0)
    cache, rows = StaticKV(LAYERS), []
    for step in range(60):
        action = int(torch.randint(0, 5, (1,), generator=g))
        if not rows or action == 0:  # 1-3 rows join, left-padded to their longest prompt
            new = [[token(g) for _ in range(int(torch.randint(1, 9, (1,), generator=g)))] for _ in range(1 + step % 3)]
            longest = max(len(r) for r in new)
            mask = torch.zeros(len(new), longest, dtype=torch.long)
            keys = [torch.zeros(len(new), HEADS, longest, DIM) for _ in range(LAYERS)]
            values = [torch.zeros(len(new), HEADS, longest, DIM) for _ in range(LAYERS)]
            for i, tokens in enumerate(new):
                mask[i, longest - len(tokens) :] = 1
                for j, (k, v) in enumerate(tokens):
                    for layer in range(LAYERS):
                        keys[layer][i, :, longest - len(tokens) + j] = k[layer]
                        values[layer][i, :, longest - len(tokens) + j] = v[layer]
            cache.add_rows(keys, values, mask, room=int(torch.randint(0, 4, (1,), generator=g)))  # often too small
            rows += new
        elif action == 1 and len(rows) > 1:  # some rows leave, the rest reordered
            keep = torch.randperm(len(rows), generator=g)[: len(rows) - 1].tolist()
            cache.keep_rows(keep)
            rows = [rows[i] for i in keep]
        else:  # a decode step: one new token per row, written layer by layer
            mask = cache.open_column()
            assert mask.shape == (len(rows), cache.end - cache.start + 1) and bool(mask[:, -1].all())
            new = [token(g) for _ in rows]
            for layer in range(LAYERS):
                k = torch.stack([n[0][layer] for n in new])[:, :, None]
                v = torch.stack([n[1][layer] for n in new])[:, :, None]
                keys, values = cache.layers[layer].update(k, v)
                assert keys.shape[2] == cache.end - cache.start + 1 and torch.equal(keys[:, :, -1:], k)
            cache.advance()
            for tokens, n in zip(rows, new):
                tokens.append(n)
        check(cache, rows)
        assert cache.padded == any(len(r) < cache.end - cache.start for r in rows)
