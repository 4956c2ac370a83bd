//! The frozen base model on a backend: embeddings, norms, the seven projections per layer
//! (frozen, NF4 or dense), biases and `lm_head`.

use std::path::Path;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::backend::{Backend, FrozenWeight};
use crate::config::ModelConfig;
use crate::error::{Result, TrainError};
use crate::lora::{AdapterWeights, Proj};
use crate::weights::{MapSource, WeightSource};
use qlora_nf4::ModelWeights;

/// How the frozen projection weights are held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BaseFormat {
    /// Unquantized, exactly the checkpoint's values widened to f32 (plain LoRA, f32 fixtures).
    Dense,
    /// Quantized to NF4 on load (bitsandbytes' rules, `qlora_nf4`): QLoRA. A bitsandbytes
    /// 4-bit checkpoint is always loaded as stored, whatever is asked here.
    Nf4 {
        blocksize: usize,
        double_quant: bool,
    },
}

impl BaseFormat {
    /// The QLoRA recipe: NF4, blocksize 64, double quantization.
    pub const QLORA: BaseFormat = BaseFormat::Nf4 {
        blocksize: 64,
        double_quant: true,
    };
}

/// One frozen linear: `w (out, in)`, optional `bias (out,)`.
pub struct Linear<B: Backend> {
    pub w: B::Frozen,
    /// (out,) bias when the architecture has one (Qwen2 q/k/v, Llama attention_bias/mlp_bias)
    pub bias: Option<B::Buf>,
    pub in_features: usize,
    pub out_features: usize,
}

/// One decoder layer.
pub struct Layer<B: Backend> {
    /// (C,) input_layernorm weight
    pub attn_norm: B::Buf,
    /// (C,) post_attention_layernorm weight
    pub mlp_norm: B::Buf,
    /// The seven projections, indexed by `Proj::index()`.
    pub proj: Vec<Linear<B>>,
}

/// The frozen input embedding `model.embed_tokens.weight (V, C)`, where the backend keeps it
/// ([`Backend::embedding_on_host`]).
pub enum Embedding<B: Backend> {
    /// (V·C,) a backend buffer.
    Device(B::Buf),
    /// (V·C,) f32 in host memory: the checkpoint's values exactly (bf16/f16 widen exactly);
    /// the backend rounds the gathered rows as it would have rounded the table.
    Host(Vec<f32>),
}

impl<B: Backend> Embedding<B> {
    /// Place a host table where `be` keeps embeddings.
    pub fn new(be: &B, host: Vec<f32>) -> Embedding<B> {
        if be.embedding_on_host() {
            Embedding::Host(host)
        } else {
            Embedding::Device(be.upload(&host))
        }
    }
    /// The table as host f32 `(V·C,)` (for merging and for a trainable copy's initial value).
    pub fn to_f32(&self, be: &B) -> Vec<f32> {
        match self {
            Embedding::Device(b) => be.download(b),
            Embedding::Host(t) => t.clone(),
        }
    }
}

/// Rows `ids` of a row-major `(V, C)` table, each value through `f` (a backend's rounding):
/// `(N·C,)`, or `Err(id)` for the first id outside the table.
pub fn gather_rows<T>(
    table: &[f32],
    ids: &[u32],
    c: usize,
    f: impl Fn(f32) -> T,
) -> std::result::Result<Vec<T>, u32> {
    let mut out = Vec::with_capacity(ids.len() * c);
    for &id in ids {
        let r = id as usize * c;
        let row = table.get(r..r + c).ok_or(id)?;
        out.extend(row.iter().map(|&x| f(x)));
    }
    Ok(out)
}

/// A Llama-family causal LM with frozen weights.
pub struct Model<B: Backend> {
    pub config: ModelConfig,
    /// (V, C) model.embed_tokens.weight
    pub embed: Embedding<B>,
    pub layers: Vec<Layer<B>>,
    /// (C,) model.norm.weight
    pub norm: B::Buf,
    /// (V, C) lm_head (a copy of the embedding when tied).
    pub lm_head: Linear<B>,
    /// The projections are NF4 (quantized on load or read from a bnb 4-bit checkpoint).
    pub nf4_base: bool,
}

fn check_shape(src: &dyn WeightSource, name: &str, want: &[usize]) -> Result<()> {
    let got = src.shape(name)?;
    if got != want {
        return Err(TrainError::tensor(
            src.origin(),
            name,
            format!("shape {got:?}, expected {want:?} from config.json"),
        ));
    }
    Ok(())
}

impl<B: Backend> Model<B> {
    /// Load a model directory (`config.json` + safetensors, single or sharded): f32/bf16/f16
    /// weights held as `format` says, or a bitsandbytes 4-bit checkpoint (NF4 as stored).
    pub fn load(be: &B, dir: &Path, format: BaseFormat) -> Result<Model<B>> {
        let config = ModelConfig::from_dir(dir)?;
        let src = ModelWeights::open(dir)?;
        Self::from_source(be, config, &src, format)
    }

    /// Build from any weight source (checks every shape against the config).
    pub fn from_source(
        be: &B,
        config: ModelConfig,
        src: &dyn WeightSource,
        format: BaseFormat,
    ) -> Result<Model<B>> {
        let c = config.hidden_size;
        let v = config.vocab_size;
        let vec1 = |name: &str, n: usize| -> Result<B::Buf> {
            check_shape(src, name, &[n])?;
            Ok(be.upload(&src.get_f32(name)?))
        };
        check_shape(src, "model.embed_tokens.weight", &[v, c])?;
        let embed_host = src.get_f32("model.embed_tokens.weight")?;
        if config.bnb_4bit
            && !(0..config.num_layers)
                .any(|l| src.is_nf4(&format!("{}.weight", Proj::Q.module_path(l))))
        {
            return Err(TrainError::tensor(
                src.origin(),
                "model.layers.*.weight",
                "config.json has a bitsandbytes quantization_config but no NF4 projection weight",
            ));
        }
        let mut nf4_base = false;
        let mut layers = Vec::with_capacity(config.num_layers);
        for l in 0..config.num_layers {
            let mut proj = Vec::with_capacity(7);
            for p in Proj::ALL {
                let (inf, outf) = p.dims(&config);
                let base = p.module_path(l);
                let wname = format!("{base}.weight");
                let w = if src.is_nf4(&wname) {
                    nf4_base = true;
                    be.frozen(&wname, FrozenWeight::Nf4(src.get_nf4(&wname)?), outf, inf)?
                } else {
                    check_shape(src, &wname, &[outf, inf])?;
                    let data = src.get_f32(&wname)?;
                    match format {
                        BaseFormat::Dense => {
                            be.frozen(&wname, FrozenWeight::Dense(data), outf, inf)?
                        }
                        BaseFormat::Nf4 {
                            blocksize,
                            double_quant,
                        } => {
                            nf4_base = true;
                            // QuantState.dtype = the original weight dtype (dequant output).
                            let dtype = src.dtype(&wname).unwrap_or(qlora_nf4::Dtype::F32);
                            be.quantize_frozen(
                                &wname,
                                data,
                                outf,
                                inf,
                                blocksize,
                                double_quant,
                                dtype,
                            )?
                        }
                    }
                };
                let has_bias = match p {
                    Proj::Q | Proj::K | Proj::V => config.qkv_bias,
                    Proj::O => config.o_bias,
                    _ => config.mlp_bias,
                };
                let bias = if has_bias {
                    Some(vec1(&format!("{base}.bias"), outf)?)
                } else {
                    None
                };
                proj.push(Linear {
                    w,
                    bias,
                    in_features: inf,
                    out_features: outf,
                });
            }
            layers.push(Layer {
                attn_norm: vec1(&format!("model.layers.{l}.input_layernorm.weight"), c)?,
                mlp_norm: vec1(
                    &format!("model.layers.{l}.post_attention_layernorm.weight"),
                    c,
                )?,
                proj,
            });
        }
        let lm_host = if config.tie_word_embeddings {
            embed_host.clone()
        } else {
            check_shape(src, "lm_head.weight", &[v, c])?;
            src.get_f32("lm_head.weight")?
        };
        let embed = Embedding::new(be, embed_host);
        Ok(Model {
            embed,
            layers,
            norm: vec1("model.norm.weight", c)?,
            lm_head: Linear {
                w: be.frozen("lm_head.weight", FrozenWeight::Dense(lm_host), v, c)?,
                bias: None,
                in_features: c,
                out_features: v,
            },
            config,
            nf4_base,
        })
    }

    /// The frozen weight of `proj` in `layer` as f32 `(out·in,)` (NF4: dequantized exactly),
    /// with `adapter`'s LoRA merged in when it targets this projection: `deq(W) + S·B·A`
    /// (PEFT `merge_and_unload`; the input of `qlora merge`).
    pub fn merged_proj_f32(
        &self,
        be: &B,
        layer: usize,
        proj: Proj,
        adapter: Option<&AdapterWeights>,
    ) -> Vec<f32> {
        let mut w = be.frozen_to_f32(&self.layers[layer].proj[proj.index()].w);
        if let Some(slot) = adapter.and_then(|a| a.layout.slot(layer, proj).map(|s| (a, s))) {
            crate::lora::merge_into(&mut w, slot.1, &slot.0.data);
        }
        w
    }

    /// A model with random weights of `config`'s shapes (benchmarks, synthetic tests):
    /// N(0, 0.02²)-like uniform projections, unit norms.
    pub fn random(be: &B, config: ModelConfig, seed: u64, format: BaseFormat) -> Result<Model<B>> {
        random_source(&config, seed).and_then(|src| Self::from_source(be, config, &src, format))
    }
}

/// Random tensors for every name `Model::from_source` reads.
pub fn random_source(config: &ModelConfig, seed: u64) -> Result<MapSource> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut src = MapSource::default();
    let mut put = |name: String, shape: Vec<usize>, bound: f32, ones: bool| {
        let n = shape.iter().product();
        let data: Vec<f32> = if ones {
            (0..n).map(|_| 1.0 + rng.gen_range(-0.1..0.1f32)).collect()
        } else {
            (0..n).map(|_| rng.gen_range(-bound..bound)).collect()
        };
        src.tensors.insert(name, (shape, data));
    };
    let (c, v) = (config.hidden_size, config.vocab_size);
    // uniform(-0.035, 0.035) has std ≈ 0.02 (initializer_range).
    let b = 0.035;
    put("model.embed_tokens.weight".into(), vec![v, c], b, false);
    put("lm_head.weight".into(), vec![v, c], b, false);
    put("model.norm.weight".into(), vec![c], 0.0, true);
    for l in 0..config.num_layers {
        put(
            format!("model.layers.{l}.input_layernorm.weight"),
            vec![c],
            0.0,
            true,
        );
        put(
            format!("model.layers.{l}.post_attention_layernorm.weight"),
            vec![c],
            0.0,
            true,
        );
        for p in Proj::ALL {
            let (i, o) = p.dims(config);
            put(format!("{}.weight", p.module_path(l)), vec![o, i], b, false);
            put(format!("{}.bias", p.module_path(l)), vec![o], b, false);
        }
    }
    Ok(src)
}
