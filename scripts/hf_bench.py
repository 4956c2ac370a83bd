#!/usr/bin/env python3
"""The baseline of `qlora bench`: the same QLoRA training step in transformers + PEFT +
bitsandbytes, on a model of real shapes with random weights (nothing downloaded).

Recipe (what users run, per the QLoRA paper and PEFT's docs):
  * base: NF4, blocksize 64, double quantization (bnb `compress_statistics=True`), bf16 compute,
    lm_head and embedding unquantized in bf16;
  * LoRA: r, alpha = 2r, dropout 0, target_modules="all-linear" (the seven projections);
    PEFT keeps the adapter weights in f32 (autocast_adapter_dtype);
  * gradient checkpointing (use_reentrant=False), sdpa attention, use_cache False;
  * optimizer: bitsandbytes PagedAdamW32bit (Trainer's `paged_adamw_32bit`), lr 2e-4.
By default the non-quantized bf16 parameters stay bf16 (faster and smaller than PEFT's
`prepare_model_for_kbit_training`, which upcasts them to f32; `--upcast` does that instead).

One step = forward + loss + backward + optimizer step on B x T random tokens, labels = ids.
Warm-up steps, then timed steps bracketed by torch.cuda.synchronize(). Prints a table and one
JSON line (prefix `HF_BENCH_JSON `): tokens/s, ms/step, torch.cuda.max_memory_allocated and
max_memory_reserved (torch's caching allocator; the paged optimizer state lives in CUDA
managed memory, which torch does not count), and the device-level used memory from
cudaMemGetInfo (includes the CUDA context and resident managed pages).

  python3 scripts/hf_bench.py --shape llama3-8b --seq-len 2048 --batch-size 1 --rank 16
  python3 scripts/hf_bench.py --print-config --shape llama3-8b     # no torch needed
  python3 scripts/hf_bench.py --dry-run                            # CPU, tiny, no bitsandbytes
"""

import argparse
import json
import sys
import time

# The shapes of crates/train/src/plan/shapes.rs (the public config.json values).
SHAPES = {
    "llama2-7b": dict(arch="llama", hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                      rope_theta=10000.0, tie_word_embeddings=False),
    "llama3-8b": dict(arch="llama", hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5,
                      rope_theta=500000.0, tie_word_embeddings=False),
    "mistral-7b": dict(arch="mistral", hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       vocab_size=32768, max_position_embeddings=32768, rms_norm_eps=1e-5,
                       rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=False),
    "qwen2.5-7b": dict(arch="qwen2", hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       vocab_size=152064, max_position_embeddings=131072, rms_norm_eps=1e-6,
                       rope_theta=1000000.0, use_sliding_window=False,
                       tie_word_embeddings=False),
    "llama3-70b": dict(arch="llama", hidden_size=8192, intermediate_size=28672,
                       num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                       vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5,
                       rope_theta=500000.0, tie_word_embeddings=False),
    # tests/fixtures/tiny-llama/config.json
    "tiny": dict(arch="llama", hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=320,
                 max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
                 tie_word_embeddings=False),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--upcast", action="store_true",
                   help="upcast non-quantized bf16 parameters to f32 as PEFT's "
                        "prepare_model_for_kbit_training does")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved configuration as JSON and exit (no torch)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, the tiny shape, f32, no bitsandbytes (plain LoRA), 1+1 steps: "
                        "checks construction and the loop where there is no GPU")
    a = p.parse_args(argv)
    for name in ("seq_len", "batch_size", "rank", "steps"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if a.warmup < 0:
        p.error("--warmup must be >= 0")
    if a.dry_run:
        a.shape, a.warmup, a.steps = "tiny", 1, 1
        a.seq_len = min(a.seq_len, 32)
    return a


def resolved(a):
    """The configuration as it will run (what --print-config prints)."""
    shape = dict(SHAPES[a.shape])
    return {
        "shape": a.shape,
        "model_config": shape,
        "seq_len": a.seq_len,
        "batch_size": a.batch_size,
        "lora": {"r": a.rank, "lora_alpha": 2 * a.rank, "lora_dropout": 0.0,
                 "target_modules": "all-linear"},
        "quantization": None if a.dry_run else
        {"quant_type": "nf4", "blocksize": 64, "double_quant": True, "compute_dtype": "bf16"},
        "gradient_checkpointing": not a.no_gradient_checkpointing,
        "attn_implementation": "sdpa",
        "optimizer": "AdamW (torch, dry run)" if a.dry_run else "bnb PagedAdamW32bit",
        "lr": a.lr,
        "warmup": a.warmup,
        "steps": a.steps,
        "upcast_non_quantized": a.upcast,
        "device": "cpu" if a.dry_run else "cuda",
    }


def hf_config(shape):
    import transformers
    s = dict(shape)
    arch = s.pop("arch")
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config}[arch]
    return cls(**s, hidden_act="silu", use_cache=False)


def build_model(a, device, dtype):
    """Random weights of the real shapes, built directly on `device` in `dtype`; then (unless
    dry run) every decoder Linear is replaced by a bnb Linear4bit holding its NF4 quantization
    (QB 64, double quant): the layout `from_pretrained(load_in_4bit=...)` produces."""
    import torch
    import transformers
    cfg = hf_config(SHAPES[a.shape])
    torch.manual_seed(a.seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    finally:
        torch.set_default_dtype(prev)
    model.config.use_cache = False
    if not a.dry_run:
        import bitsandbytes as bnb
        quantize_linears(model, bnb, torch)
    return model


def quantize_linears(model, bnb, torch):
    import torch.nn as nn
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or child is model.get_output_embeddings():
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features,
                                  bias=child.bias is not None, compute_dtype=torch.bfloat16,
                                  compress_statistics=True, quant_type="nf4",
                                  device="meta")
            q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False,
                                         compress_statistics=True, quant_type="nf4",
                                         blocksize=64, module=q)
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data, requires_grad=False)
            q = q.to(child.weight.device)  # Params4bit quantizes on its move to the GPU
            setattr(parent, name, q)
            del child
    model.is_loaded_in_4bit = True
    torch.cuda.empty_cache()


def main(argv=None):
    a = parse_args(argv)
    conf = resolved(a)
    if a.print_config:
        print(json.dumps(conf, indent=2))
        return 0
    import torch
    import peft
    device = "cpu" if a.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("hf_bench: no CUDA device (use --dry-run on a CPU machine)", file=sys.stderr)
        return 1
    dtype = torch.float32 if a.dry_run else torch.bfloat16
    t_build = time.perf_counter()
    model = build_model(a, device, dtype)
    if a.upcast:
        for p in model.parameters():
            if p.dtype in (torch.float16, torch.bfloat16) and type(p).__name__ != "Params4bit":
                p.data = p.data.to(torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    if not a.no_gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lcfg = peft.LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0,
                           target_modules="all-linear", task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lcfg)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    params = [p for p in model.parameters() if p.requires_grad]
    if a.dry_run:
        opt = torch.optim.AdamW(params, lr=a.lr)
    else:
        import bitsandbytes as bnb
        opt = bnb.optim.PagedAdamW32bit(params, lr=a.lr)
    build_s = time.perf_counter() - t_build

    g = torch.Generator(device="cpu").manual_seed(a.seed + 2)
    ids = torch.randint(0, SHAPES[a.shape]["vocab_size"], (a.batch_size, a.seq_len),
                        generator=g).to(device)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.detach()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(a.warmup):
        step()
    sync()
    losses = []
    t0 = time.perf_counter()
    for _ in range(a.steps):
        losses.append(step())
    sync()
    elapsed = time.perf_counter() - t0
    losses = [float(x) for x in losses]
    tokens = a.batch_size * a.seq_len
    res = {
        "impl": "transformers+peft+bitsandbytes" if not a.dry_run else "transformers+peft (dry run)",
        "shape": a.shape, "seq_len": a.seq_len, "batch_size": a.batch_size, "rank": a.rank,
        "gradient_checkpointing": not a.no_gradient_checkpointing, "upcast": a.upcast,
        "trainable_params": trainable, "steps": a.steps, "warmup": a.warmup,
        "ms_per_step": 1e3 * elapsed / a.steps,
        "tokens_per_s": tokens * a.steps / elapsed,
        "first_loss": losses[0], "last_loss": losses[-1], "build_s": build_s,
        "versions": {"torch": torch.__version__, "peft": peft.__version__,
                     "transformers": __import__("transformers").__version__},
    }
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        res.update({
            "max_memory_allocated": torch.cuda.max_memory_allocated(),
            "max_memory_reserved": torch.cuda.max_memory_reserved(),
            "device_used_after": total - free,
            "device": torch.cuda.get_device_name(),
        })
        import bitsandbytes as bnb
        res["versions"]["bitsandbytes"] = bnb.__version__
    gib = 1 << 30
    print(f"hf_bench: {a.shape} B {a.batch_size} x T {a.seq_len}, r {a.rank}, "
          f"{trainable} trainable, {a.steps} timed steps after {a.warmup} warm-up")
    print(f"tokens/s {res['tokens_per_s']:.1f}   ms/step {res['ms_per_step']:.2f}   "
          f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    if device == "cuda":
        print(f"peak memory: allocated {res['max_memory_allocated'] / gib:.2f} GiB, reserved "
              f"{res['max_memory_reserved'] / gib:.2f} GiB, device used (cudaMemGetInfo) "
              f"{res['device_used_after'] / gib:.2f} GiB")
    print("HF_BENCH_JSON " + json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
