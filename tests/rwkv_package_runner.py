"""Run the `rwkv` package (ChatRWKV's inference code) on a .pth: the reference for tests/test_rwkv_package.py.

Usage: python rwkv_package_runner.py MODEL.pth PROMPT_JSON DECODE_STEPS OUT.npz
(RWKV_V7_ON=1 in the environment for v7 models, set before `rwkv.model` is imported.)
"""

import json
import sys

import numpy as np
import torch


def main() -> None:
    path, prompt, steps, out = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(2)
    from rwkv.model import RWKV

    model = RWKV(model=path.removesuffix(".pth"), strategy="cpu fp32")
    with torch.no_grad():
        prompt_logits, state = model.forward(prompt, None, full_output=True)
        tokens, decode_logits = [], []
        logits = prompt_logits[-1]
        for _ in range(steps):
            token = int(torch.argmax(logits))
            logits, state = model.forward([token], state)
            tokens.append(token)
            decode_logits.append(logits.float().numpy())
    np.savez(
        out,
        prompt_logits=prompt_logits.float().numpy(),
        tokens=np.array(tokens),
        decode_logits=np.stack(decode_logits),
    )


if __name__ == "__main__":
    main()
