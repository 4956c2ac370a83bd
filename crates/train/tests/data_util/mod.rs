//! Helpers shared by the `data_*` integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use qlora_train::data::{DataConfig, Dataset, Tokenizer};

/// `crates/train/tests/fixtures/data/<name>`.
pub fn data_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/data")
        .join(name)
}

/// The repository's `tests/fixtures/<name>` (the reference fixtures).
pub fn repo_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

pub fn tiny_tokenizer() -> Tokenizer {
    Tokenizer::from_model_dir(repo_fixture("tiny-llama")).unwrap()
}

/// Writes `content` to `dir/name` and returns the path.
pub fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

/// Loads JSONL `content` through a temporary file.
pub fn load_str(
    content: &str,
    tok: &Tokenizer,
    cfg: &DataConfig,
) -> Result<Dataset, qlora_train::data::DataError> {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "d.jsonl", content);
    Dataset::load(&p, tok, cfg)
}
