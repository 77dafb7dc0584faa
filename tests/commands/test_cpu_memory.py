"""`--cpu_malloc keep`: freed activations stay in the process, so repeated batches stop faulting pages in."""

import json
import subprocess
import sys

import pytest
import torch

from gsva_hf.cpu_memory import apply_malloc_choice, glibc
from tests.conftest import REPO

# A two-layer Llama forward over a batch of 4 x 150 tokens, 20 times: with glibc's defaults the activations it frees
# go back to the OS between calls and fault in again on the next one.
BATCHES = """
import json, resource, sys, torch
sys.path.insert(0, {repo!r})
from gsva_hf.cpu_memory import apply_malloc_choice
changed = apply_malloc_choice({choice!r}, "cpu")
from transformers import LlamaConfig, LlamaModel
torch.manual_seed(0)
torch.set_num_threads(1)
config = LlamaConfig(hidden_size=128, intermediate_size=512, num_attention_heads=16, head_dim=32,
                     num_hidden_layers=2, vocab_size=64)
model = LlamaModel(config).eval()
embeddings = torch.randn(4, 150, 128)
mask = torch.ones(4, 150, dtype=torch.long)
mask[1, 120:] = 0
with torch.no_grad():
    for _ in range(3):
        model(inputs_embeds=embeddings, attention_mask=mask)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        states = model(inputs_embeds=embeddings, attention_mask=mask).last_hidden_state
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({{"changed": changed, "faults": faults, "states": states[:, ::30, ::16].tolist()}}))
"""


def run_batches(choice: str) -> dict:
    code = BATCHES.format(repo=str(REPO), choice=choice)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(glibc() is None, reason="the malloc settings are glibc's")
def test_kept_memory_stops_the_page_faults_of_repeated_batches():
    default, kept = run_batches("default"), run_batches("keep")
    assert not default["changed"] and kept["changed"]
    # About 24,000 faults against 1,100 on this machine: the kept heap only grows where a call needs more.
    assert default["faults"] > 10_000, default["faults"]
    assert kept["faults"] * 5 < default["faults"], (kept["faults"], default["faults"])
    assert torch.allclose(torch.tensor(kept["states"]), torch.tensor(default["states"]), atol=1e-6)


def test_the_choice_is_checked_and_only_applies_on_the_cpu():
    with pytest.raises(ValueError, match="--cpu_malloc must be one of keep, default"):
        apply_malloc_choice("tcmalloc", "cpu")
    assert apply_malloc_choice("keep", "cuda:0") is False
    assert apply_malloc_choice("default", "cpu") is False
