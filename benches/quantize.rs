//! NF4 quantize/dequantize throughput (issue 2 §6). Prints numbers; asserts nothing.
//!
//!   cargo bench --bench quantize              # all cases
//!   QLORA_BENCH_1B=0 cargo bench --bench quantize   # skip the ~1B-parameter checkpoint
//!
//! Cases: one 14336×4096 bf16 weight (Llama-3-8B down_proj), quantize (NF4 + double quant)
//! and dequantize to bf16, with 1 thread and all threads; then `quantize_model_dir` over a
//! synthetic ~1B-parameter bf16 checkpoint written to disk, with peak RSS (VmHWM).

use half::bf16;
use qlora_nf4::convert::{quantize_model_dir, QuantizeOptions};
use qlora_nf4::quant::FloatData;
use qlora_nf4::{Dtype, Nf4Tensor};
use std::time::Instant;

/// Weight-like values (≈ N(0, 0.02)) from a fixed-seed xorshift, as bf16 bytes.
fn synthetic_bf16(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed | 1;
    let mut out = Vec::with_capacity(2 * n);
    for _ in 0..n {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        // Sum of 4 uniforms ≈ normal (Irwin–Hall), scaled to std 0.02.
        let u = (0..4)
            .map(|k| ((s >> (16 * k)) & 0xffff) as f32 / 65535.0)
            .sum::<f32>()
            - 2.0;
        out.extend(bf16::from_f32(u * 0.02 / 0.577).to_bits().to_le_bytes());
    }
    out
}

fn best_of<T>(reps: usize, mut f: impl FnMut() -> T) -> (f64, T) {
    let mut best = f64::INFINITY;
    let mut last = None;
    for _ in 0..reps {
        let t = Instant::now();
        let r = f();
        best = best.min(t.elapsed().as_secs_f64());
        last = Some(r);
    }
    (best, last.unwrap())
}

fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

fn main() {
    let all = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (rows, cols) = (14336usize, 4096usize);
    let n = rows * cols;
    let bytes = synthetic_bf16(n, 42);
    println!("# NF4 quantize/dequantize, {rows}×{cols} bf16 weight ({:.1} M params, {:.1} MB), blocksize 64, double quant", n as f64 / 1e6, bytes.len() as f64 / 1e6);
    println!(
        "{:<28} {:>8} {:>10} {:>12} {:>10}",
        "case", "threads", "ms", "M params/s", "GB/s in"
    );
    for threads in [1, all] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let (t, q) = best_of(3, || {
                Nf4Tensor::quantize_data(
                    "w",
                    FloatData::Bytes(Dtype::BF16, &bytes),
                    &[rows, cols],
                    64,
                    true,
                    Dtype::BF16,
                )
                .unwrap()
            });
            println!(
                "{:<28} {:>8} {:>10.1} {:>12.1} {:>10.2}",
                "quantize bf16→nf4+dq",
                threads,
                t * 1e3,
                n as f64 / t / 1e6,
                bytes.len() as f64 / t / 1e9
            );
            let (t, _) = best_of(3, || q.dequantize_bf16());
            println!(
                "{:<28} {:>8} {:>10.1} {:>12.1} {:>10.2}",
                "dequantize →bf16 (new Vec)",
                threads,
                t * 1e3,
                n as f64 / t / 1e6,
                q.packed.len() as f64 / t / 1e9
            );
            let mut buf = vec![bf16::ZERO; n];
            let (t, _) = best_of(5, || q.dequantize_into(&mut buf).unwrap());
            println!(
                "{:<28} {:>8} {:>10.1} {:>12.1} {:>10.2}",
                "dequantize →bf16 (reused)",
                threads,
                t * 1e3,
                n as f64 / t / 1e6,
                q.packed.len() as f64 / t / 1e9
            );
        });
    }
    drop(bytes);

    if std::env::var("QLORA_BENCH_1B").as_deref() == Ok("0") {
        return;
    }
    // A synthetic Llama-shaped ~1B checkpoint: hidden 2048, intermediate 5632, 22 layers,
    // vocab 32000 (TinyLlama-1.1B's shape), bf16, on disk in shards of ≤ 2 GB.
    // The synthetic model is deterministic; it is kept under target/ between runs (2.2 GB).
    let dir = tempfile::tempdir().unwrap();
    let model =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-synthetic-1b");
    let cached = model.join("model.safetensors.index.json").exists();
    std::fs::create_dir_all(&model).unwrap();
    let (c, i, l, v, heads, kv) = (2048usize, 5632usize, 22usize, 32000usize, 32usize, 4usize);
    let d = c / heads;
    let cfg = serde_json::json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": c, "intermediate_size": i,
        "num_hidden_layers": l, "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": v, "dtype": "bfloat16",
        "rms_norm_eps": 1e-5, "max_position_embeddings": 2048, "tie_word_embeddings": false});
    std::fs::write(model.join("config.json"), cfg.to_string()).unwrap();
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![v, c]),
        ("lm_head.weight".into(), vec![v, c]),
        ("model.norm.weight".into(), vec![c]),
    ];
    for layer in 0..l {
        let p = format!("model.layers.{layer}");
        for (name, shape) in [
            ("self_attn.q_proj", vec![c, c]),
            ("self_attn.k_proj", vec![kv * d, c]),
            ("self_attn.v_proj", vec![kv * d, c]),
            ("self_attn.o_proj", vec![c, c]),
            ("mlp.gate_proj", vec![i, c]),
            ("mlp.up_proj", vec![i, c]),
            ("mlp.down_proj", vec![c, i]),
        ] {
            shapes.push((format!("{p}.{name}.weight"), shape));
        }
        shapes.push((format!("{p}.input_layernorm.weight"), vec![c]));
        shapes.push((format!("{p}.post_attention_layernorm.weight"), vec![c]));
    }
    let total: usize = shapes
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    let largest = shapes
        .iter()
        .map(|(_, s)| 2 * s.iter().product::<usize>())
        .max()
        .unwrap();
    let t = Instant::now();
    if !cached {
        let mut shard = Vec::new();
        let mut shard_bytes = 0usize;
        let mut files: Vec<String> = Vec::new();
        let mut weight_map = serde_json::Map::new();
        let flush =
            |shard: &mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
             files: &mut Vec<String>,
             weight_map: &mut serde_json::Map<String, serde_json::Value>| {
                let name = format!("model-{:05}.safetensors", files.len() + 1);
                qlora_nf4::write_safetensors(&model.join(&name), shard, None).unwrap();
                for t in shard.iter() {
                    weight_map.insert(t.0.clone(), name.clone().into());
                }
                files.push(name);
                shard.clear();
            };
        for (k, (name, shape)) in shapes.iter().enumerate() {
            let numel: usize = shape.iter().product();
            let data = if name.contains("norm") {
                bf16::ONE.to_bits().to_le_bytes().repeat(numel)
            } else {
                synthetic_bf16(numel, k as u64 + 7)
            };
            shard_bytes += data.len();
            shard.push((name.clone(), Dtype::BF16, shape.clone(), data));
            if shard_bytes > 2_000_000_000 {
                flush(&mut shard, &mut files, &mut weight_map);
                shard_bytes = 0;
            }
        }
        flush(&mut shard, &mut files, &mut weight_map);
        std::fs::write(
            model.join("model.safetensors.index.json"),
            serde_json::json!({"metadata": {}, "weight_map": weight_map}).to_string(),
        )
        .unwrap();
    }
    let files: Vec<_> = std::fs::read_dir(&model)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "safetensors")
        })
        .collect();
    println!("\n# quantize_model_dir: synthetic {:.2} B-param bf16 checkpoint ({} shards, written in {:.1} s), largest tensor {:.0} MB", total as f64 / 1e9, files.len(), t.elapsed().as_secs_f64(), largest as f64 / 1e6);
    println!(
        "{:<28} {:>8} {:>10} {:>12} {:>10}",
        "case", "threads", "s", "M params/s", "GB/s in"
    );
    for threads in [1, all] {
        reset_peak_rss();
        let rss_before = current_rss_bytes();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let out = dir.path().join(format!("q{threads}"));
        let s =
            pool.install(|| quantize_model_dir(&model, &out, &QuantizeOptions::default()).unwrap());
        println!(
            "{:<28} {:>8} {:>10.2} {:>12.1} {:>10.2}",
            "quantize checkpoint",
            threads,
            s.seconds,
            s.params_total as f64 / s.seconds / 1e6,
            s.bytes_in as f64 / s.seconds / 1e9
        );
        std::fs::remove_dir_all(&out).unwrap();
        if let (Some(before), Some(peak)) = (rss_before, peak_rss_bytes()) {
            println!("{:<28} {:>8} peak RSS {:.0} MB above the {:.0} MB resident before = {:.2}× the largest tensor ({:.0} MB)", "", threads, (peak - before) as f64 / 1e6, before as f64 / 1e6, (peak - before) as f64 / largest as f64, largest as f64 / 1e6);
        }
    }
}

/// Reset VmHWM to the current RSS (Linux: writing 5 to clear_refs).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn current_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}
