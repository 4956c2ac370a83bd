# Interop check (optional, needs Python with torch, transformers and bitsandbytes 0.50.x):
# load a `qlora quantize` output with transformers + bitsandbytes as a 4-bit model and compare
# its logits with transformers' own 4-bit checkpoint of the same base and with the f32 base.
#
#   qlora quantize tests/fixtures/tiny-llama /tmp/ours --compute-dtype f32
#   python3 scripts/check_transformers_load.py /tmp/ours \
#       tests/fixtures/qlora-bnb4/quantized_base tests/fixtures/tiny-llama
#
# Not part of CI (CI machines have no torch); results are recorded in benches/RESULTS.md.
import sys, torch, json
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
import bitsandbytes as bnb
ours, theirs, base = sys.argv[1], sys.argv[2], sys.argv[3]
torch.manual_seed(0)
ids = torch.randint(3, 320, (2, 12))
def load(d):
    m = AutoModelForCausalLM.from_pretrained(d, device_map="cpu")
    m.train()  # bnb 0.50.2 repacks 4-bit weights for AVX512-BF16 CPUs only in eval mode, and fails on tiny shapes; dropout is 0
    return m
mo = load(ours); mt = load(theirs); mb = load(base)
q = mo.model.layers[0].self_attn.q_proj
print("layer type:", type(q).__name__, "weight:", type(q.weight).__name__, "quant_type:", q.weight.quant_type, "blocksize:", q.weight.quant_state.blocksize, "nested:", q.weight.quant_state.nested)
with torch.no_grad():
    lo, lt, lb = mo(ids).logits, mt(ids).logits, mb(ids).logits
print("bnb version", bnb.__version__)
print("max |ours - transformers' 4-bit| =", (lo - lt).abs().max().item())
print("max |ours - f32 base|            =", (lo - lb).abs().max().item())
print("footprint ours", mo.get_memory_footprint(), "f32 base", mb.get_memory_footprint())
