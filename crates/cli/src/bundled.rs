//! The bundled tiny Llama (tests/fixtures/tiny-llama: 2 layers, hidden 64, vocab 320, random
//! weights, byte-level BPE tokenizer), compiled into the binary so the demo needs no download.

use anyhow::{Context, Result};
use std::path::Path;

const FILES: [(&str, &[u8]); 6] = [
    (
        "config.json",
        include_bytes!("../../../tests/fixtures/tiny-llama/config.json"),
    ),
    (
        "generation_config.json",
        include_bytes!("../../../tests/fixtures/tiny-llama/generation_config.json"),
    ),
    (
        "model.safetensors",
        include_bytes!("../../../tests/fixtures/tiny-llama/model.safetensors"),
    ),
    (
        "tokenizer.json",
        include_bytes!("../../../tests/fixtures/tiny-llama/tokenizer.json"),
    ),
    (
        "tokenizer_config.json",
        include_bytes!("../../../tests/fixtures/tiny-llama/tokenizer_config.json"),
    ),
    (
        "corpus.txt",
        include_bytes!("../../../tests/fixtures/tiny-llama/corpus.txt"),
    ),
];

/// Write the bundled model directory into `dir` (created if needed).
pub fn write_tiny_llama(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, bytes) in FILES {
        let p = dir.join(name);
        std::fs::write(&p, bytes).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
