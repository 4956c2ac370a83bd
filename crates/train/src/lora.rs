//! LoRA exactly as PEFT (`/work/shared/specs/peft.md`): configuration, which modules are
//! targeted, per-module rank/alpha, initialisation, the flat parameter arena, and reading and
//! writing the PEFT adapter format (`adapter_config.json` + `adapter_model.safetensors`).
//!
//! All trainable tensors of an adapter live in one flat f32 arena (`AdapterWeights::data`),
//! sliced per tensor by an [`AdapterLayout`]; the gradients use an arena of the same layout.
//! The optimizer therefore sees one contiguous vector.

use std::path::Path;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};

use crate::config::ModelConfig;
use crate::error::{Result, TrainError};
use crate::st;

/// The seven projections of a Llama decoder layer, in schedule order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];
    /// Index into `Proj::ALL`.
    pub fn index(self) -> usize {
        self as usize
    }
    /// `q_proj`, …, `down_proj`.
    pub fn name(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }
    /// `self_attn` or `mlp`.
    pub fn parent(self) -> &'static str {
        match self {
            Proj::Q | Proj::K | Proj::V | Proj::O => "self_attn",
            _ => "mlp",
        }
    }
    /// Module path inside `LlamaForCausalLM`, e.g. `model.layers.3.self_attn.q_proj`
    /// (what PEFT matches `target_modules` against).
    pub fn module_path(self, layer: usize) -> String {
        format!("model.layers.{layer}.{}.{}", self.parent(), self.name())
    }
    /// `(in_features, out_features)` of this projection.
    pub fn dims(self, c: &ModelConfig) -> (usize, usize) {
        let qd = c.num_heads * c.head_dim;
        let kd = c.num_kv_heads * c.head_dim;
        match self {
            Proj::Q => (c.hidden_size, qd),
            Proj::K | Proj::V => (c.hidden_size, kd),
            Proj::O => (qd, c.hidden_size),
            Proj::Gate | Proj::Up => (c.hidden_size, c.intermediate_size),
            Proj::Down => (c.intermediate_size, c.hidden_size),
        }
    }
}

/// `target_modules` as PEFT accepts it.
#[derive(Clone, Debug, PartialEq)]
pub enum TargetModules {
    /// Module-name suffixes (or full paths): `key == t || key.ends_with("." + t)`.
    List(Vec<String>),
    /// One string: a regex that must match the whole module path (`re.fullmatch`).
    Regex(String),
    /// `"all-linear"`: the seven projections of every layer, never `lm_head`.
    AllLinear,
}

/// `init_lora_weights`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraInit {
    /// `true`: A ~ kaiming-uniform(a=√5) = U(-1/√in, 1/√in), B = 0.
    Default,
    /// `"gaussian"`: A ~ N(0, (1/r)²), B = 0.
    Gaussian,
    /// `false`: both as `nn.Linear` initialises them: A ~ U(-1/√in, 1/√in), B ~ U(-1/√r, 1/√r).
    Random,
}

/// `modules_to_save` entries this crate can train in full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SavedModule {
    LmHead,
    EmbedTokens,
}

impl SavedModule {
    /// The PEFT name used in `modules_to_save`.
    pub fn name(self) -> &'static str {
        match self {
            SavedModule::LmHead => "lm_head",
            SavedModule::EmbedTokens => "embed_tokens",
        }
    }
    /// Key in `adapter_model.safetensors`.
    pub fn peft_key(self) -> &'static str {
        match self {
            SavedModule::LmHead => "base_model.model.lm_head.weight",
            SavedModule::EmbedTokens => "base_model.model.model.embed_tokens.weight",
        }
    }
    /// `(rows, cols)` = `(V, C)` for both.
    pub fn dims(self, c: &ModelConfig) -> (usize, usize) {
        (c.vocab_size, c.hidden_size)
    }
}

/// A LoRA configuration (PEFT `LoraConfig`, the subset this crate implements).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    /// scale = alpha/√r instead of alpha/r.
    pub use_rslora: bool,
    pub target_modules: TargetModules,
    /// Only in the suffix-list branch of targeting (as PEFT): restrict to these layer indices.
    pub layers_to_transform: Option<Vec<usize>>,
    /// Per-module rank overrides, in file order: (pattern, r).
    pub rank_pattern: Vec<(String, usize)>,
    /// Per-module alpha overrides, in file order: (pattern, alpha).
    pub alpha_pattern: Vec<(String, f64)>,
    pub init: LoraInit,
    pub modules_to_save: Vec<SavedModule>,
    /// Written to `base_model_name_or_path`.
    pub base_model_name_or_path: Option<String>,
}

impl Default for LoraConfig {
    /// PEFT's defaults for llama (`r` 8, alpha 8, q_proj and v_proj).
    fn default() -> Self {
        LoraConfig {
            r: 8,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            use_rslora: false,
            target_modules: TargetModules::List(vec!["q_proj".into(), "v_proj".into()]),
            layers_to_transform: None,
            rank_pattern: Vec::new(),
            alpha_pattern: Vec::new(),
            init: LoraInit::Default,
            modules_to_save: Vec::new(),
            base_model_name_or_path: None,
        }
    }
}

/// PEFT `get_pattern_key`: an exact key first, else the first pattern `p` with
/// `re.match(r"(.*\.)?(p)$", key)`.
fn pattern_lookup<'a, T>(pats: &'a [(String, T)], key: &str) -> Result<Option<&'a T>> {
    if let Some((_, v)) = pats.iter().find(|(p, _)| p == key) {
        return Ok(Some(v));
    }
    for (p, v) in pats {
        let re = regex::Regex::new(&format!(r"^(?:.*\.)?(?:{p})$")).map_err(|e| {
            TrainError::config(
                "adapter_config.json",
                "rank_pattern/alpha_pattern",
                format!("regex `{p}`: {e}"),
            )
        })?;
        if re.is_match(key) {
            return Ok(Some(v));
        }
    }
    Ok(None)
}

impl LoraConfig {
    /// Does PEFT put a LoRA on `proj` of `layer`? (`check_target_module_exists`.)
    pub fn targets(&self, layer: usize, proj: Proj) -> Result<bool> {
        let key = proj.module_path(layer);
        Ok(match &self.target_modules {
            TargetModules::AllLinear => true,
            TargetModules::Regex(re) => regex::Regex::new(&format!("^(?:{re})$"))
                .map_err(|e| {
                    TrainError::config(
                        "adapter_config.json",
                        "target_modules",
                        format!("regex `{re}`: {e}"),
                    )
                })?
                .is_match(&key),
            TargetModules::List(list) => {
                if list.contains(&key) {
                    true
                } else {
                    let found = list.iter().any(|t| key.ends_with(&format!(".{t}")));
                    match &self.layers_to_transform {
                        Some(ls) if found && !ls.is_empty() => ls.contains(&layer),
                        _ => found,
                    }
                }
            }
        })
    }

    /// `(r, alpha)` for one module after `rank_pattern` / `alpha_pattern`.
    pub fn rank_alpha(&self, layer: usize, proj: Proj) -> Result<(usize, f64)> {
        let key = proj.module_path(layer);
        let r = pattern_lookup(&self.rank_pattern, &key)?
            .copied()
            .unwrap_or(self.r);
        let a = pattern_lookup(&self.alpha_pattern, &key)?
            .copied()
            .unwrap_or(self.lora_alpha);
        Ok((r, a))
    }

    /// S = alpha/r, or alpha/√r with rsLoRA.
    pub fn scale(&self, r: usize, alpha: f64) -> f64 {
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }

    fn check(&self, path: &Path) -> Result<()> {
        if self.r == 0 {
            return Err(TrainError::config(path, "r", "must be > 0"));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(TrainError::config(
                path,
                "lora_dropout",
                format!("{} not in [0, 1)", self.lora_dropout),
            ));
        }
        if let Some((p, _)) = self.rank_pattern.iter().find(|(_, r)| *r == 0) {
            return Err(TrainError::config(
                path,
                "rank_pattern",
                format!("`{p}`: rank 0"),
            ));
        }
        Ok(())
    }

    /// Parse `adapter_config.json` text. Requires `r`, `lora_alpha`, `target_modules`; accepts
    /// unknown keys; refuses the variants this crate does not implement, by name.
    pub fn from_json_str(text: &str, path: &Path) -> Result<LoraConfig> {
        let v: Value = serde_json::from_str(text).map_err(|source| TrainError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        let o = v
            .as_object()
            .ok_or_else(|| TrainError::config(path, "<root>", "expected a JSON object"))?;
        let g = |k: &str| o.get(k).filter(|v| !v.is_null());
        if let Some(pt) = g("peft_type") {
            if pt.as_str() != Some("LORA") {
                return Err(TrainError::unsupported(
                    path,
                    format!("peft_type {pt} (only LORA)"),
                ));
            }
        }
        // Variants that change the math: refuse instead of silently computing plain LoRA.
        for key in [
            "use_dora",
            "lora_bias",
            "use_qalora",
            "fan_in_fan_out",
            "use_bdlora",
        ] {
            if let Some(b) = g(key) {
                if b.as_bool() != Some(false) {
                    return Err(TrainError::unsupported(path, format!("`{key}: {b}`")));
                }
            }
        }
        for key in [
            "layer_replication",
            "target_parameters",
            "trainable_token_indices",
            "exclude_modules",
            "alora_invocation_tokens",
            "megatron_config",
            "eva_config",
            "corda_config",
            "arrow_config",
            "lora_ga_config",
            "monteclora_config",
            "kasa_config",
            "velora_config",
        ] {
            if let Some(x) = g(key) {
                let empty = x.as_object().is_some_and(|m| m.is_empty())
                    || x.as_array().is_some_and(|a| a.is_empty());
                if !empty {
                    return Err(TrainError::unsupported(path, format!("`{key}: {x}`")));
                }
            }
        }
        if let Some(b) = g("bias") {
            if b.as_str() != Some("none") {
                return Err(TrainError::unsupported(
                    path,
                    format!("`bias: {b}` (only \"none\")"),
                ));
            }
        }
        if let Some(lp) = g("layers_pattern") {
            let ok = lp.as_str() == Some("layers")
                || lp
                    .as_array()
                    .is_some_and(|a| a.len() == 1 && a[0].as_str() == Some("layers"));
            if !ok {
                return Err(TrainError::unsupported(
                    path,
                    format!("`layers_pattern: {lp}` (only \"layers\")"),
                ));
            }
        }
        let r = g("r")
            .ok_or_else(|| {
                TrainError::config(path, "r", "required (PEFT would silently default to 8)")
            })?
            .as_u64()
            .ok_or_else(|| TrainError::config(path, "r", "expected a positive integer"))?
            as usize;
        let lora_alpha = g("lora_alpha")
            .ok_or_else(|| {
                TrainError::config(
                    path,
                    "lora_alpha",
                    "required (PEFT would silently default to 8)",
                )
            })?
            .as_f64()
            .ok_or_else(|| TrainError::config(path, "lora_alpha", "expected a number"))?;
        let target_modules = match g("target_modules") {
            None => return Err(TrainError::config(path, "target_modules", "required")),
            Some(Value::String(s)) if s == "all-linear" => TargetModules::AllLinear,
            Some(Value::String(s)) => TargetModules::Regex(s.clone()),
            Some(Value::Array(a)) => TargetModules::List(
                a.iter()
                    .map(|x| {
                        x.as_str().map(str::to_string).ok_or_else(|| {
                            TrainError::config(
                                path,
                                "target_modules",
                                format!("entry {x} is not a string"),
                            )
                        })
                    })
                    .collect::<Result<_>>()?,
            ),
            Some(x) => {
                return Err(TrainError::config(
                    path,
                    "target_modules",
                    format!("expected a list or string, got {x}"),
                ))
            }
        };
        let lora_dropout = match g("lora_dropout") {
            None => 0.0,
            Some(x) => x
                .as_f64()
                .ok_or_else(|| TrainError::config(path, "lora_dropout", "expected a number"))?,
        };
        let use_rslora = match g("use_rslora") {
            None => false,
            Some(x) => x
                .as_bool()
                .ok_or_else(|| TrainError::config(path, "use_rslora", "expected true/false"))?,
        };
        let layers_to_transform = match g("layers_to_transform") {
            None => None,
            Some(Value::Number(n)) => Some(vec![n.as_u64().ok_or_else(|| {
                TrainError::config(path, "layers_to_transform", "expected a layer index")
            })? as usize]),
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|x| {
                        x.as_u64().map(|n| n as usize).ok_or_else(|| {
                            TrainError::config(
                                path,
                                "layers_to_transform",
                                format!("entry {x} is not an index"),
                            )
                        })
                    })
                    .collect::<Result<_>>()?,
            ),
            Some(x) => {
                return Err(TrainError::config(
                    path,
                    "layers_to_transform",
                    format!("got {x}"),
                ))
            }
        };
        let pattern = |key: &str| -> Result<Vec<(String, f64)>> {
            match g(key) {
                None => Ok(Vec::new()),
                Some(Value::Object(m)) => m
                    .iter()
                    .map(|(k, v)| {
                        v.as_f64().map(|x| (k.clone(), x)).ok_or_else(|| {
                            TrainError::config(path, key, format!("`{k}`: {v} is not a number"))
                        })
                    })
                    .collect(),
                Some(x) => Err(TrainError::config(
                    path,
                    key,
                    format!("expected an object, got {x}"),
                )),
            }
        };
        let rank_pattern = pattern("rank_pattern")?
            .into_iter()
            .map(|(k, r)| {
                if r >= 1.0 && r.fract() == 0.0 {
                    Ok((k, r as usize))
                } else {
                    Err(TrainError::config(
                        path,
                        "rank_pattern",
                        format!("`{k}`: {r} is not a rank"),
                    ))
                }
            })
            .collect::<Result<_>>()?;
        let alpha_pattern = pattern("alpha_pattern")?;
        let init = match g("init_lora_weights") {
            None => LoraInit::Default,
            Some(Value::Bool(true)) => LoraInit::Default,
            Some(Value::Bool(false)) => LoraInit::Random,
            Some(Value::String(s)) if s == "gaussian" => LoraInit::Gaussian,
            Some(x) => {
                return Err(TrainError::unsupported(
                    path,
                    format!("`init_lora_weights: {x}` (implemented: true, false, \"gaussian\")"),
                ))
            }
        };
        let modules_to_save = match g("modules_to_save") {
            None => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| match x.as_str() {
                    Some("lm_head") => Ok(SavedModule::LmHead),
                    Some("embed_tokens") => Ok(SavedModule::EmbedTokens),
                    _ => Err(TrainError::unsupported(
                        path,
                        format!("modules_to_save entry {x} (implemented: lm_head, embed_tokens)"),
                    )),
                })
                .collect::<Result<_>>()?,
            Some(x) => {
                return Err(TrainError::config(
                    path,
                    "modules_to_save",
                    format!("expected a list, got {x}"),
                ))
            }
        };
        let cfg = LoraConfig {
            r,
            lora_alpha,
            lora_dropout,
            use_rslora,
            target_modules,
            layers_to_transform,
            rank_pattern,
            alpha_pattern,
            init,
            modules_to_save,
            base_model_name_or_path: g("base_model_name_or_path")
                .and_then(|v| v.as_str())
                .map(str::to_string),
        };
        cfg.check(path)?;
        Ok(cfg)
    }

    /// `adapter_config.json` as PEFT writes it (only keys PEFT ≥ 0.8 knows).
    pub fn to_json(&self) -> Value {
        let targets = match &self.target_modules {
            TargetModules::AllLinear => {
                json!(Proj::ALL.iter().map(|p| p.name()).collect::<Vec<_>>())
            }
            TargetModules::List(l) => json!(l),
            TargetModules::Regex(s) => json!(s),
        };
        let num = |x: f64| -> Value {
            if x.fract() == 0.0 && x.abs() < 1e15 {
                json!(x as i64)
            } else {
                json!(x)
            }
        };
        let mut rp = Map::new();
        for (k, r) in &self.rank_pattern {
            rp.insert(k.clone(), json!(r));
        }
        let mut ap = Map::new();
        for (k, a) in &self.alpha_pattern {
            ap.insert(k.clone(), num(*a));
        }
        let init = match self.init {
            // PEFT re-runs the named init on load, then loads the tensors over it.
            LoraInit::Default => json!(true),
            LoraInit::Gaussian => json!("gaussian"),
            LoraInit::Random => json!(false),
        };
        let mts = if self.modules_to_save.is_empty() {
            Value::Null
        } else {
            json!(self
                .modules_to_save
                .iter()
                .map(|m| m.name())
                .collect::<Vec<_>>())
        };
        json!({
            "alpha_pattern": ap,
            "base_model_name_or_path": self.base_model_name_or_path,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": init,
            "layers_pattern": null,
            "layers_to_transform": self.layers_to_transform,
            "lora_alpha": num(self.lora_alpha),
            "lora_dropout": self.lora_dropout,
            "modules_to_save": mts,
            "peft_type": "LORA",
            "r": self.r,
            "rank_pattern": rp,
            "revision": null,
            "target_modules": targets,
            "task_type": "CAUSAL_LM",
            "use_rslora": self.use_rslora,
        })
    }
}

/// One LoRA pair in the arena: A `(R, in)` at `a_offset`, B `(out, R)` at `b_offset`, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSlot {
    pub layer: usize,
    pub proj: Proj,
    /// R
    pub r: usize,
    pub in_features: usize,
    pub out_features: usize,
    /// S (alpha/r or alpha/√r).
    pub scale: f64,
    pub a_offset: usize,
    pub b_offset: usize,
}

impl LoraSlot {
    /// PEFT key of A (`...lora_A.weight`) or B.
    pub fn peft_key(&self, b: bool) -> String {
        format!(
            "base_model.{}.lora_{}.weight",
            self.proj
                .module_path(self.layer)
                .replacen("model.", "model.model.", 1),
            if b { "B" } else { "A" }
        )
    }
    pub fn a_range(&self) -> std::ops::Range<usize> {
        self.a_offset..self.a_offset + self.r * self.in_features
    }
    pub fn b_range(&self) -> std::ops::Range<usize> {
        self.b_offset..self.b_offset + self.out_features * self.r
    }
}

/// A fully trained copy (`modules_to_save`): `(rows, cols)` f32 at `offset`.
#[derive(Clone, Debug, PartialEq)]
pub struct SavedSlot {
    pub module: SavedModule,
    pub rows: usize,
    pub cols: usize,
    pub offset: usize,
}

impl SavedSlot {
    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.rows * self.cols
    }
}

/// Where every trainable tensor lives in the flat arena. The same layout slices the gradient
/// arena and the optimizer state.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterLayout {
    /// LoRA pairs in (layer, Proj::ALL) order; each A then B, contiguous.
    pub slots: Vec<LoraSlot>,
    /// `by_layer[l][proj.index()]` = index into `slots`.
    pub by_layer: Vec<[Option<usize>; 7]>,
    /// modules_to_save copies, after all LoRA pairs.
    pub saved: Vec<SavedSlot>,
    /// Total f32 elements of the arena.
    pub numel: usize,
}

impl AdapterLayout {
    /// Lay out the arena for `lora` on `model`.
    pub fn new(lora: &LoraConfig, model: &ModelConfig) -> Result<AdapterLayout> {
        let mut slots = Vec::new();
        let mut by_layer = vec![[None; 7]; model.num_layers];
        let mut off = 0;
        for (layer, row) in by_layer.iter_mut().enumerate() {
            for proj in Proj::ALL {
                if !lora.targets(layer, proj)? {
                    continue;
                }
                let (r, alpha) = lora.rank_alpha(layer, proj)?;
                let (inf, outf) = proj.dims(model);
                row[proj.index()] = Some(slots.len());
                slots.push(LoraSlot {
                    layer,
                    proj,
                    r,
                    in_features: inf,
                    out_features: outf,
                    scale: lora.scale(r, alpha),
                    a_offset: off,
                    b_offset: off + r * inf,
                });
                off += r * inf + outf * r;
            }
        }
        let mut saved = Vec::new();
        for &m in &lora.modules_to_save {
            if model.tie_word_embeddings {
                return Err(TrainError::unsupported(
                    "adapter_config.json",
                    format!(
                        "modules_to_save `{}` on a model with tie_word_embeddings (the tied copy \
                         would silently diverge)",
                        m.name()
                    ),
                ));
            }
            if saved.iter().any(|s: &SavedSlot| s.module == m) {
                continue;
            }
            let (rows, cols) = m.dims(model);
            saved.push(SavedSlot {
                module: m,
                rows,
                cols,
                offset: off,
            });
            off += rows * cols;
        }
        if slots.is_empty() && saved.is_empty() {
            return Err(TrainError::config(
                "adapter_config.json",
                "target_modules",
                "matches no module of the model",
            ));
        }
        Ok(AdapterLayout {
            slots,
            by_layer,
            saved,
            numel: off,
        })
    }

    /// The LoRA slot of `proj` in `layer`, if targeted.
    pub fn slot(&self, layer: usize, proj: Proj) -> Option<&LoraSlot> {
        self.by_layer
            .get(layer)
            .and_then(|r| r[proj.index()])
            .map(|i| &self.slots[i])
    }

    /// The modules_to_save copy of `m`, if any.
    pub fn saved_slot(&self, m: SavedModule) -> Option<&SavedSlot> {
        self.saved.iter().find(|s| s.module == m)
    }

    /// Every tensor: (PEFT key, shape, arena range), in arena order.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>, std::ops::Range<usize>)> {
        let mut v = Vec::new();
        for s in &self.slots {
            v.push((s.peft_key(false), vec![s.r, s.in_features], s.a_range()));
            v.push((s.peft_key(true), vec![s.out_features, s.r], s.b_range()));
        }
        for s in &self.saved {
            v.push((
                s.module.peft_key().to_string(),
                vec![s.rows, s.cols],
                s.range(),
            ));
        }
        v
    }
}

/// An adapter on the host: config, layout and the f32 parameter arena `(numel,)`.
#[derive(Clone, Debug)]
pub struct AdapterWeights {
    pub config: LoraConfig,
    pub layout: AdapterLayout,
    /// (numel,) f32, sliced by `layout`.
    pub data: Vec<f32>,
}

/// Uniform in [-bound, bound).
fn uniform(rng: &mut SmallRng, out: &mut [f32], bound: f64) {
    for x in out {
        *x = ((rng.gen::<f64>() * 2.0 - 1.0) * bound) as f32;
    }
}

/// Normal(0, std²) by Box–Muller.
fn normal(rng: &mut SmallRng, out: &mut [f32], std: f64) {
    for x in out {
        let u1: f64 = 1.0 - rng.gen::<f64>(); // (0, 1]
        let u2: f64 = rng.gen();
        *x = (std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32;
    }
}

impl AdapterWeights {
    /// A fresh adapter initialised as PEFT does (`init_lora_weights`), with a seeded RNG
    /// (PEFT's exact torch random stream cannot be reproduced; load `adapter_init` for that).
    /// `saved_init(m)` returns the base weight `(V, C)` that a modules_to_save copy starts from.
    pub fn init(
        config: &LoraConfig,
        model: &ModelConfig,
        seed: u64,
        mut saved_init: impl FnMut(SavedModule) -> Result<Vec<f32>>,
    ) -> Result<AdapterWeights> {
        config.check(Path::new("<lora config>"))?;
        let layout = AdapterLayout::new(config, model)?;
        let mut data = vec![0f32; layout.numel];
        let mut rng = SmallRng::seed_from_u64(seed);
        for s in &layout.slots {
            let a_bound = 1.0 / (s.in_features as f64).sqrt();
            match config.init {
                LoraInit::Default => uniform(&mut rng, &mut data[s.a_range()], a_bound),
                LoraInit::Gaussian => normal(&mut rng, &mut data[s.a_range()], 1.0 / s.r as f64),
                LoraInit::Random => {
                    uniform(&mut rng, &mut data[s.a_range()], a_bound);
                    uniform(&mut rng, &mut data[s.b_range()], 1.0 / (s.r as f64).sqrt());
                }
            }
        }
        for s in &layout.saved {
            let w = saved_init(s.module)?;
            if w.len() != s.rows * s.cols {
                return Err(TrainError::tensor(
                    "<base model>",
                    s.module.name(),
                    format!("has {} elements, expected {}", w.len(), s.rows * s.cols),
                ));
            }
            data[s.range()].copy_from_slice(&w);
        }
        Ok(AdapterWeights {
            config: config.clone(),
            layout,
            data,
        })
    }

    /// Load a PEFT adapter directory for `model`. Every tensor must be placed and none missing.
    pub fn load(dir: &Path, model: &ModelConfig) -> Result<AdapterWeights> {
        let cpath = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cpath).map_err(|e| TrainError::io(&cpath, e))?;
        let config = LoraConfig::from_json_str(&text, &cpath)?;
        let layout = AdapterLayout::new(&config, model).map_err(|e| match e {
            TrainError::Config { key, msg, .. } => TrainError::Config {
                path: cpath.clone(),
                key,
                msg,
            },
            TrainError::Unsupported { what, .. } => TrainError::Unsupported {
                path: cpath.clone(),
                what,
            },
            e => e,
        })?;
        let wpath = dir.join("adapter_model.safetensors");
        let bytes = st::read_bytes(&wpath)?;
        let file = st::parse(&wpath, &bytes)?;
        let expected = layout.tensors();
        let mut data = vec![0f32; layout.numel];
        let mut seen = vec![false; expected.len()];
        for (name, view) in file.tensors() {
            let Some(i) = expected.iter().position(|(k, _, _)| *k == name) else {
                return Err(TrainError::UnplacedTensor {
                    path: wpath,
                    tensor: name,
                    msg: "no targeted module of this model has that name (check \
                          target_modules / layers_to_transform and the model)"
                        .into(),
                });
            };
            let (_, shape, range) = &expected[i];
            if view.shape() != shape.as_slice() {
                return Err(TrainError::tensor(
                    &wpath,
                    &name,
                    format!("shape {:?}, expected {:?}", view.shape(), shape),
                ));
            }
            let v = st::view_to_f32(&wpath, &name, &view)?;
            data[range.clone()].copy_from_slice(&v);
            seen[i] = true;
        }
        if let Some(i) = seen.iter().position(|s| !s) {
            return Err(TrainError::MissingTensor {
                path: wpath,
                tensor: expected[i].0.clone(),
            });
        }
        Ok(AdapterWeights {
            config,
            layout,
            data,
        })
    }

    /// Write `adapter_config.json` and `adapter_model.safetensors` (F32, `{"format": "pt"}`),
    /// each atomically. Creates `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
        let tensors: Vec<st::OutTensor> = self
            .layout
            .tensors()
            .into_iter()
            .map(|(k, shape, r)| st::OutTensor::f32(k, shape, &self.data[r]))
            .collect();
        st::write_atomic(&dir.join("adapter_model.safetensors"), &tensors, true)?;
        let text = serde_json::to_string_pretty(&self.config.to_json()).expect("json value");
        st::write_file_atomic(&dir.join("adapter_config.json"), text.as_bytes())
    }

    /// The tensor stored under a PEFT key.
    pub fn tensor(&self, key: &str) -> Option<&[f32]> {
        self.layout
            .tensors()
            .into_iter()
            .find(|(k, _, _)| k == key)
            .map(|(_, _, r)| &self.data[r])
    }
}

/// Trainable / total parameter counts as PEFT's `print_trainable_parameters` reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamReport {
    pub trainable: usize,
    pub all: usize,
}

impl ParamReport {
    /// PEFT's counting: every base parameter once, plus every adapter tensor (LoRA and
    /// modules_to_save copies — the frozen original stays in the count too). A bitsandbytes
    /// `Params4bit` weight has `ceil(n/2)` packed uint8 elements, which PEFT multiplies by
    /// `2 · element_size` = 2, so an NF4 linear of n elements counts `2·ceil(n/2)` (= n for
    /// even n): PEFT reports the same total for the NF4 and the f32 base.
    pub fn new(model: &ModelConfig, layout: &AdapterLayout, nf4_base: bool) -> ParamReport {
        let mut base = model.base_param_count();
        if nf4_base {
            for proj in Proj::ALL {
                let (i, o) = proj.dims(model);
                let n = i * o;
                base += model.num_layers * (2 * n.div_ceil(2) - n);
            }
        }
        ParamReport {
            trainable: layout.numel,
            all: base + layout.numel,
        }
    }

    /// 100·trainable/all.
    pub fn percent(&self) -> f64 {
        100.0 * self.trainable as f64 / self.all as f64
    }

    /// `trainable params: 18,496 || all params: 150,400 || trainable%: 12.2979`
    pub fn peft_line(&self) -> String {
        format!(
            "trainable params: {} || all params: {} || trainable%: {:.4}",
            thousands(self.trainable),
            thousands(self.all),
            self.percent()
        )
    }
}

fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Merge one LoRA pair into its base weight in place: `W (out, in) += S·B·A`
/// (PEFT `merge_and_unload`; for an NF4 base pass the dequantized weight).
pub fn merge_into(w: &mut [f32], slot: &LoraSlot, params: &[f32]) {
    assert_eq!(w.len(), slot.out_features * slot.in_features);
    crate::cpu::mm_nn(
        w,
        &params[slot.b_range()],
        &params[slot.a_range()],
        slot.out_features,
        slot.in_features,
        slot.r,
        slot.scale as f32,
        true,
    );
}
