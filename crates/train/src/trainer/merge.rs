//! `merge`: fold an adapter into its base and write a plain Hugging Face checkpoint
//! (PEFT `merge_and_unload`): every targeted projection becomes `W' = deq(W) + S·B·A`
//! (`deq` = NF4 dequantization for a 4-bit base, identity for a dense one), modules_to_save
//! copies replace their base module, and the 4-bit `quantization_config` is dropped from
//! config.json. Re-quantizing the merged weight is not done (lossy; peft.md §1).

use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::Dtype;
use serde_json::Value;

use super::checkpoint::{publish_dir, staging_dir};
use super::error::{Result, TrainerError};
use crate::cpu::CpuBackend;
use crate::lora::{merge_into, AdapterWeights, Proj, SavedModule};
use crate::model::{BaseFormat, Model};
use crate::st::{write_atomic, OutTensor};
use crate::Backend;

/// Output dtype of the merged weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MergeDtype {
    F32,
    BF16,
    F16,
}

impl MergeDtype {
    /// The name transformers writes as `dtype` in config.json.
    pub fn torch_name(self) -> &'static str {
        match self {
            MergeDtype::F32 => "float32",
            MergeDtype::BF16 => "bfloat16",
            MergeDtype::F16 => "float16",
        }
    }
}

/// What [`merge`] wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct MergeReport {
    pub output: PathBuf,
    /// LoRA pairs folded in.
    pub merged_projections: usize,
    /// modules_to_save copies that replaced base modules.
    pub replaced_modules: Vec<String>,
    pub tensors: usize,
}

fn out_tensor(name: String, shape: Vec<usize>, data: &[f32], dtype: MergeDtype) -> OutTensor {
    match dtype {
        MergeDtype::F32 => OutTensor::f32(name, shape, data),
        MergeDtype::BF16 => OutTensor {
            name,
            dtype: Dtype::BF16,
            shape,
            bytes: data
                .iter()
                .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
                .collect(),
        },
        MergeDtype::F16 => OutTensor {
            name,
            dtype: Dtype::F16,
            shape,
            bytes: data
                .iter()
                .flat_map(|&x| f16::from_f32(x).to_le_bytes())
                .collect(),
        },
    }
}

/// Tokenizer and generation files copied beside the merged weights when present.
const SIDE_FILES: [&str; 6] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    "tokenizer.model",
];

/// Merges `adapter_dir` into the model at `model_dir`, writing `output` (staged beside it and
/// renamed into place; an existing `output` is refused unless `force`).
pub fn merge(
    model_dir: &Path,
    adapter_dir: &Path,
    output: &Path,
    dtype: MergeDtype,
    force: bool,
) -> Result<MergeReport> {
    if output.exists() && !force {
        return Err(TrainerError::config(
            "output",
            format!("{} exists (pass --force to replace it)", output.display()),
        ));
    }
    let be = CpuBackend::<f32>::new();
    // A bitsandbytes checkpoint loads as NF4 whatever is asked; a dense one stays dense.
    let model = Model::load(&be, model_dir, BaseFormat::Dense)?;
    let w = AdapterWeights::load(adapter_dir, &model.config)?;
    let cfg = &model.config;
    let (c, v) = (cfg.hidden_size, cfg.vocab_size);
    let saved = |m: SavedModule| w.layout.saved_slot(m).map(|s| &w.data[s.range()]);
    let mut tensors = Vec::new();
    let mut replaced = Vec::new();
    let embed = match saved(SavedModule::EmbedTokens) {
        Some(x) => {
            replaced.push("embed_tokens".to_string());
            x.to_vec()
        }
        None => model.embed.to_f32(&be),
    };
    tensors.push(out_tensor(
        "model.embed_tokens.weight".into(),
        vec![v, c],
        &embed,
        dtype,
    ));
    let mut merged = 0;
    for (l, layer) in model.layers.iter().enumerate() {
        for (name, norm) in [
            ("input_layernorm", &layer.attn_norm),
            ("post_attention_layernorm", &layer.mlp_norm),
        ] {
            tensors.push(out_tensor(
                format!("model.layers.{l}.{name}.weight"),
                vec![c],
                &be.download(norm),
                dtype,
            ));
        }
        for p in Proj::ALL {
            let lin = &layer.proj[p.index()];
            let mut wt = be.frozen_to_f32(&lin.w);
            if let Some(slot) = w.layout.slot(l, p) {
                merge_into(&mut wt, slot, &w.data);
                merged += 1;
            }
            tensors.push(out_tensor(
                format!("{}.weight", p.module_path(l)),
                vec![lin.out_features, lin.in_features],
                &wt,
                dtype,
            ));
            if let Some(b) = &lin.bias {
                tensors.push(out_tensor(
                    format!("{}.bias", p.module_path(l)),
                    vec![lin.out_features],
                    &be.download(b),
                    dtype,
                ));
            }
        }
    }
    tensors.push(out_tensor(
        "model.norm.weight".into(),
        vec![c],
        &be.download(&model.norm),
        dtype,
    ));
    match saved(SavedModule::LmHead) {
        Some(x) => {
            replaced.push("lm_head".to_string());
            tensors.push(out_tensor("lm_head.weight".into(), vec![v, c], x, dtype));
        }
        None if !cfg.tie_word_embeddings => tensors.push(out_tensor(
            "lm_head.weight".into(),
            vec![v, c],
            &be.frozen_to_f32(&model.lm_head.w),
            dtype,
        )),
        None => {}
    }

    let tmp = staging_dir(output)?;
    write_atomic(&tmp.join("model.safetensors"), &tensors, true)?;
    let cpath = model_dir.join("config.json");
    let text = std::fs::read_to_string(&cpath).map_err(|e| TrainerError::io(&cpath, e))?;
    let mut json: Value = serde_json::from_str(&text).map_err(|e| TrainError::Json {
        path: cpath.clone(),
        source: e,
    })?;
    if let Some(obj) = json.as_object_mut() {
        obj.remove("quantization_config");
        obj.insert("dtype".into(), Value::from(dtype.torch_name()));
        if obj.contains_key("torch_dtype") {
            obj.insert("torch_dtype".into(), Value::from(dtype.torch_name()));
        }
    }
    let out_cfg = tmp.join("config.json");
    std::fs::write(
        &out_cfg,
        serde_json::to_string_pretty(&json).expect("json value"),
    )
    .map_err(|e| TrainerError::io(&out_cfg, e))?;
    for f in SIDE_FILES {
        let src = model_dir.join(f);
        if src.is_file() {
            std::fs::copy(&src, tmp.join(f)).map_err(|e| TrainerError::io(&src, e))?;
        }
    }
    publish_dir(&tmp, output)?;
    Ok(MergeReport {
        output: output.to_path_buf(),
        merged_projections: merged,
        replaced_modules: replaced,
        tensors: tensors.len(),
    })
}

use crate::error::TrainError;
