"""Load a saved folder with `trust_remote_code=True` in a fresh process where longlm cannot be imported,
run segments through it with the memory carried, and hand back what it computed."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["longlm"] = None  # the installed package must not be used
    import torch
    from transformers import AutoModelForCausalLM

    for folder in sys.argv[1:]:
        segments = torch.load(folder + "/inputs.pt")["segments"]
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        memory, logits = None, []
        with torch.no_grad():
            for ids in segments:
                out = model(ids, memory=memory)
                memory = out.memory
                logits.append(out.logits)
            # a model loaded as remote code can be saved again and still loads as remote code
            model.save_pretrained(folder + "/resaved")
            again = AutoModelForCausalLM.from_pretrained(folder + "/resaved", trust_remote_code=True).eval()
            resaved = again(segments[0]).logits
        torch.save(
            {
                "logits": logits,
                "resaved_first_logits": resaved,
                "module": type(model).__module__,
                "memory_type": type(memory).__name__,
                "faiss_imported": "faiss" in sys.modules,
            },
            folder + "/outputs.pt",
        )
    """
)


def run_remote(folder: Path, segments: list[torch.Tensor], tmp_path: Path, timeout: int = 300) -> dict:
    """Outputs of the remote-code copy of the model saved in `folder` (see REMOTE_SCRIPT for the keys)."""
    return run_remote_many([folder], [segments], tmp_path, timeout)[0]


def run_remote_many(
    folders: list[Path], segments: list[list[torch.Tensor]], tmp_path: Path, timeout: int = 600
) -> list[dict]:
    """`run_remote` for several folders in one fresh process (one start-up of torch and transformers)."""
    for folder, inputs in zip(folders, segments):
        torch.save({"segments": inputs}, folder / "inputs.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, *map(str, folders)], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = [torch.load(folder / "outputs.pt") for folder in folders]
    for output in outputs:
        assert output["module"].startswith("transformers_modules"), output["module"]
    return outputs
