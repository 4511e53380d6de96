"""One timing of ``python -m bench.bench_decode --baseline``, runnable as a script so
that the ``mmchat`` it times is whichever ``PYTHONPATH`` names (a baseline revision's
worktree):

    PYTHONPATH=path/to/worktree python bench/decode_probe.py REPS CHECKPOINT

prints, as JSON, each precision's fast-step greedy reply on the bundled model (128
tokens, the end-of-reply logit pushed down by 1e4 so every reply runs its full length):
ms per token (the median of ``REPS`` replies, the prefill excluded by subtracting a
1-token reply) and a checksum of the reply's tokens, with the file ``mmchat`` was
imported from. It imports nothing from the ``bench`` package for that reason.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import sys
import time

PRECISIONS = ("fp32", "fp16", "int8")
TOKENS = 128
PROMPT = "what colour is the circle on the left?"


def measure(reps: int, checkpoint_dir: str) -> dict[str, dict[str, float | str]]:
    """Per precision: ms per token (median over ``reps`` replies) and the tokens' checksum."""
    import torch

    from mmchat import checkpoint
    from mmchat.config import from_dict
    from mmchat.fastpath import FastDecoder
    from mmchat.generate import GenerationParams
    from mmchat.plugins import PluginHost
    from mmchat.runtime import start_turn
    from mmchat.state import MemoryEntry, SessionState

    torch.set_num_threads(1)
    host = PluginHost.from_config(from_dict({}, env={})).load()
    model, tokenizer, _ = checkpoint.load(checkpoint_dir, host.modalities)
    with torch.no_grad():
        model.lm_head.bias[tokenizer.eos_id] -= 1e4
    g = torch.Generator().manual_seed(0)
    size = host.modalities["image"].size
    with torch.inference_mode():
        vectors = model.encode("image", torch.randn(1, 3, size, size, generator=g),
                               torch.tensor([1]))[0]
    memory = [MemoryEntry("image", vectors)]
    c = model.config

    def reply(decoder, n: int) -> list[int]:
        state = SessionState(rnn=torch.zeros(2 if c.rnn == "lstm" else 1, c.n_layer, 1,
                                             c.n_hidden), pending=[tokenizer.bos_id])
        run = start_turn(model, tokenizer, state, memory, PROMPT,
                         GenerationParams(max_new_tokens=n, loop_ngram=0), decoder=decoder)
        while run.next_token() is not None:
            pass
        return run.tokens

    out: dict[str, dict[str, float | str]] = {}
    for precision in PRECISIONS:
        decoder = FastDecoder(model, precision)
        tokens = reply(decoder, TOKENS)  # warm-up and checksum
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            n = len(reply(decoder, TOKENS))
            t1 = time.perf_counter()
            reply(decoder, 1)
            times.append(((t1 - t0) - (time.perf_counter() - t1)) / max(n - 1, 1) * 1e3)
        out[precision] = {"ms": statistics.median(times),
                          "checksum": hashlib.sha256(str(tokens).encode()).hexdigest()[:12]}
    return out


if __name__ == "__main__":
    import mmchat

    result = measure(int(sys.argv[1]), sys.argv[2])
    print(json.dumps({**result, "mmchat": mmchat.__file__}))
