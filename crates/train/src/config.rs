//! `config.json` of the Llama family (`LlamaForCausalLM`, `MistralForCausalLM`,
//! `Qwen2ForCausalLM`) in both the transformers 4 and 5 spellings.
//!
//! transformers 5 writes rope settings as `rope_parameters: {rope_theta, rope_type, ...}` and the
//! dtype as `dtype`; transformers 4 writes top-level `rope_theta`, `rope_scaling: {type|rope_type,
//! ...}` and `torch_dtype`. Both are read; anything whose math this crate does not implement
//! (another architecture, an unknown rope type, an enabled sliding window, a non-SiLU MLP) is
//! refused by name rather than silently computed wrong.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Result, TrainError};

/// How rotary frequencies are derived from `rope_theta`.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// `inv_freq[i] = theta^(-2i/D)`.
    Default,
    /// Positions divided by `factor` (equivalently `inv_freq / factor`).
    Linear { factor: f64 },
    /// Llama 3.1's piecewise scaling (transformers `_compute_llama3_parameters`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// Which family member: decides bias defaults and naming in messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
}

/// The model hyper-parameters the schedule needs.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    /// C
    pub hidden_size: usize,
    /// I
    pub intermediate_size: usize,
    pub num_layers: usize,
    /// H
    pub num_heads: usize,
    /// Hkv
    pub num_kv_heads: usize,
    /// D
    pub head_dim: usize,
    /// V
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    /// Biases on q/k/v (Qwen2: always; Llama: `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama `attention_bias`).
    pub o_bias: bool,
    /// Biases on gate/up/down (Llama `mlp_bias`).
    pub mlp_bias: bool,
    /// `lm_head.weight` is `model.embed_tokens.weight`.
    pub tie_word_embeddings: bool,
    /// The checkpoint's dtype string (`dtype` or `torch_dtype`), e.g. "bfloat16".
    pub dtype: Option<String>,
    /// `quantization_config` is a bitsandbytes 4-bit block.
    pub bnb_4bit: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

fn get<'a>(o: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    o.get(key).filter(|v| !v.is_null())
}

fn req_usize(p: &Path, o: &Map<String, Value>, key: &str) -> Result<usize> {
    match get(o, key) {
        None => Err(TrainError::config(p, key, "required but missing")),
        Some(v) => v
            .as_u64()
            .filter(|&n| n > 0)
            .map(|n| n as usize)
            .ok_or_else(|| {
                TrainError::config(p, key, format!("expected a positive integer, got {v}"))
            }),
    }
}

fn opt_usize(p: &Path, o: &Map<String, Value>, key: &str) -> Result<Option<usize>> {
    match get(o, key) {
        None => Ok(None),
        Some(_) => req_usize(p, o, key).map(Some),
    }
}

fn opt_f64(p: &Path, o: &Map<String, Value>, key: &str) -> Result<Option<f64>> {
    match get(o, key) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|x| x.is_finite())
            .map(Some)
            .ok_or_else(|| TrainError::config(p, key, format!("expected a number, got {v}"))),
    }
}

fn opt_bool(p: &Path, o: &Map<String, Value>, key: &str) -> Result<Option<bool>> {
    match get(o, key) {
        None => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .ok_or_else(|| TrainError::config(p, key, format!("expected true/false, got {v}"))),
    }
}

/// `bos_token_id`/`eos_token_id` may be an int or a list (Llama 3.1 instruct): take the first.
fn opt_token(o: &Map<String, Value>, key: &str) -> Option<u32> {
    match get(o, key)? {
        Value::Number(n) => n.as_u64().map(|x| x as u32),
        Value::Array(a) => a.first().and_then(|v| v.as_u64()).map(|x| x as u32),
        _ => None,
    }
}

impl ModelConfig {
    /// Read `<dir>/config.json`.
    pub fn from_dir(dir: &Path) -> Result<ModelConfig> {
        Self::from_file(&dir.join("config.json"))
    }

    /// Read a config.json file.
    pub fn from_file(path: &Path) -> Result<ModelConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parse config.json text; `path` is used in messages only.
    pub fn from_json_str(text: &str, path: &Path) -> Result<ModelConfig> {
        let v: Value = serde_json::from_str(text).map_err(|source| TrainError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        let o = v
            .as_object()
            .ok_or_else(|| TrainError::config(path, "<root>", "expected a JSON object"))?;
        Self::from_map(o, path)
    }

    fn from_map(o: &Map<String, Value>, p: &Path) -> Result<ModelConfig> {
        let model_type = get(o, "model_type").and_then(|v| v.as_str()).unwrap_or("");
        let archs: Vec<&str> = get(o, "architectures")
            .and_then(|v| v.as_array())
            .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
            .unwrap_or_default();
        let arch = match (model_type, archs.first().copied()) {
            ("llama", None | Some("LlamaForCausalLM")) => Arch::Llama,
            ("mistral", None | Some("MistralForCausalLM")) => Arch::Mistral,
            ("qwen2", None | Some("Qwen2ForCausalLM")) => Arch::Qwen2,
            ("", Some("LlamaForCausalLM")) => Arch::Llama,
            ("", Some("MistralForCausalLM")) => Arch::Mistral,
            ("", Some("Qwen2ForCausalLM")) => Arch::Qwen2,
            (mt, a) => {
                return Err(TrainError::unsupported(
                    p,
                    format!(
                        "architecture {} (model_type \"{mt}\"); supported: LlamaForCausalLM, \
                         MistralForCausalLM, Qwen2ForCausalLM",
                        a.unwrap_or("<none>")
                    ),
                ))
            }
        };
        if let Some(act) = get(o, "hidden_act").and_then(|v| v.as_str()) {
            if act != "silu" {
                return Err(TrainError::unsupported(
                    p,
                    format!("hidden_act \"{act}\" (only \"silu\" is implemented)"),
                ));
            }
        }
        if let Some(tp) = opt_usize(p, o, "pretraining_tp")? {
            // pretraining_tp > 1 only changes how transformers slices the matmuls (same math).
            let _ = tp;
        }
        // Sliding window: Mistral enables it whenever `sliding_window` is set; Qwen2 only with
        // `use_sliding_window: true`. Its mask differs from the causal mask past the window.
        let sw = opt_usize(p, o, "sliding_window")?;
        let sw_enabled = match arch {
            Arch::Qwen2 => opt_bool(p, o, "use_sliding_window")?.unwrap_or(false) && sw.is_some(),
            _ => opt_bool(p, o, "use_sliding_window")?.unwrap_or(true) && sw.is_some(),
        };
        if sw_enabled {
            return Err(TrainError::unsupported(
                p,
                format!(
                    "sliding_window {} (sliding-window attention is not implemented)",
                    sw.unwrap_or(0)
                ),
            ));
        }

        let hidden_size = req_usize(p, o, "hidden_size")?;
        let num_heads = req_usize(p, o, "num_attention_heads")?;
        let num_kv_heads = opt_usize(p, o, "num_key_value_heads")?.unwrap_or(num_heads);
        if num_heads % num_kv_heads != 0 {
            return Err(TrainError::config(
                p,
                "num_key_value_heads",
                format!("{num_kv_heads} does not divide num_attention_heads {num_heads}"),
            ));
        }
        let head_dim = match opt_usize(p, o, "head_dim")? {
            Some(d) => d,
            None => {
                if hidden_size % num_heads != 0 {
                    return Err(TrainError::config(
                        p,
                        "hidden_size",
                        format!("{hidden_size} not divisible by num_attention_heads {num_heads}"),
                    ));
                }
                hidden_size / num_heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(TrainError::config(
                p,
                "head_dim",
                format!("{head_dim} is odd; rope needs even"),
            ));
        }

        // Rope: transformers 5 `rope_parameters`, else transformers 4 `rope_theta`+`rope_scaling`.
        let (rope_theta, rope_obj) = match get(o, "rope_parameters") {
            Some(Value::Object(rp)) => {
                let theta = opt_f64(p, rp, "rope_theta")?
                    .or(opt_f64(p, o, "rope_theta")?)
                    .unwrap_or(10000.0);
                (theta, Some(rp))
            }
            Some(other) => {
                return Err(TrainError::config(
                    p,
                    "rope_parameters",
                    format!("expected an object, got {other}"),
                ))
            }
            None => {
                let theta = opt_f64(p, o, "rope_theta")?.unwrap_or(10000.0);
                match get(o, "rope_scaling") {
                    Some(Value::Object(rs)) => (theta, Some(rs)),
                    Some(other) => {
                        return Err(TrainError::config(
                            p,
                            "rope_scaling",
                            format!("expected an object or null, got {other}"),
                        ))
                    }
                    None => (theta, None),
                }
            }
        };
        let rope_scaling = match rope_obj {
            None => RopeScaling::Default,
            Some(r) => {
                let ty = get(r, "rope_type")
                    .or_else(|| get(r, "type"))
                    .and_then(|v| v.as_str())
                    .unwrap_or("default");
                let factor = |key: &str| -> Result<f64> {
                    opt_f64(p, r, key)?.ok_or_else(|| {
                        TrainError::config(p, key, format!("required for rope_type \"{ty}\""))
                    })
                };
                match ty {
                    "default" => RopeScaling::Default,
                    "linear" => RopeScaling::Linear {
                        factor: factor("factor")?,
                    },
                    "llama3" => RopeScaling::Llama3 {
                        factor: factor("factor")?,
                        low_freq_factor: factor("low_freq_factor")?,
                        high_freq_factor: factor("high_freq_factor")?,
                        original_max_position_embeddings: factor(
                            "original_max_position_embeddings",
                        )?,
                    },
                    other => {
                        return Err(TrainError::unsupported(
                            p,
                            format!("rope_type \"{other}\" (implemented: default, linear, llama3)"),
                        ))
                    }
                }
            }
        };

        let attention_bias = opt_bool(p, o, "attention_bias")?.unwrap_or(false);
        let (qkv_bias, o_bias) = match arch {
            Arch::Qwen2 => (true, false),
            _ => (attention_bias, attention_bias),
        };
        let mlp_bias = opt_bool(p, o, "mlp_bias")?.unwrap_or(false);
        let dtype = get(o, "dtype")
            .or_else(|| get(o, "torch_dtype"))
            .and_then(|v| v.as_str())
            .map(str::to_string);
        let bnb_4bit = match get(o, "quantization_config") {
            None => false,
            Some(Value::Object(q)) => {
                let method = get(q, "quant_method")
                    .and_then(|v| v.as_str())
                    .unwrap_or("");
                let four = opt_bool(p, q, "load_in_4bit")?.unwrap_or(false)
                    || opt_bool(p, q, "_load_in_4bit")?.unwrap_or(false);
                let qt = get(q, "bnb_4bit_quant_type")
                    .and_then(|v| v.as_str())
                    .unwrap_or("fp4");
                if method != "bitsandbytes" || !four || qt != "nf4" {
                    return Err(TrainError::unsupported(
                        p,
                        format!(
                            "quantization_config (quant_method \"{method}\", load_in_4bit {four}, \
                             bnb_4bit_quant_type \"{qt}\"); only bitsandbytes 4-bit nf4 is read"
                        ),
                    ));
                }
                true
            }
            Some(other) => {
                return Err(TrainError::config(
                    p,
                    "quantization_config",
                    format!("expected an object, got {other}"),
                ))
            }
        };

        Ok(ModelConfig {
            arch,
            hidden_size,
            intermediate_size: req_usize(p, o, "intermediate_size")?,
            num_layers: req_usize(p, o, "num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: req_usize(p, o, "vocab_size")?,
            max_position_embeddings: opt_usize(p, o, "max_position_embeddings")?.unwrap_or(2048),
            rms_norm_eps: opt_f64(p, o, "rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            qkv_bias,
            o_bias,
            mlp_bias,
            tie_word_embeddings: opt_bool(p, o, "tie_word_embeddings")?.unwrap_or(false),
            dtype,
            bnb_4bit,
            bos_token_id: opt_token(o, "bos_token_id"),
            eos_token_id: opt_token(o, "eos_token_id"),
        })
    }

    /// A synthetic Llama config (random-weight benchmarks and tests).
    pub fn synthetic_llama(
        hidden_size: usize,
        intermediate_size: usize,
        num_layers: usize,
        num_heads: usize,
        num_kv_heads: usize,
        vocab_size: usize,
    ) -> ModelConfig {
        ModelConfig {
            arch: Arch::Llama,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim: hidden_size / num_heads,
            vocab_size,
            max_position_embeddings: 4096,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: RopeScaling::Default,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            tie_word_embeddings: false,
            dtype: Some("float32".into()),
            bnb_4bit: false,
            bos_token_id: Some(1),
            eos_token_id: Some(2),
        }
    }

    /// Rotary inverse frequencies `(D/2,)`, in f64, as transformers computes them
    /// (`1 / theta^(2i/D)`, then the rope-type rewrite). Callers round to their dtype.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim;
        // transformers computes inv_freq in f32: round the base frequencies to f32 first so the
        // f32 CPU path sees the same values.
        let base: Vec<f64> = (0..d / 2)
            .map(|i| (1.0 / self.rope_theta.powf((2 * i) as f64 / d as f64)) as f32 as f64)
            .collect();
        match &self.rope_scaling {
            RopeScaling::Default => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                // wavelen > old/low: scale by 1/factor; wavelen < old/high: keep;
                // between: interpolate with smooth = (old/wavelen - low) / (high - low).
                let low_wl = old / low_freq_factor;
                let high_wl = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wl = 2.0 * std::f64::consts::PI / f;
                        let scaled = if wl > low_wl { f / factor } else { f };
                        let medium = wl >= high_wl && wl <= low_wl;
                        if medium {
                            let smooth =
                                (old / wl - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        } else {
                            scaled
                        }
                    })
                    .collect()
            }
        }
    }

    /// Total parameters of the base model (as transformers counts an unquantized model).
    pub fn base_param_count(&self) -> usize {
        let (c, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let qd = self.num_heads * self.head_dim;
        let kd = self.num_kv_heads * self.head_dim;
        let mut per_layer = 2 * c + c * qd + 2 * c * kd + qd * c + 3 * c * i;
        if self.qkv_bias {
            per_layer += qd + 2 * kd;
        }
        if self.o_bias {
            per_layer += c;
        }
        if self.mlp_bias {
            per_layer += 2 * i + c;
        }
        let lm = if self.tie_word_embeddings { 0 } else { v * c };
        v * c + lm + c + self.num_layers * per_layer
    }
}
