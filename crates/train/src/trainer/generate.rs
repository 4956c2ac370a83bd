//! Text generation with the KV cache (`qlora generate`): prefill the prompt once, then one
//! position per new token; greedy at temperature 0, else sampling from softmax(logits / T)
//! with a seeded SplitMix64 (reproducible).

use serde_json::json;

use super::error::{Result, TrainerError};
use crate::cpu::CpuBackend;
use crate::data::{SplitMix64, Tokenizer};
use crate::model::Model;
use crate::schedule::{forward_logits, Adapter, KvCache};

/// Settings of [`generate`].
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// 0 = greedy (argmax).
    pub temperature: f64,
    pub seed: u64,
    /// Render the prompt as one user turn with the chat template.
    pub chat: bool,
    /// Keep the cache (false: recompute the whole sequence per token; for checking the cache).
    pub use_cache: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 64,
            temperature: 0.0,
            seed: 0,
            chat: false,
            use_cache: true,
        }
    }
}

/// The result of [`generate`].
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    pub new_ids: Vec<u32>,
    /// Decoded new tokens (special tokens skipped).
    pub text: String,
    /// Stopped at an end token (else at `max_new_tokens` or the context limit).
    pub stopped: bool,
}

/// The prompt's token ids: as a chat turn (template, no post-processor) or plain text (with
/// the post-processor, e.g. `<s>`).
pub fn prompt_ids(tok: &Tokenizer, prompt: &str, chat: bool) -> Result<Vec<u32>> {
    let enc = if chat {
        let text = tok.apply_chat_template(&[json!({"role": "user", "content": prompt})], true)?;
        tok.encode(&text, false)
    } else {
        tok.encode(prompt, true)
    }
    .map_err(|e| TrainerError::config("prompt", format!("tokenizer: {e}")))?;
    if enc.ids.is_empty() {
        return Err(TrainerError::config("prompt", "tokenizes to nothing"));
    }
    Ok(enc.ids)
}

fn pick(logits: &[f32], temperature: f64, rng: &mut SplitMix64) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |b, (i, &x)| {
                if x > b.1 {
                    (i, x)
                } else {
                    b
                }
            })
            .0 as u32
    };
    if temperature <= 0.0 {
        return argmax();
    }
    let m = logits.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x)) as f64;
    let w: Vec<f64> = logits
        .iter()
        .map(|&x| ((x as f64 - m) / temperature).exp())
        .collect();
    let total: f64 = w.iter().sum();
    // Uniform in [0, 1) from the top 53 bits.
    let mut u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * total;
    for (i, &x) in w.iter().enumerate() {
        if u < x {
            return i as u32;
        }
        u -= x;
    }
    argmax()
}

/// Generates after `prompt_ids`; `on_text` receives each newly decoded piece as it appears.
pub fn generate(
    be: &CpuBackend,
    model: &Model<CpuBackend>,
    adapter: Option<&Adapter<CpuBackend>>,
    tok: &Tokenizer,
    prompt_ids: &[u32],
    opts: &GenerateOptions,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation> {
    if !(opts.temperature.is_finite() && opts.temperature >= 0.0) {
        return Err(TrainerError::config(
            "temperature",
            format!("{} (must be >= 0)", opts.temperature),
        ));
    }
    let max_pos = model.config.max_position_embeddings;
    if prompt_ids.len() >= max_pos {
        return Err(TrainerError::config(
            "prompt",
            format!(
                "{} tokens leave no room in the model's {max_pos} positions",
                prompt_ids.len()
            ),
        ));
    }
    let budget = opts.max_new_tokens.min(max_pos - prompt_ids.len());
    let v = model.config.vocab_size;
    let stops = tok.stop_ids().to_vec();
    let mut rng = SplitMix64::new(opts.seed);
    let mut cache = KvCache::new(be, model, 1, prompt_ids.len() + budget);
    let mut ids = prompt_ids.to_vec();
    let mut new_ids = Vec::new();
    let mut shown = String::new();
    let mut stopped = false;
    // Prefill: the whole prompt once.
    let logits = if opts.use_cache {
        forward_logits(be, model, adapter, &ids, 1, ids.len(), Some(&mut cache))?
    } else {
        forward_logits(be, model, adapter, &ids, 1, ids.len(), None)?
    };
    let mut last = logits[(ids.len() - 1) * v..].to_vec();
    for _ in 0..budget {
        let next = pick(&last, opts.temperature, &mut rng);
        if stops.contains(&next) {
            stopped = true;
            break;
        }
        ids.push(next);
        new_ids.push(next);
        // Decode everything so far and emit the new suffix (byte-level BPE pieces only form
        // valid text together).
        let text = tok
            .decode(&new_ids, true)
            .map_err(|e| TrainerError::config("tokenizer", e))?;
        if text.len() > shown.len() && text.starts_with(&shown) {
            on_text(&text[shown.len()..]);
            shown = text;
        }
        if new_ids.len() == budget {
            break;
        }
        last = if opts.use_cache {
            forward_logits(be, model, adapter, &[next], 1, 1, Some(&mut cache))?
        } else {
            let l = forward_logits(be, model, adapter, &ids, 1, ids.len(), None)?;
            l[(ids.len() - 1) * v..].to_vec()
        };
    }
    let text = tok
        .decode(&new_ids, true)
        .map_err(|e| TrainerError::config("tokenizer", e))?;
    Ok(Generation {
        prompt_ids: prompt_ids.to_vec(),
        new_ids,
        text,
        stopped,
    })
}
