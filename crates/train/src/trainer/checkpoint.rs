//! Checkpoints: `<output_dir>/checkpoint-<step>/` holding
//! - `adapter_config.json`, `adapter_model.safetensors`: the adapter (a PEFT directory itself),
//! - `optimizer.bin`: the AdamW state (qlora-optim's format, with its step count),
//! - `trainer_state.json`: [`CheckpointState`] (step, schedule, data position, RNG state, the
//!   run's config and data config, the metric history),
//! - `loss.png`: the curve so far.
//!
//! Written into a hidden sibling directory and renamed into place, so a crash (or `kill -9`)
//! leaves either the previous checkpoint or the new one complete, never a partial one.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::config::TrainConfig;
use super::error::{Result, TrainerError};
use super::metrics::History;
use crate::data::{DataConfig, DataPosition};
use qlora_optim::LrSchedule;

/// Directory name prefix: `checkpoint-<step>`.
pub const CHECKPOINT_PREFIX: &str = "checkpoint-";
/// Version of `trainer_state.json`.
pub(crate) const FORMAT_VERSION: u32 = 1;
pub(crate) const STATE_FILE: &str = "trainer_state.json";
pub(crate) const OPTIMIZER_FILE: &str = "optimizer.bin";

/// `trainer_state.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    pub format_version: u32,
    /// Optimizer steps taken.
    pub step: u64,
    /// Steps the run was planned for (the schedule's length).
    pub total_steps: u64,
    pub schedule: LrSchedule,
    /// Where the data stream continues.
    pub data_position: DataPosition,
    /// The trainer's SplitMix64 state (dropout-mask seeds) after this step.
    pub rng_state: u64,
    pub config: TrainConfig,
    pub data_config: DataConfig,
    pub history: History,
}

/// Reads `dir/trainer_state.json`, checking that the other files are there too.
pub fn load_state(dir: &Path) -> Result<CheckpointState> {
    let bad = |msg: String| TrainerError::Checkpoint {
        path: dir.to_path_buf(),
        msg,
    };
    if !dir.is_dir() {
        return Err(bad("is not a directory".into()));
    }
    for f in [
        STATE_FILE,
        OPTIMIZER_FILE,
        "adapter_config.json",
        "adapter_model.safetensors",
    ] {
        if !dir.join(f).is_file() {
            return Err(bad(format!("{f} is missing (not a qlora checkpoint?)")));
        }
    }
    let p = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&p).map_err(|e| TrainerError::io(&p, e))?;
    let st: CheckpointState =
        serde_json::from_str(&text).map_err(|e| bad(format!("{STATE_FILE}: {e}")))?;
    if st.format_version != FORMAT_VERSION {
        return Err(bad(format!(
            "{STATE_FILE} has format_version {}, this build reads {FORMAT_VERSION}",
            st.format_version
        )));
    }
    Ok(st)
}

/// The checkpoint to resume from for `dir`: `dir` itself when it is a checkpoint, else its
/// `checkpoint-<step>` subdirectory with the highest step (what a run killed at any moment
/// leaves complete: staging directories are hidden and never named like this).
pub fn resolve_checkpoint(dir: &Path) -> Result<PathBuf> {
    if dir.join(STATE_FILE).is_file() {
        return Ok(dir.to_path_buf());
    }
    let entries = std::fs::read_dir(dir).map_err(|e| TrainerError::io(dir, e))?;
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step: u64 = name.strip_prefix(CHECKPOINT_PREFIX)?.parse().ok()?;
            e.path()
                .join(STATE_FILE)
                .is_file()
                .then(|| (step, e.path()))
        })
        .max_by_key(|(step, _)| *step)
        .map(|(_, p)| p)
        .ok_or_else(|| TrainerError::Checkpoint {
            path: dir.to_path_buf(),
            msg: format!("neither a checkpoint nor a directory holding {CHECKPOINT_PREFIX}<step>"),
        })
}

/// Replaces `dst` with the complete directory `tmp` (rename; the old one is removed first,
/// since a directory cannot be renamed over a non-empty one).
pub(crate) fn publish_dir(tmp: &Path, dst: &Path) -> Result<()> {
    if dst.exists() {
        let old = dst.with_extension("old");
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(dst, &old).map_err(|e| TrainerError::io(dst, e))?;
        std::fs::rename(tmp, dst).map_err(|e| TrainerError::io(dst, e))?;
        std::fs::remove_dir_all(&old).map_err(|e| TrainerError::io(&old, e))
    } else {
        std::fs::rename(tmp, dst).map_err(|e| TrainerError::io(dst, e))
    }
}

/// A fresh hidden staging directory beside `dst`.
pub(crate) fn staging_dir(dst: &Path) -> Result<PathBuf> {
    let name = dst
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let tmp = dst.with_file_name(format!(".{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| TrainerError::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| TrainerError::io(&tmp, e))?;
    Ok(tmp)
}
