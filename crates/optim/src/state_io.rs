//! Saving and loading the optimizer state mid-run, for bit-identical continuation.
//!
//! Format: a safetensors file. Tensors (only the non-empty ones): `m32` F32 (n32), `v32` F32
//! (n32), `absmax_m` F32 (nblocks), `absmax_v` F32 (nblocks), `m8` U8 (n8), `v8` U8 (n8): the
//! sections of the state arena, little-endian, exactly as in memory. Metadata: one key,
//! `qlora-optim`, holding a JSON object `{"format": "qlora-optim-state", "version": 1, "step":
//! N, "config": {AdamWConfig}, "layout": {ArenaLayout}}` (one key, so the file bytes are
//! deterministic: safetensors writes its metadata map in hash order). Loading requires the same
//! layout and configuration: anything else could not continue bit-identically.

use crate::adamw::AdamWConfig;
use crate::arena::{ArenaLayout, Section, StateArena, StateLayout};
use crate::cpu::AdamW;
use crate::error::{OptimError, Result};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::Path;

const FORMAT: &str = "qlora-optim-state";
const VERSION: u64 = 1;
const META_KEY: &str = "qlora-optim";

#[derive(serde::Serialize, serde::Deserialize)]
struct Meta {
    format: String,
    version: u64,
    step: u64,
    config: AdamWConfig,
    layout: ArenaLayout,
}

fn sections(l: &StateLayout) -> [(&'static str, Section, Dtype); 6] {
    [
        ("m32", l.m32, Dtype::F32),
        ("v32", l.v32, Dtype::F32),
        ("absmax_m", l.absmax_m, Dtype::F32),
        ("absmax_v", l.absmax_v, Dtype::F32),
        ("m8", l.m8, Dtype::U8),
        ("v8", l.v8, Dtype::U8),
    ]
}

impl AdamW {
    /// The state as safetensors bytes (see the module docs), for embedding in a checkpoint.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let bytes = self.state().bytes();
        let mut views = Vec::new();
        for (name, sec, dt) in sections(self.state_layout()) {
            if sec.bytes == 0 {
                continue;
            }
            let data = &bytes[sec.offset..sec.offset + sec.bytes];
            let n = sec.bytes / dt.size();
            let view = safetensors::tensor::TensorView::new(dt, vec![n], data).map_err(|e| {
                OptimError::StateFile {
                    path: "<memory>".into(),
                    what: format!("section {name}: {e}"),
                }
            })?;
            views.push((name, view));
        }
        let meta = Meta {
            format: FORMAT.to_string(),
            version: VERSION,
            step: self.steps(),
            config: self.config().clone(),
            layout: self.layout().clone(),
        };
        let json = serde_json::to_string(&meta).map_err(|e| OptimError::StateFile {
            path: "<memory>".into(),
            what: e.to_string(),
        })?;
        let meta: HashMap<String, String> = [(META_KEY.to_string(), json)].into_iter().collect();
        safetensors::serialize(views, &Some(meta)).map_err(|e| OptimError::StateFile {
            path: "<memory>".into(),
            what: e.to_string(),
        })
    }

    /// Writes the state to `path` atomically (a temporary file beside it, then rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = self.to_bytes()?;
        let tmp = path.with_extension("safetensors.tmp");
        let io = |source| OptimError::Io {
            path: path.to_path_buf(),
            source,
        };
        std::fs::write(&tmp, &bytes).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// Reads a state written by [`AdamW::save`]; `layout` and `config` must be the ones it was
    /// saved with.
    pub fn load(path: &Path, layout: ArenaLayout, config: AdamWConfig) -> Result<AdamW> {
        let bytes = std::fs::read(path).map_err(|source| OptimError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        AdamW::from_bytes(&bytes, path, layout, config)
    }

    /// [`AdamW::load`] from bytes; `origin` names the source in errors.
    pub fn from_bytes(
        bytes: &[u8],
        origin: &Path,
        layout: ArenaLayout,
        config: AdamWConfig,
    ) -> Result<AdamW> {
        let err = |what: String| OptimError::StateFile {
            path: origin.to_path_buf(),
            what,
        };
        let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| err(e.to_string()))?;
        let st = SafeTensors::deserialize(bytes).map_err(|e| err(e.to_string()))?;
        let md = meta.metadata().clone().unwrap_or_default();
        let json = md
            .get(META_KEY)
            .ok_or_else(|| err(format!("metadata key `{META_KEY}` missing")))?;
        let meta: Meta =
            serde_json::from_str(json).map_err(|e| err(format!("metadata `{META_KEY}`: {e}")))?;
        if meta.format != FORMAT {
            return Err(err(format!("metadata `format` is not `{FORMAT}`")));
        }
        if meta.version != VERSION {
            return Err(err(format!(
                "unsupported version {} (expected {VERSION})",
                meta.version
            )));
        }
        let (steps, saved_cfg, saved_layout) = (meta.step, meta.config, meta.layout);
        if saved_cfg != config {
            return Err(err(format!(
                "saved with configuration {saved_cfg:?}, but this run is configured {config:?}"
            )));
        }
        if saved_layout != layout {
            let first = saved_layout
                .tensors()
                .iter()
                .zip(layout.tensors())
                .find(|(a, b)| a != b)
                .map(|(a, b)| format!("saved tensor {a:?} vs this run's {b:?}"))
                .unwrap_or_else(|| {
                    format!(
                        "{} saved tensors (arena {}) vs {} (arena {})",
                        saved_layout.tensors().len(),
                        saved_layout.len(),
                        layout.tensors().len(),
                        layout.len()
                    )
                });
            return Err(err(format!("parameter layout differs: {first}")));
        }
        let sl = StateLayout::new(&layout, &config);
        let mut state = StateArena::zeroed(&sl);
        let buf = state.bytes_mut();
        for (name, sec, dt) in sections(&sl) {
            match st.tensor(name) {
                Ok(t) => {
                    if t.dtype() != dt || t.data().len() != sec.bytes {
                        return Err(err(format!(
                            "tensor `{name}`: {:?} with {} bytes, expected {dt:?} with {}",
                            t.dtype(),
                            t.data().len(),
                            sec.bytes
                        )));
                    }
                    buf[sec.offset..sec.offset + sec.bytes].copy_from_slice(t.data());
                }
                Err(_) if sec.bytes == 0 => {}
                Err(_) => return Err(err(format!("tensor `{name}` missing"))),
            }
        }
        AdamW::from_parts(layout, config, state, steps)
    }
}
