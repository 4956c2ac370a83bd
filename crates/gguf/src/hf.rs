//! From a `llama` GGUF file to the Hugging Face `LlamaForCausalLM` layout: hyper-parameters
//! (`config.json`), tensor names, shapes and the Q/K row order.
//!
//! Shapes: ggml stores `ne[0]` as the fastest dimension, so a PyTorch weight of shape
//! `[out, in]` appears with dims `[in, out]`; the row-major data are identical, only the dims
//! list is reversed.
//!
//! Q/K rows: llama.cpp's `convert_hf_to_gguf.py` rewrites the rows of `q_proj` and `k_proj`
//! (weights and biases) with
//! ```python
//! def permute(w, n_head, n_head_kv):
//!     if n_head_kv is not None and n_head != n_head_kv: n_head = n_head_kv
//!     return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
//! ```
//! (called with `(n_head, n_head)` for Q and `(n_head, n_head_kv)` for K), turning HF's
//! rotate-half RoPE layout (the two halves of each head) into ggml's interleaved pairs. With D
//! the head dim and row `h·D + i·D/2 + j` (i ∈ {0, 1}, j < D/2) of HF, the GGUF row is
//! `h·D + 2j + i`. [`unpermute_rows`] applies the inverse.

use serde_json::{json, Value as Json};

use crate::error::{GgufError, Result};
use crate::reader::GgufFile;

/// Element type of the written `model.safetensors`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutDtype {
    F32,
    BF16,
}

impl OutDtype {
    /// The name transformers uses in `config.json` (`dtype`).
    pub fn torch_name(self) -> &'static str {
        match self {
            OutDtype::F32 => "float32",
            OutDtype::BF16 => "bfloat16",
        }
    }
}

/// The hyper-parameters of a Llama model, read from `llama.*` and `tokenizer.ggml.*` keys.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaHparams {
    /// V
    pub vocab_size: usize,
    /// C
    pub hidden_size: usize,
    /// I
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    /// H
    pub num_attention_heads: usize,
    /// Hkv
    pub num_key_value_heads: usize,
    /// D
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// No `output.weight`: the LM head is the embedding matrix.
    pub tie_word_embeddings: bool,
    /// `attn_q.bias` etc. present.
    pub attention_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
}

/// GGUF stores hyper-parameter floats as f32; the HF configs they came from were written as
/// short decimals (1e-05, 100000.0). The shortest decimal that rounds to the same f32 recovers
/// that value instead of printing 9.999999747378752e-06.
fn f32_to_decimal(x: f32) -> f64 {
    format!("{x}").parse::<f64>().unwrap_or(x as f64)
}

impl LlamaHparams {
    /// Read and check the hyper-parameters. Refuses other architectures, MoE, RoPE scaling and
    /// partial rotary embeddings by name rather than writing a config that would misbehave.
    pub fn from_gguf(f: &GgufFile) -> Result<LlamaHparams> {
        let path = f.path().to_path_buf();
        let arch = f.str("general.architecture")?;
        if arch != "llama" {
            return Err(GgufError::UnsupportedArchitecture {
                path,
                arch: arch.to_string(),
            });
        }
        let unsupported = |what: &str, reason: String| GgufError::Unsupported {
            path: path.clone(),
            what: what.to_string(),
            reason,
        };
        let bad = |key: &str, reason: String| GgufError::Metadata {
            path: path.clone(),
            key: key.to_string(),
            reason,
        };
        let usize_key = |key: &str| -> Result<usize> {
            let v = f.u64(key)?;
            usize::try_from(v)
                .ok()
                .filter(|&v| v > 0)
                .ok_or_else(|| bad(key, format!("expected a positive size, found {v}")))
        };
        if let Some(n) = f.get_u64("llama.expert_count")? {
            if n > 0 {
                return Err(unsupported(
                    "mixture of experts",
                    format!("llama.expert_count = {n}"),
                ));
            }
        }
        if let Some(t) = f.get_str("llama.rope.scaling.type")? {
            if t != "none" {
                return Err(unsupported(
                    "RoPE scaling",
                    format!("llama.rope.scaling.type = {t:?}"),
                ));
            }
        }
        if f.tensor("rope_freqs.weight").is_some() {
            return Err(unsupported(
                "RoPE frequency factors (tensor `rope_freqs.weight`, Llama-3.1-style rope scaling)",
                "the converter writes plain RoPE only".into(),
            ));
        }

        let hidden_size = usize_key("llama.embedding_length")?;
        let num_attention_heads = usize_key("llama.attention.head_count")?;
        let num_key_value_heads = match f.get_u64("llama.attention.head_count_kv")? {
            None => num_attention_heads,
            Some(_) => usize_key("llama.attention.head_count_kv")?,
        };
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(bad(
                "llama.attention.head_count_kv",
                format!("{num_key_value_heads} does not divide head_count {num_attention_heads}"),
            ));
        }
        let head_dim = match f.get_u64("llama.attention.key_length")? {
            Some(_) => usize_key("llama.attention.key_length")?,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(bad(
                        "llama.attention.head_count",
                        format!(
                            "{num_attention_heads} does not divide embedding_length {hidden_size}"
                        ),
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        if let Some(vl) = f.get_u64("llama.attention.value_length")? {
            if vl as usize != head_dim {
                return Err(unsupported(
                    "different key and value head sizes",
                    format!("key {head_dim}, value {vl}"),
                ));
            }
        }
        if let Some(rd) = f.get_u64("llama.rope.dimension_count")? {
            if rd as usize != head_dim {
                return Err(unsupported(
                    "partial rotary embeddings",
                    format!("llama.rope.dimension_count = {rd}, head dim {head_dim}"),
                ));
            }
        }
        if head_dim % 2 != 0 {
            return Err(bad(
                "llama.attention.key_length",
                format!("head dim {head_dim} is odd; RoPE needs pairs"),
            ));
        }

        let emb = f
            .tensor("token_embd.weight")
            .ok_or_else(|| GgufError::Tensor {
                path: path.clone(),
                tensor: "token_embd.weight".into(),
                reason: "missing".into(),
            })?;
        // Without `llama.vocab_size` the embedding's row count is the vocabulary size (it may be
        // padded beyond the token list, so the token count is not used).
        let vocab_size = match f.get_u64("llama.vocab_size")? {
            Some(_) => usize_key("llama.vocab_size")?,
            None => emb.dims.get(1).copied().unwrap_or(0) as usize,
        };

        let rms = f
            .get_f32("llama.attention.layer_norm_rms_epsilon")?
            .ok_or_else(|| GgufError::MissingKey {
                path: path.clone(),
                key: "llama.attention.layer_norm_rms_epsilon".into(),
            })?;
        // llama.cpp's default base when the key is absent (llama-model.cpp: 10000).
        let theta = f.get_f32("llama.rope.freq_base")?.unwrap_or(10000.0);
        let token_id = |key: &str| -> Result<Option<u32>> {
            match f.get_u64(key)? {
                None => Ok(None),
                Some(v) if (v as usize) < vocab_size => Ok(Some(v as u32)),
                Some(v) => Err(bad(
                    key,
                    format!("id {v} is outside the vocabulary of {vocab_size}"),
                )),
            }
        };
        Ok(LlamaHparams {
            vocab_size,
            hidden_size,
            intermediate_size: usize_key("llama.feed_forward_length")?,
            num_hidden_layers: usize_key("llama.block_count")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings: usize_key("llama.context_length")?,
            rms_norm_eps: f32_to_decimal(rms),
            rope_theta: f32_to_decimal(theta),
            tie_word_embeddings: f.tensor("output.weight").is_none(),
            attention_bias: f.tensor("blk.0.attn_q.bias").is_some(),
            bos_token_id: token_id("tokenizer.ggml.bos_token_id")?,
            eos_token_id: token_id("tokenizer.ggml.eos_token_id")?,
            pad_token_id: token_id("tokenizer.ggml.padding_token_id")?,
        })
    }

    /// `config.json` of `LlamaForCausalLM`. Rope theta is written both in the transformers 5
    /// form (`rope_parameters`) and the older top-level `rope_theta`, so either reader finds it.
    pub fn config_json(&self, dtype: OutDtype) -> Json {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "dtype": dtype.torch_name(),
            "eos_token_id": self.eos_token_id,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "mlp_bias": false,
            "model_type": "llama",
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "pad_token_id": self.pad_token_id,
            "pretraining_tp": 1,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_cache": true,
            "vocab_size": self.vocab_size,
        })
    }

    /// `generation_config.json`: the special ids only (GGUF carries no sampling defaults).
    pub fn generation_config_json(&self) -> Json {
        let mut g = json!({
            "_from_model_config": true,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        });
        if let Some(p) = self.pad_token_id {
            g["pad_token_id"] = json!(p);
        }
        g
    }
}

/// One tensor of the HF checkpoint and where it comes from.
#[derive(Clone, Debug, PartialEq)]
pub struct HfTensor {
    /// Name in the GGUF file, e.g. `blk.3.attn_q.weight`.
    pub gguf_name: String,
    /// Name in the HF checkpoint, e.g. `model.layers.3.self_attn.q_proj.weight`.
    pub hf_name: String,
    /// Row-major HF shape (the ggml dims reversed).
    pub shape: Vec<usize>,
    /// `Some(n_head)` for Q/K weights and biases, whose rows must be un-permuted with that many
    /// heads (H for Q, Hkv for K).
    pub unpermute_heads: Option<usize>,
}

/// The HF name of a GGUF tensor name (`None` for names outside the Llama layout).
pub fn hf_name(gguf_name: &str) -> Option<String> {
    let fixed = match gguf_name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(n) = fixed {
        return Some(n.to_string());
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    // Llama's `attention_bias` puts biases on the four attention projections only.
    if suffix == "bias" && !matches!(module, "attn_q" | "attn_k" | "attn_v" | "attn_output") {
        return None;
    }
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// Check every tensor of the file against the Llama layout and the hyper-parameters, and list
/// the HF tensors to write (in GGUF file order). Unknown names, wrong shapes, unsupported
/// ggml types, missing tensors and out-of-range layers are refused by name.
pub fn plan_tensors(f: &GgufFile, hp: &LlamaHparams) -> Result<Vec<HfTensor>> {
    let (c, i, v, d) = (
        hp.hidden_size,
        hp.intermediate_size,
        hp.vocab_size,
        hp.head_dim,
    );
    let (q_rows, kv_rows) = (hp.num_attention_heads * d, hp.num_key_value_heads * d);
    let err = |tensor: &str, reason: String| GgufError::Tensor {
        path: f.path().to_path_buf(),
        tensor: tensor.to_string(),
        reason,
    };
    let mut out = Vec::new();
    for t in f.tensors() {
        let hf = hf_name(&t.name).ok_or_else(|| {
            err(
                &t.name,
                "not part of the Llama layout this converter knows (refusing rather than dropping it)"
                    .into(),
            )
        })?;
        if t.ty.block_layout().is_none() {
            return Err(GgufError::UnsupportedType {
                path: f.path().to_path_buf(),
                tensor: t.name.clone(),
                ty: t.ty.name(),
            });
        }
        let module = t
            .name
            .strip_prefix("blk.")
            .and_then(|r| r.split_once('.'))
            .map(|(layer, rest)| (layer.parse::<usize>().unwrap_or(usize::MAX), rest));
        if let Some((layer, _)) = module {
            if layer >= hp.num_hidden_layers {
                return Err(err(
                    &t.name,
                    format!(
                        "layer {layer} but llama.block_count is {}",
                        hp.num_hidden_layers
                    ),
                ));
            }
        }
        let local = module.map(|(_, r)| r).unwrap_or(&t.name);
        let (expected, heads): (Vec<usize>, Option<usize>) = match local {
            "token_embd.weight" | "output.weight" => (vec![v, c], None),
            "output_norm.weight" | "attn_norm.weight" | "ffn_norm.weight" => (vec![c], None),
            "attn_q.weight" => (vec![q_rows, c], Some(hp.num_attention_heads)),
            "attn_k.weight" => (vec![kv_rows, c], Some(hp.num_key_value_heads)),
            "attn_v.weight" => (vec![kv_rows, c], None),
            "attn_output.weight" => (vec![c, q_rows], None),
            "attn_q.bias" => (vec![q_rows], Some(hp.num_attention_heads)),
            "attn_k.bias" => (vec![kv_rows], Some(hp.num_key_value_heads)),
            "attn_v.bias" => (vec![kv_rows], None),
            "attn_output.bias" => (vec![c], None),
            "ffn_gate.weight" | "ffn_up.weight" => (vec![i, c], None),
            "ffn_down.weight" => (vec![c, i], None),
            other => return Err(err(&t.name, format!("unexpected module `{other}`"))),
        };
        if t.shape() != expected {
            return Err(err(
                &t.name,
                format!(
                    "shape {:?} (ggml dims {:?}) but the hyper-parameters give {expected:?}",
                    t.shape(),
                    t.dims
                ),
            ));
        }
        out.push(HfTensor {
            gguf_name: t.name.clone(),
            hf_name: hf,
            shape: expected,
            unpermute_heads: heads,
        });
    }
    // Everything a Llama forward needs must be present.
    let mut required = vec!["token_embd.weight".to_string(), "output_norm.weight".into()];
    for l in 0..hp.num_hidden_layers {
        for m in [
            "attn_norm",
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_norm",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        ] {
            required.push(format!("blk.{l}.{m}.weight"));
        }
        if hp.attention_bias {
            for m in ["attn_q", "attn_k", "attn_v"] {
                required.push(format!("blk.{l}.{m}.bias"));
            }
        }
    }
    for r in required {
        if f.tensor(&r).is_none() {
            return Err(err(&r, "missing from the file".into()));
        }
    }
    Ok(out)
}

/// Inverse of llama.cpp's Q/K `permute` (module docs): `rows × cols` row-major `w` with
/// `n_head` heads of `rows / n_head` rows; GGUF row `h·D + 2j + i` goes to HF row
/// `h·D + i·D/2 + j`.
pub fn unpermute_rows(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let d = rows / n_head;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for i in 0..2 {
            for j in 0..d / 2 {
                let src = h * d + 2 * j + i;
                let dst = h * d + i * (d / 2) + j;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// llama.cpp's forward `permute` (HF row `h·D + i·D/2 + j` → GGUF row `h·D + 2j + i`), for
/// writing GGUF files from HF weights (tests, tools).
pub fn permute_rows(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let d = rows / n_head;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for i in 0..2 {
            for j in 0..d / 2 {
                let src = h * d + i * (d / 2) + j;
                let dst = h * d + 2 * j + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// A `llama` GGUF file opened as a Hugging Face model: checked hyper-parameters and the list of
/// HF tensors, each loaded on demand (dequantized to f32, Q/K rows restored). Lets a caller
/// stream tensors into another format (e.g. NF4) without materializing the whole model.
pub struct GgufModel {
    pub file: GgufFile,
    pub hparams: LlamaHparams,
    pub tensors: Vec<HfTensor>,
}

impl GgufModel {
    pub fn open(path: &std::path::Path) -> Result<GgufModel> {
        let file = GgufFile::open(path)?;
        let hparams = LlamaHparams::from_gguf(&file)?;
        let tensors = plan_tensors(&file, &hparams)?;
        Ok(GgufModel {
            file,
            hparams,
            tensors,
        })
    }

    /// The HF tensor's values: `shape` row-major f32.
    pub fn load(&self, t: &HfTensor) -> Result<Vec<f32>> {
        let w = self.file.tensor_f32(&t.gguf_name)?;
        Ok(match t.unpermute_heads {
            None => w,
            Some(n_head) => {
                let rows = t.shape[0];
                let cols = t.shape.get(1).copied().unwrap_or(1);
                unpermute_rows(&w, rows, cols, n_head)
            }
        })
    }
}
